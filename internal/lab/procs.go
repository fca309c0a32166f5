package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/subnetenv"
)

// startIn runs bin with args inside namespace ns as a daemon of the lab:
// its own session (a Ctrl-C of `loom lab up` must not kill the cluster),
// output appended to logPath. It returns once the process has started.
func startIn(ns, logPath, bin string, args ...string) (*os.Process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log %s: %w", logPath, err)
	}
	defer logf.Close()
	// `ip netns exec` enters the namespace and also remounts /sys for it,
	// so the process sees its own namespace's links under /sys/class/net.
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, bin}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", filepath.Base(bin), ns, err)
	}
	// Reap it when it exits, so a test process that outlives its agents
	// does not collect zombies that still look alive in /proc.
	go func() { _ = cmd.Wait() }()
	return cmd.Process, nil
}

func (l *Lab) loomBin() string { return filepath.Join(l.Opts.BinDir, "loom") }

// toolBin is loom-lab, which holds `loom store` (see cmd/loom-lab); the lab
// starts it directly rather than through loom's exec.
func (l *Lab) toolBin() string { return filepath.Join(l.Opts.BinDir, "loom-lab") }

// startStore starts the store: loom store, or every cluster member that
// is not running.
func (l *Lab) startStore() error {
	if l.Opts.Store == "cluster" {
		var errs []error
		for _, m := range l.Members {
			if !l.MemberAlive(m.Name) {
				errs = append(errs, l.StartMember(m.Name))
			}
		}
		return errors.Join(errs...)
	}
	dir := l.dir()
	args := []string{"store",
		"--listen", l.StoreEndpoint(),
		"--peer-listen", "http://127.0.0.1:2380",
		"--data-dir", filepath.Join(dir, "store"),
	}
	// In Kubernetes mode the store is the apiserver's etcd only: the
	// agents read net-conf.json, as flanneld does with -kube-subnet-mgr.
	if !l.isKube() {
		args = append(args, "--network-config", l.netConfPath())
	}
	return l.recordBin("store", l.RouterNS(), filepath.Join(dir, "store.log"), l.toolBin(), args...)
}

// AgentArgs is the command line the lab gives node's agent.
func (l *Lab) AgentArgs(node string) []string {
	args := []string{"agent", "--node-name", node}
	if l.Kube != nil {
		// flanneld's Kubernetes mode, as the manifest's DaemonSet runs it,
		// with the ServiceAccount's credentials and no etcd flag at all.
		args = append(args,
			"--kube-subnet-mgr",
			"--kubeconfig-file", l.Kube.AgentKubeconfig,
			"--net-config-path", l.netConfPath())
	} else {
		args = append(args, "--etcd-endpoints", l.StoreEndpoint())
	}
	args = append(args,
		"--iface", "eth0",
		"--ip-masq",
		"--subnet-file", l.SubnetFile(node),
		"--state-dir", l.nodeDir(node),
		"--healthz-ip", "127.0.0.1",
		"--healthz-port", strconv.Itoa(healthzPort),
		"--firewall", l.Opts.Firewall,
	)
	if l.Opts.Store == "cluster" {
		ca, client := l.clientTLS()
		args = append(args, "--etcd-cafile", ca, "--etcd-certfile", client.Cert, "--etcd-keyfile", client.Key)
	}
	return args
}

// StartAgent starts node's agent (again) with the lab's usual flags.
func (l *Lab) StartAgent(node string) error { return l.StartAgentWith(node) }

// StartAgentWith starts node's agent with flags given as "--flag", "value"
// pairs replacing the lab's flag of the same name (or added), e.g.
// "--iface", "nat0" to reproduce a fault. A pair with value "" removes it.
func (l *Lab) StartAgentWith(node string, overrides ...string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	if len(overrides)%2 != 0 {
		return fmt.Errorf("agent flag overrides %v: want --flag value pairs", overrides)
	}
	args := overrideFlags(l.AgentArgs(node), overrides)
	return l.record("agent-"+node, n.NS, filepath.Join(l.nodeDir(node), "agent.log"), args...)
}

