package doctor

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/loomnet/loom/internal/iface"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
)

// Defaults of Config's zero values.
const (
	DefaultCNIConfDir  = "/etc/cni/net.d"
	DefaultCNICacheDir = "/var/lib/cni" // libcni's; results live in <dir>/results
	DefaultTimeout     = 2 * time.Second
	// defaultPeerPort is probed on peers when the agents run no health
	// server: the kubelet's port, open on every Kubernetes node. Any port
	// would do: a refusal proves the peer is there as well as an accept.
	defaultPeerPort = 10250
)

// Config says what to read.
type Config struct {
	Opts       options.Options // the agent's flags, from options.Parse
	ArgsSource string          // where they came from, for the report
	Node       string          // overrides Opts.NodeName when set

	CNIConfDir  string        // default DefaultCNIConfDir
	CNICacheDir string        // default DefaultCNICacheDir
	Timeout     time.Duration // bound on every network read; default DefaultTimeout

	// Run runs a program and returns its standard output; nil runs it
	// with os/exec. Used for nft and iptables-save only.
	Run func(ctx context.Context, name string, args ...string) ([]byte, error)
	// Logger receives the etcd client's complaints; nil discards them.
	Logger *slog.Logger
}

func (c *Config) defaults() {
	if c.CNIConfDir == "" {
		c.CNIConfDir = DefaultCNIConfDir
	}
	if c.CNICacheDir == "" {
		c.CNICacheDir = DefaultCNICacheDir
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Run == nil {
		c.Run = runProgram
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.Node == "" {
		c.Node = c.Opts.NodeName
	}
	if c.ArgsSource == "" {
		c.ArgsSource = "command line"
	}
}

// Gather reads the node in the current network namespace. It never fails:
// what it cannot read is recorded in the facts. It never writes.
func Gather(ctx context.Context, cfg Config) *Facts {
	nodeGiven := cfg.Node != ""
	cfg.defaults()
	f := &Facts{Node: cfg.Node, Opts: cfg.Opts, ArgsSource: cfg.ArgsSource}
	kube := cfg.Opts.KubeSubnetMgr

	// The config file first: Kubernetes mode reads the Nodes with it.
	if configFromFile(cfg.Opts) {
		f.Config, f.ConfigFrom, f.ConfigErr = readConfigFile(cfg.Opts)
	}

	// Phase 1: independent reads, in parallel.
	var wg sync.WaitGroup
	node := f.Node
	if kube {
		wg.Go(func() { f.Kube, node = gatherKube(ctx, cfg, f.Config, nodeGiven) })
	} else {
		wg.Go(func() { f.Store = gatherStore(ctx, cfg) })
	}
	wg.Go(func() { f.Kernel = gatherKernel() })
	wg.Go(func() { f.SubnetEnv = gatherSubnetEnv(cfg.Opts.SubnetFile) })
	wg.Go(func() {
		f.CNI = gatherCNI(cfg.CNIConfDir, cfg.CNICacheDir)
		f.IPAM = gatherIPAM(f.CNI)
	})
	wg.Go(func() { f.Ready = gatherReady(ctx, cfg) })
	wg.Go(func() { f.Firewall = gatherFirewall(ctx, cfg) })
	wg.Wait()

	opts := cfg.Opts
	if kube {
		f.Node = node
		f.Store = kubeStore(f.Kube)
		opts = kubeOptions(opts, f.Kube)
	} else if !configFromFile(cfg.Opts) {
		f.Config, f.ConfigFrom, f.ConfigErr = f.Store.Config, "etcd "+f.Store.Prefix+"/config", f.Store.ConfigErr
	}

	// Phase 2: what depends on the config and the registry.
	f.Underlay = gatherUnderlay(opts, f.Config)
	wg.Go(func() { f.Kernel.Lookups = gatherLookups(f) })
	wg.Go(func() { f.Peers = probePeers(ctx, cfg, f) })
	wg.Wait()
	return f
}

// configFromFile says whether the agent reads its network config from
// -net-config-path: always in Kubernetes mode (the DaemonSet mounts
// net-conf.json from its ConfigMap), and with etcd when the flag is given.
func configFromFile(o options.Options) bool { return o.KubeSubnetMgr || o.NetConfigPathSet }

// readConfigFile reads -net-config-path's file.
func readConfigFile(o options.Options) (*netconf.Config, string, error) {
	from := "file " + o.NetConfigPath
	data, err := os.ReadFile(o.NetConfigPath)
	if err != nil {
		return nil, from, err
	}
	c, err := netconf.Parse(data)
	if err != nil {
		return nil, from, fmt.Errorf("%s: %w", o.NetConfigPath, err)
	}
	return &c, from, nil
}

// gatherUnderlay chooses the interface exactly as the agent would.
func gatherUnderlay(o options.Options, c *netconf.Config) UnderlayFacts {
	want4, want6 := true, false
	if c != nil {
		want4, want6 = c.EnableIPv4, c.EnableIPv6
	}
	ifc, err := iface.Select(iface.Config{
		Ifaces:   o.Iface,
		Regexes:  o.IfaceRegex,
		CanReach: o.IfaceCanReach,
		PublicIP: o.PublicIP,
		PublicV6: o.PublicIPv6,
		WantV4:   want4,
		WantV6:   want6,
	})
	if err != nil {
		return UnderlayFacts{Err: err}
	}
	return UnderlayFacts{Name: ifc.Name, How: ifc.How, MTU: ifc.MTU, PublicIP: ifc.PublicIP, Prefixes: ifc.Prefixes}
}
