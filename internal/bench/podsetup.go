package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/loomnet/loom/internal/lab"
	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/subnetenv"
)

// Pod set-up: CNI ADD and DEL latency of loom-cni next to the chain
// flannel's CNI plugin delegates to, Debian's containernetworking-plugins
// `bridge` with `host-local` IPAM, both called through libcni from inside
// node n1's namespace exactly as a container runtime calls them (a fork and
// exec of the plugin per call, the result cached on disk by libcni).
//
// The pod namespaces are made before the clock starts and removed after;
// only AddNetworkList and DelNetworkList are timed. ADDs of the two chains
// alternate pod by pod, then the DELs do, so drift on the machine hits both
// alike. loom-cni uses the lab's own network configuration (cni0, the
// node's subnet, the lab's IPAM store); the bridge chain gets its own
// bridge (cnibench0) and a /24 of 10.244.0.0/16 that no node holds, with
// the options flannel's plugin gives it (isDefaultGateway, hairpinMode, the
// node's MTU, a route to the cluster network). cnibench0 is deleted at the
// end.

// bridgePluginDir is where Debian's containernetworking-plugins installs
// its binaries.
const bridgePluginDir = "/usr/lib/cni"

// benchBridge is the bridge of the bridge + host-local chain.
const benchBridge = "cnibench0"

func podSpec(op, plugin string, p99 bool) spec {
	stat := ""
	if p99 {
		stat = "-p99"
	}
	s := spec{name: "pod-setup/cni-" + op + stat + "/" + plugin, unit: "ms", better: lowerIsBetter}
	if plugin == "loom-cni" {
		s.baseline = "pod-setup/cni-" + op + stat + "/bridge+host-local"
	}
	return s
}

func (b *bencher) podSetup(ctx context.Context, c *cluster, idle float64) error {
	if _, err := os.Stat(filepath.Join(bridgePluginDir, "bridge")); err != nil {
		return fmt.Errorf("the baseline needs Debian's containernetworking-plugins (%s/bridge): run scripts/deps.sh: %w", bridgePluginDir, err)
	}
	l := c.lab
	node := l.Nodes[0]
	dir := filepath.Join(l.NodeDir(node.Name), "bench-cni")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	env, err := subnetenv.Read(l.SubnetFile(node.Name))
	if err != nil {
		return err
	}
	taken, err := c.takenSubnets(ctx)
	if err != nil {
		return err
	}
	bridgeRange, err := lastFree24(taken)
	if err != nil {
		return err
	}
	chains, err := cniChains(l, node.Name, dir, env, bridgeRange)
	if err != nil {
		return err
	}
	defer func() {
		if h, err := openHandle(node.NS); err == nil {
			if link, err := h.LinkByName(benchBridge); err == nil {
				_ = h.LinkDel(link)
			}
			h.Close()
		}
	}()
	cninet := libcni.NewCNIConfigWithCacheDir([]string{l.Opts.BinDir, bridgePluginDir}, filepath.Join(dir, "cache"), nil)

	n := b.d.pods
	type podRef struct {
		ns    string
		rt    *libcni.RuntimeConf
		added bool
	}
	pods := make([][]podRef, len(chains))
	defer func() {
		for ci, ps := range pods {
			for _, p := range ps {
				if p.added {
					_ = netns.Do(node.NS, func() error {
						return cninet.DelNetworkList(context.WithoutCancel(ctx), chains[ci].list, p.rt)
					})
				}
				_ = netns.Delete(p.ns)
			}
		}
	}()
	for ci, ch := range chains {
		for i := range n {
			ns := fmt.Sprintf("%s%s-%s%d", lab.NSPrefix, l.Opts.Name, ch.tag, i+1)
			if err := netns.Create(ns); err != nil {
				return err
			}
			pods[ci] = append(pods[ci], podRef{ns: ns, rt: &libcni.RuntimeConf{
				ContainerID: fmt.Sprintf("bench-%s-%d", ch.tag, i+1), NetNS: netns.Path(ns), IfName: "eth0"}})
		}
	}

	addMS := make([][]float64, len(chains))
	delMS := make([][]float64, len(chains))
	for i := range n {
		for ci, ch := range chains {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			p := &pods[ci][i]
			var took time.Duration
			err := netns.Do(node.NS, func() error {
				start := time.Now()
				_, err := cninet.AddNetworkList(ctx, ch.list, p.rt)
				took = time.Since(start)
				return err
			})
			if err != nil {
				return fmt.Errorf("CNI ADD %s for pod %d: %w", ch.plugin, i+1, err)
			}
			p.added = true
			addMS[ci] = append(addMS[ci], ms(took))
		}
	}
	for i := range n {
		for ci, ch := range chains {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			p := &pods[ci][i]
			var took time.Duration
			err := netns.Do(node.NS, func() error {
				start := time.Now()
				err := cninet.DelNetworkList(ctx, ch.list, p.rt)
				took = time.Since(start)
				return err
			})
			if err != nil {
				return fmt.Errorf("CNI DEL %s for pod %d: %w", ch.plugin, i+1, err)
			}
			p.added = false
			delMS[ci] = append(delMS[ci], ms(took))
		}
	}
	for ci, ch := range chains {
		for _, op := range []struct {
			name    string
			samples []float64
		}{{"add", addMS[ci]}, {"del", delMS[ci]}} {
			for _, v := range op.samples {
				b.rec.add(podSpec(op.name, ch.plugin, false), c.backend, idle, v)
			}
			b.rec.add(podSpec(op.name, ch.plugin, true), c.backend, idle, percentile(op.samples, 99))
			med, _, _ := stats(op.samples)
			b.log.Info("pod set-up", "plugin", ch.plugin, "op", op.name, "pods", len(op.samples),
				"median-ms", fmt.Sprintf("%.2f", med), "p99-ms", fmt.Sprintf("%.2f", percentile(op.samples, 99)))
		}
	}
	return nil
}