// record starts `loom ARGS` in ns as a daemon of the lab and records its
// pid as <lab dir>/<what>.pid.
func (l *Lab) record(what, ns, logPath string, args ...string) error {
	return l.recordBin(what, ns, logPath, l.loomBin(), args...)
}

func (l *Lab) recordBin(what, ns, logPath, bin string, args ...string) error {
	p, err := startIn(ns, logPath, bin, args...)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(l.dir(), what+".pid"), []byte(strconv.Itoa(p.Pid)), 0o644)
}

// StopAgent sends sig to node's agent and waits until it has exited.
func (l *Lab) StopAgent(node string, sig syscall.Signal) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	pids, err := pidsIn([]string{n.NS})
	if err != nil {
		return err
	}
	for _, pid := range pids {
		if cmdline(pid) != "agent" {
			continue
		}
		_ = syscall.Kill(pid, sig)
		if !waitGone(pid, 10*time.Second) {
			return fmt.Errorf("agent of %s (pid %d) still running 10s after %v", node, pid, sig)
		}
	}
	return nil
}

// cmdline returns the loom subcommand a process runs ("agent", "store"),
// the binary's name for an etcd member and the Kubernetes control plane
// ("etcd", "kube-apiserver", "kube-controller-manager"), or "" for
// anything else.
func cmdline(pid int) string {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return ""
	}
	args := strings.Split(strings.TrimRight(string(data), "\x00"), "\x00")
	// Between fork and exec, `ip netns exec NS loom agent ...` is still ip.
	if len(args) > 4 && filepath.Base(args[0]) == "ip" && args[1] == "netns" && args[2] == "exec" {
		args = args[4:]
	}
	if len(args) > 0 {
		switch base := filepath.Base(args[0]); base {
		case etcdBinary, apiServerProc, controllerManagerProc:
			return base
		}
	}
	if base := filepath.Base(args[0]); len(args) < 2 || (base != "loom" && base != "loom-lab") {
		return ""
	}
	return args[1]
}

