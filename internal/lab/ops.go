package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/subnetenv"
)

// Up builds the lab, starts its store and agents, creates its pods, and
// returns once every agent is ready. On failure it removes whatever it had
// built, so a failed `up` leaves nothing behind.
func Up(ctx context.Context, opts Options, log *slog.Logger) (l *Lab, err error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	l = &Lab{Opts: opts}
	if left, _ := Leftovers(opts.Name); len(left) > 0 {
		return nil, fmt.Errorf("lab %s already exists (%s): run `loom lab down --name %s` first", opts.Name, strings.Join(left, ", "), opts.Name)
	}
	defer func() {
		if err != nil {
			if derr := Down(opts.Name); derr != nil {
				err = errors.Join(err, fmt.Errorf("clean up after failed up: %w", derr))
			}
		}
	}()
	if err := os.MkdirAll(l.dir(), 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", l.dir(), err)
	}
	netconf := fmt.Sprintf(`{"Network": %q, "Backend": {"Type": %q}}`+"\n", network, opts.Backend)
	if err := os.WriteFile(l.netConfPath(), []byte(netconf), 0o644); err != nil {
		return nil, err
	}
	log.Info("building topology", "lab", opts.Name, "nodes", opts.Nodes, "underlay", opts.Underlay)
	if err := l.buildTopology(); err != nil {
		return nil, err
	}
	l.Store = netip.AddrPortFrom(bridgeAddr(0).Addr(), storePort)
	if l.isKube() {
		l.Store = netip.AddrPortFrom(netip.MustParseAddr(kubeStoreAddr), storePort)
	}
	if opts.Store == "cluster" {
		if err := l.buildCluster(); err != nil {
			return nil, err
		}
		l.Store = netip.AddrPortFrom(l.Members[0].Addr.Addr(), storePort)
	}
	for _, n := range l.Nodes {
		if err := os.MkdirAll(l.nodeDir(n.Name), 0o755); err != nil {
			return nil, err
		}
	}
	if err := l.save(); err != nil {
		return nil, err
	}

	log.Info("starting store", "store", opts.Store, "endpoints", l.StoreEndpoint())
	if err := l.startStore(); err != nil {
		return nil, err
	}
	if err := l.waitStore(ctx); err != nil {
		return nil, err
	}
	if l.isKube() {
		log.Info("starting the Kubernetes control plane", "cluster-cidr", opts.ClusterCIDR)
		if err := l.upKube(ctx); err != nil {
			return nil, err
		}
		log.Info("Kubernetes control plane up, every Node has a podCIDR", "apiserver", l.Kube.URL)
	}
	log.Info("starting agents", "backend", opts.Backend, "datastore", opts.Datastore)
	for _, n := range l.Nodes {
		if err := l.StartAgent(n.Name); err != nil {
			return nil, err
		}
	}
	if err := l.waitAllReady(ctx); err != nil {
		return nil, err
	}
	if err := l.WaitConverged(ctx); err != nil {
		return nil, err
	}
	log.Info("creating pods through loom-cni", "per-node", opts.Pods)
	for _, n := range l.Nodes {
		for j := 1; j <= opts.Pods; j++ {
			if _, err := l.AddPod(ctx, n.Name, podName(n.Name, j)); err != nil {
				return nil, err
			}
		}
	}
	return l, l.save()
}

func (l *Lab) waitAllReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	errs := make([]error, len(l.Nodes))
	var wg sync.WaitGroup
	for i, n := range l.Nodes {
		wg.Go(func() { errs[i] = l.WaitReady(ctx, n.Name) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (l *Lab) waitStore(ctx context.Context) error {
	if l.Opts.Store == "cluster" {
		return l.waitCluster(ctx)
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	d := netns.Dialer{NS: l.RouterNS()}
	for {
		c, err := d.DialContext(ctx, "tcp", l.Store.String())
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("store at %s did not come up: %v; see %s", l.Store, err, filepath.Join(l.dir(), "store.log"))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Leftovers lists what exists of lab name: namespaces, processes in them,
// and its state directory. Empty means the lab is completely gone.
func Leftovers(name string) ([]string, error) {
	names, err := netns.List(NSPrefix + name + "-")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range names {
		out = append(out, "namespace "+n)
	}
	pids, err := pidsIn(names)
	if err != nil {
		return nil, err
	}
	for _, p := range pids {
		out = append(out, fmt.Sprintf("process %d", p))
	}
	if _, err := os.Stat(filepath.Join(StateRoot, name)); err == nil {
		out = append(out, "directory "+filepath.Join(StateRoot, name))
	}
	return out, nil
}

// Down removes lab name: every process in its namespaces, the namespaces
// (and with them every link, address, route and rule inside), and its state
// directory. It needs no state file, so it works after a crash.
func Down(name string) error {
	if name == "" {
		name = DefaultName
	}
	return down(NSPrefix+name+"-", filepath.Join(StateRoot, name))
}

// DownAll removes every lab and every namespace a crashed test left behind.
func DownAll() error {
	var errs []error
	for _, prefix := range []string{NSPrefix, "loomt-"} {
		errs = append(errs, down(prefix, ""))
	}
	if err := os.RemoveAll(StateRoot); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func down(prefix, dir string) error {
	names, err := netns.List(prefix)
	if err != nil {
		return err
	}
	var errs []error
	if err := killAll(names); err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		if err := netns.Delete(n); err != nil {
			errs = append(errs, err)
		}
	}
	if dir != "" {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Status writes what the lab is made of and how each part is doing.
func (l *Lab) Status(ctx context.Context, w io.Writer) error {
	fmt.Fprintf(w, "lab %s: %d nodes, backend %s, underlay %s, store %s, datastore %s\n",
		l.Opts.Name, len(l.Nodes), l.Opts.Backend, l.Opts.Underlay, l.StoreEndpoint(), l.Opts.Datastore)
	var podCIDRs map[string]string
	if l.Opts.Store == "cluster" {
		for _, m := range l.Members {
			pids, _ := pidsIn([]string{m.NS})
			fmt.Fprintf(w, "  %-4s %s  etcd: %s\n", m.Name, m.Addr.Addr(), procState(pids, etcdBinary))
		}
	} else {
		pids, _ := pidsIn([]string{l.RouterNS()})
		fmt.Fprintf(w, "  rt   store: %s\n", procState(pids, "store"))
	}
	if l.Kube != nil {
		podCIDRs = l.kubeStatus(ctx, w)
	}
	for _, n := range l.Nodes {
		pids, _ := pidsIn([]string{n.NS})
		subnet := "no subnet.env"
		if env, err := subnetenv.Read(l.SubnetFile(n.Name)); err == nil {
			subnet = "subnet " + env.Subnet.Masked().String()
		}
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		ready := "ready"
		if err := l.WaitReady(rctx, n.Name); err != nil {
			ready = "NOT READY"
		}
		cancel()
		if c, ok := podCIDRs[n.Name]; ok {
			subnet += ", " + c
		}
		fmt.Fprintf(w, "  %-4s %s  agent: %s, %s, %s\n", n.Name, n.Underlay.Addr(), procState(pids, "agent"), subnet, ready)
		var pods []string
		for _, p := range n.Pods {
			pods = append(pods, p.Name+"="+p.IP.String())
		}
		sort.Strings(pods)
		if len(pods) > 0 {
			fmt.Fprintf(w, "       pods: %s\n", strings.Join(pods, " "))
		}
	}
	return nil
}

func procState(pids []int, what string) string {
	for _, p := range pids {
		if cmdline(p) == what && alive(p) {
			return fmt.Sprintf("running (pid %d)", p)
		}
	}
	return "DOWN"
}