// cniChain is one network configuration list under test.
type cniChain struct {
	plugin string // as named in the report
	tag    string // in namespace names and container IDs
	list   *libcni.NetworkConfigList
}

// cniChains builds loom-cni's configuration (the lab's own: its subnet
// file and IPAM store) and the bridge + host-local one flannel's plugin
// would delegate for the same node.
func cniChains(l *lab.Lab, node, dir string, env subnetenv.Env, bridgeRange netip.Prefix) ([]cniChain, error) {
	loom := map[string]any{
		"cniVersion": "1.1.0",
		"name":       "loom",
		"plugins": []map[string]any{{
			"type":       "loom-cni",
			"subnetFile": l.SubnetFile(node),
			"dataDir":    filepath.Join(l.NodeDir(node), "ipam"),
		}},
	}
	bridge := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "benchbr",
		"plugins": []map[string]any{{
			"type":             "bridge",
			"bridge":           benchBridge,
			"mtu":              env.MTU,
			"hairpinMode":      true,
			"ipMasq":           false,
			"isGateway":        true,
			"isDefaultGateway": true,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": bridgeRange.String()}}},
				"routes":  []map[string]string{{"dst": env.Network.Masked().String()}},
				"dataDir": filepath.Join(dir, "host-local"),
			},
		}},
	}
	var out []cniChain
	for _, ch := range []struct {
		plugin, tag string
		conf        map[string]any
	}{{"loom-cni", "cl", loom}, {"bridge+host-local", "cb", bridge}} {
		data, err := json.Marshal(ch.conf)
		if err != nil {
			return nil, err
		}
		list, err := libcni.ConfListFromBytes(data)
		if err != nil {
			return nil, fmt.Errorf("parse the %s network configuration: %w", ch.plugin, err)
		}
		out = append(out, cniChain{plugin: ch.plugin, tag: ch.tag, list: list})
	}
	return out, nil
}

// lastFree24 is the highest /24 of 10.244.0.0/16 that overlaps nothing in
// taken (synthetic leases are taken from the lowest ones).
func lastFree24(taken []netip.Prefix) (netip.Prefix, error) {
	for third := 254; third >= 1; third-- {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(third), 0}), 24)
		free := true
		for _, t := range taken {
			if t.Overlaps(p) {
				free = false
				break
			}
		}
		if free {
			return p, nil
		}
	}
	return netip.Prefix{}, errors.New("no free /24 in 10.244.0.0/16 for the bridge chain")
}