// WaitReady polls node's /readyz until it answers 200 or ctx ends.
func (l *Lab) WaitReady(ctx context.Context, node string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	client := &http.Client{
		Transport: &http.Transport{DialContext: netns.Dialer{NS: n.NS}.DialContext, DisableKeepAlives: true},
		Timeout:   2 * time.Second,
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/readyz", healthzPort)
	var last string
	for {
		resp, err := client.Get(url)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
		} else {
			last = err.Error()
		}
		if !l.recordedAlive("agent-" + node) {
			logPath := filepath.Join(l.nodeDir(node), "agent.log")
			data, _ := os.ReadFile(logPath)
			return fmt.Errorf("agent of %s is not running; last lines of %s:\n%s", node, logPath, lastLines(data, 5))
		}
		select {
		case <-ctx.Done():
			logPath := filepath.Join(l.nodeDir(node), "agent.log")
			data, _ := os.ReadFile(logPath)
			return fmt.Errorf("agent of %s not ready (%s); last lines of %s:\n%s", node, last, logPath, lastLines(data, 5))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// pidsIn lists the processes whose network namespace is one of the named
// ones, found through /proc so nothing depends on pid files surviving.
func pidsIn(names []string) ([]int, error) {
	inodes := map[uint64]bool{}
	for _, n := range names {
		ino, err := netns.Inode(netns.Path(n))
		if err == nil {
			inodes[ino] = true
		}
	}
	if len(inodes) == 0 {
		return nil, nil
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	self := os.Getpid()
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		ino, err := netns.Inode("/proc/" + e.Name() + "/ns/net")
		if err == nil && inodes[ino] {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

func alive(pid int) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// A zombie has exited; only its parent has not reaped it yet.
	if i := strings.LastIndexByte(string(data), ')'); i >= 0 && i+2 < len(data) {
		return data[i+2] != 'Z'
	}
	return true
}

func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !alive(pid) {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return !alive(pid)
}

// killAll stops every process inside the named namespaces: SIGTERM, then
// SIGKILL for whatever is still there after a grace period.
func killAll(names []string) error {
	pids, err := pidsIn(names)
	if err != nil {
		return err
	}
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGTERM)
	}
	var stuck []string
	for _, pid := range pids {
		if waitGone(pid, 3*time.Second) {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
		if !waitGone(pid, 3*time.Second) {
			stuck = append(stuck, strconv.Itoa(pid))
		}
	}
	if len(stuck) > 0 {
		return errors.New("processes " + strings.Join(stuck, ",") + " survived SIGKILL")
	}
	return nil
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// recordedAlive reports whether the process recorded by record(what) is
// still running. The pid stays the same through `ip netns exec`'s exec.
func (l *Lab) recordedAlive(what string) bool {
	data, err := os.ReadFile(filepath.Join(l.dir(), what+".pid"))
	if err != nil {
		return false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	return err == nil && alive(pid)
}

// WaitConverged waits until every node has a route to the subnet of every
// peer it can reach (all nodes; with host-gw only the nodes on its own
// underlay segment). Readiness says a node's data path is programmed for
// the peers it knew when it started; convergence says every node has
// learned of every other.
func (l *Lab) WaitConverged(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		missing, err := l.missingRoutes()
		if err == nil && len(missing) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return fmt.Errorf("lab did not converge: %w", err)
			}
			return fmt.Errorf("lab did not converge: missing routes: %s", strings.Join(missing, "; "))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// peersKnown reads how many peers node's agent has handed to its backend.
func (l *Lab) peersKnown(n Node) (int, error) {
	client := &http.Client{
		Transport: &http.Transport{DialContext: netns.Dialer{NS: n.NS}.DialContext, DisableKeepAlives: true},
		Timeout:   2 * time.Second,
	}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", healthzPort))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "loom_peers "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int(f), err
		}
	}
	return 0, fmt.Errorf("%s: no loom_peers metric", n.Name)
}

func (l *Lab) missingRoutes() ([]string, error) {
	subnets := map[string]netip.Prefix{}
	for _, n := range l.Nodes {
		env, err := subnetenv.Read(l.SubnetFile(n.Name))
		if err != nil {
			return nil, err
		}
		subnets[n.Name] = env.Subnet.Masked()
	}
	var missing []string
	for _, n := range l.Nodes {
		// Every agent must know every peer, whatever the backend makes of
		// it; the udp backend keeps its peers in a table, not in routes.
		known, err := l.peersKnown(n)
		if err != nil {
			return nil, err
		}
		if known != len(l.Nodes)-1 {
			missing = append(missing, fmt.Sprintf("%s knows %d peers, want %d", n.Name, known, len(l.Nodes)-1))
		}
		if l.Opts.Backend == "udp" {
			continue
		}
		h, err := openHandle(n.NS)
		if err != nil {
			return nil, err
		}
		routes, err := h.RouteList(nil, netlink.FAMILY_V4)
		h.Close()
		if err != nil {
			return nil, fmt.Errorf("routes of %s: %w", n.Name, err)
		}
		have := map[netip.Prefix]bool{}
		for _, r := range routes {
			if r.Dst == nil {
				continue
			}
			if a, ok := netip.AddrFromSlice(r.Dst.IP); ok {
				ones, _ := r.Dst.Mask.Size()
				have[netip.PrefixFrom(a.Unmap(), ones)] = true
			}
		}
		for _, m := range l.Nodes {
			if m.Name == n.Name || (l.Opts.Backend == "host-gw" && m.Underlay.Masked() != n.Underlay.Masked()) {
				continue
			}
			if !have[subnets[m.Name]] {
				missing = append(missing, fmt.Sprintf("%s has no route to %s's subnet %s", n.Name, m.Name, subnets[m.Name]))
			}
		}
	}
	if l.Opts.Backend == "vxlan" {
		stale, err := l.staleVTEPs(subnets)
		if err != nil {
			return nil, err
		}
		missing = append(missing, stale...)
	}
	return missing, nil
}

// vtep is what a node's flannel.1 says about itself.
type vtep struct {
	local netip.Addr
	mac   string
}

// staleVTEPs lists the peers whose neighbour or FDB entry does not match the
// peer's flannel.1 as it is now. A route alone is not convergence: after an
// agent restarts on another interface (a new public IP), its peers keep the
// route and must still move the FDB entry to the new address, and traffic
// sent before that goes to the old one.
func (l *Lab) staleVTEPs(subnets map[string]netip.Prefix) ([]string, error) {
	vteps := map[string]vtep{}
	for _, n := range l.Nodes {
		h, err := openHandle(n.NS)
		if err != nil {
			return nil, err
		}
		link, err := h.LinkByName("flannel.1")
		h.Close()
		if err != nil {
			return []string{fmt.Sprintf("%s has no flannel.1: %v", n.Name, err)}, nil
		}
		vx, ok := link.(*netlink.Vxlan)
		if !ok {
			return nil, fmt.Errorf("%s: flannel.1 is a %s, not vxlan", n.Name, link.Type())
		}
		local, _ := netip.AddrFromSlice(vx.SrcAddr)
		vteps[n.Name] = vtep{local: local.Unmap(), mac: vx.HardwareAddr.String()}
	}
	var stale []string
	for _, n := range l.Nodes {
		h, err := openHandle(n.NS)
		if err != nil {
			return nil, err
		}
		link, err := h.LinkByName("flannel.1")
		if err != nil {
			h.Close()
			return []string{fmt.Sprintf("%s has no flannel.1: %v", n.Name, err)}, nil
		}
		fdb, err := h.NeighList(link.Attrs().Index, unix.AF_BRIDGE)
		if err != nil {
			h.Close()
			return nil, fmt.Errorf("FDB of %s: %w", n.Name, err)
		}
		neigh, err := h.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
		h.Close()
		if err != nil {
			return nil, fmt.Errorf("neighbours of %s: %w", n.Name, err)
		}
		dst := map[string]netip.Addr{}
		for _, e := range fdb {
			if a, ok := netip.AddrFromSlice(e.IP); ok {
				dst[e.HardwareAddr.String()] = a.Unmap()
			}
		}
		macOf := map[netip.Addr]string{}
		for _, e := range neigh {
			if a, ok := netip.AddrFromSlice(e.IP); ok {
				macOf[a.Unmap()] = e.HardwareAddr.String()
			}
		}
		for _, m := range l.Nodes {
			if m.Name == n.Name {
				continue
			}
			want := vteps[m.Name]
			if got := dst[want.mac]; got != want.local {
				stale = append(stale, fmt.Sprintf("%s's FDB sends %s's VTEP %s to %v, want %s", n.Name, m.Name, want.mac, got, want.local))
			}
			gw := subnets[m.Name].Addr()
			if got := macOf[gw]; got != want.mac {
				stale = append(stale, fmt.Sprintf("%s's neighbour %s (%s) is %q, want %s", n.Name, gw, m.Name, got, want.mac))
			}
		}
	}
	return stale, nil
}

// overrideFlags applies "--flag", "value" pairs to args ("agent" followed
// by flags): a flag already there gets the new value, or is dropped when
// the new value is ""; a new flag is appended. A lone boolean flag such as
// --ip-masq becomes --ip-masq=VALUE.
func overrideFlags(args, overrides []string) []string {
	out := append([]string(nil), args...)
	for i := 0; i < len(overrides); i += 2 {
		name, val := overrides[i], overrides[i+1]
		found := false
		for j := 0; j < len(out); j++ {
			if out[j] != name {
				continue
			}
			found = true
			lone := j+1 >= len(out) || strings.HasPrefix(out[j+1], "--")
			switch {
			case val == "" && lone:
				out = append(out[:j], out[j+1:]...)
			case val == "":
				out = append(out[:j], out[j+2:]...)
			case lone:
				out[j] = name + "=" + val
			default:
				out[j+1] = val
			}
			break
		}
		if !found && val != "" {
			out = append(out, name, val)
		}
	}
	return out
}
