// Package agent is the node agent, flanneld's job: it takes a subnet lease
// for this node, programs the data path to every peer, writes subnet.env for
// the CNI plugin and serves /healthz, /readyz and /metrics.
//
//	options ──► netconf.Config (etcd <prefix>/config or -net-config-path)
//	iface.Select ──► underlay interface and public IP
//	subnets.Keep ──► own lease ──► subnet.env, backend.SetLocal
//	subnets.List + Watch ──► peer events ──► backend.Handle
//	backend.Run: reconcile loop ◄── netlink events + periodic resync
//	firewall.New, beside all of the above ──► rules for the own lease
//
// The subnets come from etcd (registry) or, with -kube-subnet-mgr, from the
// Kubernetes API (kubesubnet: the Node's podCIDR, flannel's annotations);
// everything else is one code path for both.
//
// On SIGTERM the context ends: the lease is closed without being released
// and the kernel state stays, so pods keep working while the agent restarts
// and the restarted agent takes the same subnet back.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/loomnet/loom/internal/backend"
	"github.com/loomnet/loom/internal/backend/hostgw"
	"github.com/loomnet/loom/internal/backend/udp"
	"github.com/loomnet/loom/internal/backend/vxlan"
	"github.com/loomnet/loom/internal/firewall"
	"github.com/loomnet/loom/internal/health"
	"github.com/loomnet/loom/internal/iface"
	"github.com/loomnet/loom/internal/kubesubnet"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
	"github.com/loomnet/loom/internal/registry"
	"github.com/loomnet/loom/internal/subnetenv"
	"github.com/loomnet/loom/internal/version"
)

// Main runs `loom agent ARGS` until ctx ends.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	opts, err := options.Parse(args, os.Getenv)
	if errors.Is(err, flag.ErrHelp) {
		options.Usage(stdout)
		return err
	}
	if err != nil {
		return err
	}
	if opts.Version {
		fmt.Fprintln(stdout, version.String())
		return nil
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: opts.LogLevel}))
	return Run(ctx, opts, log)
}

// Run is the agent. It returns nil when ctx ends, or the error that stopped it.
//
// The health server comes first: a node can wait long for its subnet (in
// Kubernetes mode until kube-controller-manager assigns a podCIDR, in etcd
// mode until someone writes the network config), and a DaemonSet's
// liveness probe must find the agent alive meanwhile, not restart it in a
// loop. /healthz answers from the start, /readyz says why the node is not
// ready yet, /metrics has loom_lease_held 0.
func Run(ctx context.Context, opts options.Options, log *slog.Logger) error {
	log.Info("starting", "version", version.String(), "node", opts.NodeName)
	for _, s := range opts.Ignored {
		log.Warn("ignoring a flanneld flag without effect on a loom node", "flag", s)
	}
	if opts.Cleanup {
		if err := firewall.Cleanup(ctx, firewall.Config{Mode: firewall.ModeAuto, Logger: log}); err != nil {
			return fmt.Errorf("-cleanup: %w", err)
		}
		log.Info("removed loom's masquerade and forward rules")
		return nil
	}
	parent := ctx
	// Every part that fails stops the agent by cancelling ctx with its
	// error as the cause; Run returns that cause.
	ctx, fail := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer fail(nil)
	// stopped is what Run returns when err stopped it: nil after the
	// caller's ctx ended (SIGTERM), the failing part's error when one
	// failed meanwhile, else err.
	stopped := func(err error) error {
		switch {
		case parent.Err() != nil:
			return nil
		case ctx.Err() != nil:
			return context.Cause(ctx)
		}
		return err
	}

	metrics := prometheus.NewRegistry()
	metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a := &agent{opts: opts, subnetFile: opts.SubnetFile, log: log, known: map[string]string{}}
	a.registerMetrics(metrics)
	checks := &health.Checks{}
	checks.Add("lease", func(context.Context) error { return a.leaseReady() })
	checks.Add("subnet.env", func(context.Context) error { return a.subnetFileReady() })
	checks.Add("datapath", health.Ready(func() bool { return false }, "not set up yet: the node holds no subnet lease"))
	checks.Add("firewall", func(context.Context) error { return a.firewallReady() })
	if opts.HealthzPort > 0 {
		addr := netip.AddrPortFrom(opts.HealthzIP, uint16(opts.HealthzPort))
		// Bound here, not in the server's goroutine: a port in use is an
		// error at start, not after the wait for a subnet.
		var lc net.ListenConfig
		ln, err := lc.Listen(ctx, "tcp", addr.String())
		if err != nil {
			return fmt.Errorf("serve health on %s (-healthz-ip, -healthz-port): %w", addr, err)
		}
		hcfg := health.Config{Checks: checks, Metrics: metrics, Logger: log, Profiling: opts.Profiling}
		wg.Go(func() {
			if err := health.ServeListener(ctx, ln, hcfg); err != nil && ctx.Err() == nil {
				fail(fmt.Errorf("serve health on %s: %w", addr, err))
			}
		})
	}

	subnets, cfg, err := a.openSubnets(ctx, &opts, metrics)
	if err != nil {
		return stopped(err)
	}
	// The store closes only after every part that uses it (Keep, Watch)
	// has stopped.
	defer func() {
		fail(nil)
		wg.Wait()
		subnets.Close()
	}()
	// The firewall is set up now, beside everything below, and nothing
	// below waits for it: its set-up probes nft and iptables (exec'd
	// tools and dry-run kernel transactions, ~50 ms, which used to delay
	// the lease claim), and its rules were never a precondition of
	// subnet.env or the data path (its first sync always ran beside the
	// backend's). It gets the lease's addresses when both it and the lease
	// are there (setFirewallAddrs); /readyz waits for its rules. A set-up
	// error still stops the agent, now perhaps after the lease was taken,
	// which the next start takes back as after any restart.
	fwCfg := firewall.Config{
		Mode:         firewallMode(opts, cfg),
		IPMasq:       opts.IPMasq,
		ForwardRules: opts.IPTablesForwardRules,
		Resync:       opts.IPTablesResync,
		Logger:       log,
		Metrics:      metrics,
	}
	wg.Go(func() {
		if err := a.runFirewall(ctx, fwCfg); err != nil && ctx.Err() == nil {
			fail(err)
		}
	})
	ifc, err := iface.Select(iface.Config{
		Ifaces:   opts.Iface,
		Regexes:  opts.IfaceRegex,
		CanReach: opts.IfaceCanReach,
		PublicIP: opts.PublicIP,
		PublicV6: opts.PublicIPv6,
		WantV4:   cfg.EnableIPv4,
		WantV6:   cfg.EnableIPv6,
	})
	if err != nil {
		return fmt.Errorf("choose the underlay interface: %w", err)
	}
	log.Info("underlay", "iface", ifc.Name, "chosen-by", ifc.How, "public-ip", ifc.PublicIP, "public-ipv6", ifc.PublicV6, "mtu", ifc.MTU)
	if err := cfg.CheckUnderlay(ifc.Prefixes); err != nil {
		return err
	}
	routes, err := iface.HostRoutes()
	if err != nil {
		return fmt.Errorf("read the node's routes: %w", err)
	}
	if err := cfg.CheckRoutes(routes); err != nil {
		return err
	}
	// Which interface carries the overlay, and why, is the first thing to
	// look at when nodes cannot reach each other (the Vagrant trap).
	metrics.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "loom_underlay_info",
		Help:        "The underlay interface the agent chose, its public address and why it was chosen.",
		ConstLabels: prometheus.Labels{"iface": ifc.Name, "public_ip": addrLabel(ifc.PublicIP), "public_ipv6": addrLabel(ifc.PublicV6), "chosen_by": ifc.How},
	}, func() float64 { return 1 }))
	sysctls, err := enableForwarding(cfg)
	if err != nil {
		return err
	}
	log.Info("enabled IP forwarding", "sysctls", sysctls)
	for _, key := range sysctls {
		metrics.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "loom_sysctl_value",
			Help:        "Current value of a sysctl the agent sets (1 = on); read at scrape time.",
			ConstLabels: prometheus.Labels{"key": key},
		}, func() float64 { return readSysctl(key) }))
	}
	dp, err := newBackend(cfg, ifc, opts, log, metrics)
	if err != nil {
		return err
	}
	be := dp.Network
	checks.Add("datapath", health.Ready(be.Ready, "peer routes not programmed yet"))

	// The goroutines below see these fields as set here: they start after.
	a.opts, a.cfg, a.be, a.mtu, a.guard = opts, cfg, be, dp.mtu, subnets.Guard(cfg)
	req := registry.Request{
		NodeName: opts.NodeName,
		Config:   cfg,
		Attrs: lease.Attrs{
			BackendType:   cfg.Backend.Type,
			BackendData:   dp.data,
			BackendV6Data: dp.v6data,
		},
	}
	if cfg.EnableIPv4 {
		req.Attrs.PublicIP = ifc.PublicIP
	}
	if cfg.EnableIPv6 {
		v6 := ifc.PublicV6
		req.Attrs.PublicIPv6 = &v6
	}
	if prev, err := subnetenv.Read(opts.SubnetFile); err == nil {
		req.Previous, req.PreviousV6 = prev.Subnet.Masked(), prev.IPv6Subnet.Masked()
		log.Info("previous subnet from "+opts.SubnetFile, "subnet", req.Previous, "ipv6-subnet", req.PreviousV6)
	} else if !errors.Is(err, subnetenv.ErrNotExist) {
		log.Warn("ignoring unreadable subnet file", "err", err)
	}

	first := make(chan struct{})
	var firstOnce sync.Once
	wg.Go(func() {
		err := subnets.Keep(ctx, req, func(l lease.Lease) {
			if err := a.setLease(l); err != nil {
				fail(err)
				return
			}
			firstOnce.Do(func() { close(first) })
		})
		if err != nil && ctx.Err() == nil {
			fail(fmt.Errorf("hold subnet lease: %w", err))
		}
	})
	select {
	case <-first:
	case <-ctx.Done():
		return stopped(nil)
	}

	// The backend starts with every peer already known, so its first full
	// sync (which makes /readyz green) programs routes to all of them.
	leases, rev, err := a.listPeers(ctx, subnets)
	if err != nil {
		return stopped(nil)
	}
	if cfg.EnableIPv4 && len(dp.devices) > 0 {
		wg.Go(func() { keepLooseRPFilter(ctx, dp.devices, opts.Resync, log) })
	}
	wg.Go(func() {
		if err := be.Run(ctx); err != nil && ctx.Err() == nil {
			fail(fmt.Errorf("data path: %w", err))
		}
	})
	wg.Go(func() {
		if err := subnets.Watch(ctx, rev, leases, a.deliver); err != nil && ctx.Err() == nil {
			fail(fmt.Errorf("watch peers: %w", err))
		}
	})

	<-ctx.Done()
	if err := stopped(nil); err != nil {
		return err
	}
	log.Info("stopping; leaving the data path and the lease in place")
	return nil
}

// agent is the running agent. The health server reads it from the start;
// the fields above mu are set once before the parts that use them start
// (Keep, the peer watch) and the health server never reads them.
type agent struct {
	opts options.Options
	cfg  netconf.Config
	log  *slog.Logger
	be   backend.Network
	mtu  int
	// guard keeps corrupt and hostile peer leases out of the data path.
	guard *registry.Guard
	// subnetFile is -subnet-file, for the readiness check.
	subnetFile string

	mu  sync.Mutex  // guards own, known, subnets, pending, fw and fwAddrs
	own lease.Lease // the lease this node holds
	// fw is the firewall once its set-up is done (runFirewall), nil
	// before; fwAddrs what it must program, nil before the first lease.
	fw      *firewall.Firewall
	fwAddrs *firewall.Addrs
	// subnets says, until own is set, why there is no lease yet.
	subnets subnetManager
	// pending is why there is no lease yet before subnets can say it
	// (the etcd network config not there yet); nil otherwise.
	pending error

	// known holds the node name of every lease the registry reported, by
	// key, this node's own included: the watch can report a new own lease
	// before setLease records it, so which one is this node's is decided
	// only when counting (peerCount), never when storing.
	known map[string]string

	subnetWrote atomic.Bool
}

// setLease records a (new) own lease: the backend must never route to it,
// and the CNI plugin learns it from subnet.env.
func (a *agent) setLease(l lease.Lease) error {
	a.mu.Lock()
	a.own = l
	a.mu.Unlock()
	a.be.SetLocal(l)
	a.setFirewallAddrs(firewall.Addrs{Network: a.cfg.Network, Subnet: l.Subnet, IPv6Network: a.cfg.IPv6Network, IPv6Subnet: l.IPv6Subnet})
	env := subnetenv.Env{MTU: a.mtu, IPMasq: a.opts.IPMasq}
	if a.cfg.EnableIPv4 {
		env.Network = a.cfg.Network
		env.Subnet = gateway(l.Subnet)
	}
	if a.cfg.EnableIPv6 {
		env.IPv6Network = a.cfg.IPv6Network
		env.IPv6Subnet = gateway(l.IPv6Subnet)
	}
	if err := subnetenv.Write(a.opts.SubnetFile, env); err != nil {
		return err
	}
	a.subnetWrote.Store(true)
	a.log.Info("holding subnet lease", "subnet", l.Subnet, "ipv6-subnet", l.IPv6Subnet, "subnet-file", a.opts.SubnetFile)
	return nil
}

// runFirewall sets the firewall up, hands it the addresses of the lease
// if there is one already, and keeps its rules until ctx ends. An error
// setting it up (no usable nft or iptables for the mode) stops the agent.
func (a *agent) runFirewall(ctx context.Context, cfg firewall.Config) error {
	fw, err := firewall.New(cfg)
	if err != nil {
		return err
	}
	a.log.Info("firewall", "mode", fw.Mode(), "ip-masq", cfg.IPMasq, "forward-rules", cfg.ForwardRules)
	a.mu.Lock()
	a.fw = fw
	if a.fwAddrs != nil {
		fw.Set(*a.fwAddrs)
	}
	a.mu.Unlock()
	if err := fw.Run(ctx); err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	return nil
}

// setFirewallAddrs gives the firewall the addresses of a (new) lease, or
// keeps them for it until it is set up. Set is called with mu held so that
// runFirewall and a lease change cannot hand over two leases out of order.
func (a *agent) setFirewallAddrs(addrs firewall.Addrs) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.fwAddrs = &addrs
	if a.fw != nil {
		a.fw.Set(addrs)
	}
}

// firewallReady is the readiness check of the firewall: nil once its
// rules for the current lease are in place.
func (a *agent) firewallReady() error {
	a.mu.Lock()
	fw, addrs := a.fw, a.fwAddrs
	a.mu.Unlock()
	switch {
	case addrs == nil:
		return errors.New("not set up yet: the node holds no subnet lease")
	case fw == nil:
		return errors.New("not set up yet: probing nftables and iptables")
	case !fw.Ready():
		return errors.New("masquerade and forward rules not in place yet")
	}
	return nil
}

// leaseReady is the readiness check of the lease: nil once the node holds
// one, else why not, in the subnet manager's words (in Kubernetes mode
// "pod cidr not assigned to node ...", as the log says it).
func (a *agent) leaseReady() error {
	a.mu.Lock()
	held, subnets, pending := a.own.Subnet.IsValid() || a.own.IPv6Subnet.IsValid(), a.subnets, a.pending
	a.mu.Unlock()
	switch {
	case held:
		return nil
	case pending != nil:
		return pending
	case subnets != nil:
		if err := subnets.Waiting(); err != nil {
			return err
		}
	}
	return errors.New("no subnet lease yet")
}

// holding reports whether the node holds a subnet lease.
func (a *agent) holding() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.own.Subnet.IsValid() || a.own.IPv6Subnet.IsValid()
}

// waitingFor records why there is no lease yet while the subnet manager
// cannot say it; nil clears it.
func (a *agent) waitingFor(why error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pending = why
}

// setSubnets makes the subnet manager the one to say why there is no lease
// yet, as soon as it exists (it may wait long before Keep starts).
func (a *agent) setSubnets(s subnetManager) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.subnets = s
}

// subnetFileReady checks the file on disk, not just that it was written
// once: a CNI ADD fails with "not available" without it.
func (a *agent) subnetFileReady() error {
	if !a.subnetWrote.Load() {
		return errors.New("not written yet")
	}
	env, err := subnetenv.Read(a.subnetFile)
	if err != nil {
		return err
	}
	a.mu.Lock()
	own := a.own
	a.mu.Unlock()
	if env.Subnet.Masked() != own.Subnet || env.IPv6Subnet.Masked() != own.IPv6Subnet {
		return fmt.Errorf("%s says %s, the lease is %s", a.subnetFile, env.Subnet, own.Subnet)
	}
	return nil
}

// listPeers lists the registry and hands every peer to the backend,
// retrying until it succeeds or ctx ends (then it returns ctx's error).
func (a *agent) listPeers(ctx context.Context, reg subnetManager) ([]lease.Lease, int64, error) {
	for {
		leases, rev, err := reg.List(ctx)
		if err == nil {
			events := make([]lease.Event, 0, len(leases))
			for i := range leases {
				// The same leases Watch gets as known: one copy of each.
				events = append(events, lease.Event{Type: lease.Added, Lease: &leases[i]})
			}
			a.deliver(events)
			return leases, rev, nil
		}
		a.log.Warn("list subnet leases; retrying", "err", err)
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func (a *agent) deliver(events []lease.Event) {
	events = a.guard.Filter(events)
	a.mu.Lock()
	own := a.own
	for _, e := range events {
		switch e.Type {
		case lease.Added:
			a.known[e.Lease.Key()] = e.Lease.Attrs.NodeName
		case lease.Removed:
			delete(a.known, e.Lease.Key())
		}
	}
	a.mu.Unlock()
	peers := events[:0:0]
	for _, e := range events {
		// Only this node's own lease is left out. Another node's lease
		// for the subnet this node holds means this node lost it (a
		// partition longer than the TTL) and is about to move: the
		// backend keeps it and programs it once SetLocal moves this node.
		if isOwn(e.Lease, &own) {
			continue
		}
		switch e.Type {
		case lease.Added:
			a.log.Debug("peer", "event", e.Type, "lease", e.Lease.String(), "public-ip", e.Lease.Attrs.PublicIP)
		case lease.Removed:
			a.log.Info("peer gone", "lease", e.Lease.String())
		}
		peers = append(peers, e)
	}
	if len(peers) > 0 {
		a.be.Handle(peers)
	}
}

// isOwn says whether l is own, the lease this node holds: the same
// subnets claimed by the same node.
func isOwn(l, own *lease.Lease) bool {
	return l.Subnet == own.Subnet && l.IPv6Subnet == own.IPv6Subnet && l.Attrs.NodeName == own.Attrs.NodeName
}

// peerCount is how many leases of other nodes the registry holds now.
func (a *agent) peerCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := len(a.known)
	if node, ok := a.known[a.own.Key()]; ok && node == a.own.Attrs.NodeName {
		n--
	}
	return n
}

func (a *agent) registerMetrics(reg *prometheus.Registry) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "loom_peers",
		Help: "Leases of other nodes the registry holds, each handed to the backend.",
	}, func() float64 { return float64(a.peerCount()) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "loom_lease_held",
		Help: "1 while this node holds a subnet lease.",
	}, func() float64 {
		if a.holding() {
			return 1
		}
		return 0
	}))
}

// gateway is the first address of a node subnet with the subnet's length:
// 10.244.1.0/24 → 10.244.1.1/24, the form subnet.env carries.
func gateway(p netip.Prefix) netip.Prefix {
	if !p.IsValid() {
		return p
	}
	return netip.PrefixFrom(p.Addr().Next(), p.Bits())
}

// subnetManager is where the node's subnet and its peers' come from: the
// etcd registry (*registry.Registry) or the Kubernetes API
// (*kubesubnet.Manager). Keep holds the node's subnet and reports each
// lease it gets; List and Watch report every node's lease (the own one
// included), Watch relative to List's result; Guard screens what they
// report before it reaches the data path. Waiting says why Keep has not
// reported a lease yet (nil once it has), for /readyz.
type subnetManager interface {
	Keep(ctx context.Context, req registry.Request, onLease func(lease.Lease)) error
	Waiting() error
	List(ctx context.Context) ([]lease.Lease, int64, error)
	Watch(ctx context.Context, fromRevision int64, known []lease.Lease, out func([]lease.Event)) error
	Guard(cfg netconf.Config) *registry.Guard
	Close() error
}

// openSubnets connects to the subnet store -kube-subnet-mgr chooses and
// reads the network config, making the store the agent's (setSubnets) as
// soon as it exists, so /readyz says why it waits. In Kubernetes mode it
// may also fill in the node's name (from its pod, as in kube-flannel.yml)
// and public addresses (the Node's node-public-ip annotations, as
// flanneld honours them) in opts.
func (a *agent) openSubnets(ctx context.Context, opts *options.Options, metrics *prometheus.Registry) (subnetManager, netconf.Config, error) {
	if opts.KubeSubnetMgr {
		return a.openKube(ctx, opts, metrics)
	}
	reg, err := registry.New(ctx, registry.Config{
		Endpoints:      opts.EtcdEndpoints,
		Prefix:         opts.EtcdPrefix,
		CertFile:       opts.EtcdCertFile,
		KeyFile:        opts.EtcdKeyFile,
		CAFile:         opts.EtcdCAFile,
		Username:       opts.EtcdUsername,
		Password:       opts.EtcdPassword,
		DialTimeout:    opts.EtcdDialTimeout,
		RequestTimeout: opts.EtcdRequestTimeout,
		TTL:            opts.SubnetLeaseTTL,
		Logger:         a.log,
		Metrics:        metrics,
	})
	if err != nil {
		return nil, netconf.Config{}, err
	}
	s := etcdSubnets{reg}
	a.setSubnets(s)
	cfg, err := networkConfig(ctx, *opts, reg, a.log, a.waitingFor)
	if err != nil {
		reg.Close()
		return nil, netconf.Config{}, err
	}
	return s, cfg, nil
}

// etcdSubnets is the etcd registry as the agent's subnet manager.
type etcdSubnets struct{ *registry.Registry }

// Waiting says why the registry holds no lease for the node yet: the
// store is unreachable (its last reachability check's error), or Keep is
// still acquiring.
func (e etcdSubnets) Waiting() error {
	if ok, err := e.Reachable(); !ok && err != nil {
		return fmt.Errorf("no subnet lease yet: the store is unreachable: %w", err)
	}
	return errors.New("no subnet lease yet")
}

// kubeSubnets is the Kubernetes subnet manager with the client it owns.
type kubeSubnets struct {
	*kubesubnet.Manager
	client *kubesubnet.Client
}

func (k kubeSubnets) Close() error {
	err := k.Manager.Close()
	return errors.Join(err, k.client.Close())
}

func (a *agent) openKube(ctx context.Context, opts *options.Options, metrics *prometheus.Registry) (subnetManager, netconf.Config, error) {
	log := a.log
	// In Kubernetes mode the network config is a file (the DaemonSet
	// mounts net-conf.json from its ConfigMap), as in flanneld.
	cfg, err := networkConfig(ctx, *opts, nil, log, nil)
	if err != nil {
		return nil, netconf.Config{}, err
	}
	client, err := kubesubnet.NewClient(kubesubnet.ClientConfig{
		KubeconfigFile: opts.KubeconfigFile,
		APIURL:         opts.KubeAPIURL,
		Logger:         log,
		Metrics:        metrics,
	})
	if err != nil {
		return nil, netconf.Config{}, err
	}
	if opts.NodeNameFromHostname && opts.PodName != "" && opts.PodNamespace != "" {
		name, err := client.NodeOfPod(ctx, opts.PodNamespace, opts.PodName)
		if err != nil {
			client.Close()
			return nil, netconf.Config{}, err
		}
		log.Info("node name from this agent's pod", "node", name, "pod", opts.PodNamespace+"/"+opts.PodName)
		opts.NodeName = name
	}
	mgr, err := kubesubnet.New(kubesubnet.Config{
		Client:           client,
		NodeName:         opts.NodeName,
		Network:          cfg,
		NetConfigPath:    opts.NetConfigPath,
		AnnotationPrefix: opts.KubeAnnotationPrefix,
		Logger:           log,
		Metrics:          metrics,
		// flanneld's -set-node-network-unavailable=false: not our condition.
		LeaveNetworkUnavailable: !opts.SetNodeNetworkUnavailable,
	})
	if err != nil {
		client.Close()
		return nil, netconf.Config{}, err
	}
	if !opts.SetNodeNetworkUnavailable {
		log.Info("leaving the Node's NetworkUnavailable condition alone (-set-node-network-unavailable=false)")
	}
	k := kubeSubnets{Manager: mgr, client: client}
	a.setSubnets(k)
	v4, v6, err := mgr.NodePublicIPs(ctx)
	if err != nil {
		k.Close()
		return nil, netconf.Config{}, err
	}
	if v4.IsValid() {
		log.Info("public IP from the Node's annotation, in place of -public-ip", "annotation", opts.KubeAnnotationPrefix+kubesubnet.AnnNodePublicIP, "public-ip", v4)
		opts.PublicIP = v4
	}
	if v6.IsValid() {
		log.Info("public IPv6 from the Node's annotation, in place of -public-ipv6", "annotation", opts.KubeAnnotationPrefix+kubesubnet.AnnNodePublicIPv6, "public-ipv6", v6)
		opts.PublicIPv6 = v6
	}
	return k, cfg, nil
}

// networkConfig reads the network configuration from the file named by
// -net-config-path when it was given or in Kubernetes mode, else from etcd,
// waiting for it there; waiting (when not nil) is told why it waits, and
// nil when the wait is over.
func networkConfig(ctx context.Context, opts options.Options, reg *registry.Registry, log *slog.Logger, waiting func(error)) (netconf.Config, error) {
	if waiting == nil {
		waiting = func(error) {}
	}
	if opts.NetConfigPathSet || opts.KubeSubnetMgr {
		data, err := os.ReadFile(opts.NetConfigPath)
		if err != nil {
			if opts.KubeSubnetMgr {
				return netconf.Config{}, fmt.Errorf("read the network config (-net-config-path; in kube mode the DaemonSet mounts net-conf.json from its ConfigMap): %w", err)
			}
			return netconf.Config{}, fmt.Errorf("read -net-config-path: %w", err)
		}
		cfg, err := netconf.Parse(data)
		if err != nil {
			return netconf.Config{}, fmt.Errorf("network config %s: %w", opts.NetConfigPath, err)
		}
		return cfg, nil
	}
	// The store may be up before anyone wrote the config, or briefly
	// unreachable: wait for it, as flanneld does, instead of dying in a
	// restart loop. Readiness stays false meanwhile.
	var lastErr string
	for {
		cfg, err := reg.NetworkConfig(ctx)
		if err == nil {
			waiting(nil)
			return cfg, nil
		}
		if ctx.Err() != nil {
			return netconf.Config{}, err
		}
		waiting(fmt.Errorf("waiting for the network config (etcd at %s): %w", strings.Join(opts.EtcdEndpoints, ","), err))
		if err.Error() != lastErr {
			log.Warn("waiting for the network config", "err", err)
			lastErr = err.Error()
		}
		select {
		case <-ctx.Done():
			return netconf.Config{}, err
		case <-time.After(time.Second):
		}
	}
}

// dataPath is the backend chosen by the network config, with what the
// lease must carry for peers to reach this node.
type dataPath struct {
	backend.Network
	data, v6data json.RawMessage // the lease's BackendData and BackendV6Data
	mtu          int             // pod MTU for subnet.env
	devices      []string        // IPv4 overlay devices the backend owns, for rp_filter
}

func newBackend(cfg netconf.Config, ifc iface.Iface, opts options.Options, log *slog.Logger, metrics prometheus.Registerer) (dataPath, error) {
	var v6 netip.Addr
	if cfg.EnableIPv6 {
		v6 = ifc.PublicV6
	}
	var v4 netip.Addr
	if cfg.EnableIPv4 {
		v4 = ifc.PublicIP
	}
	switch cfg.Backend.Type {
	case netconf.BackendHostGW:
		n, err := hostgw.New(hostgw.Config{
			ExtLinkIndex: ifc.Index,
			Resync:       opts.Resync,
			Logger:       log,
			Metrics:      metrics,
		})
		// host-gw adds no header: pods get the underlay MTU.
		return dataPath{Network: n, mtu: ifc.MTU}, err
	case netconf.BackendVXLAN:
		n, err := vxlan.New(vxlan.Config{
			Backend:      cfg.Backend.Raw,
			ExtLinkIndex: ifc.Index,
			ExtMTU:       ifc.MTU,
			PublicIP:     v4,
			PublicIPv6:   v6,
			NodeName:     opts.NodeName,
			StateDir:     opts.StateDir,
			Resync:       opts.Resync,
			Logger:       log,
			Metrics:      metrics,
		})
		if err != nil {
			return dataPath{}, err
		}
		vo, err := vxlan.ParseOptions(cfg.Backend.Raw)
		if err != nil {
			return dataPath{}, err
		}
		return dataPath{Network: n, data: n.BackendData(), v6data: n.BackendV6Data(), mtu: n.MTU(), devices: []string{vxlan.DeviceName(vo.VNI, false)}}, nil
	case netconf.BackendUDP:
		n, err := udp.New(udp.Config{
			Backend:      cfg.Backend.Raw,
			Network:      cfg,
			ExtLinkIndex: ifc.Index,
			ExtMTU:       ifc.MTU,
			PublicIP:     v4,
			Resync:       opts.Resync,
			Logger:       log,
			Metrics:      metrics,
		})
		if err != nil {
			return dataPath{}, err
		}
		return dataPath{Network: n, data: n.BackendData(), mtu: n.MTU(), devices: []string{udp.DeviceName}}, nil
	}
	return dataPath{}, fmt.Errorf("Backend.Type %q is not available in this version of loom: set \"Backend\": {\"Type\": \"vxlan\"} (or udp, host-gw) in the network config", cfg.Backend.Type)
}

// firewallMode is -firewall when given, else nftables when the network
// config sets EnableNFTables (flannel's key), else auto.
func firewallMode(opts options.Options, cfg netconf.Config) firewall.Mode {
	switch {
	case opts.Firewall != "":
		return firewall.Mode(opts.Firewall)
	case cfg.EnableNFTables:
		return firewall.ModeNFTables
	}
	return firewall.ModeAuto
}

// enableForwarding turns on IP forwarding for the enabled families: a node
// routes between its pods and its peers. A fresh host or network namespace
// has it off, and then nothing crosses nodes. It returns the keys it set.
func enableForwarding(cfg netconf.Config) ([]string, error) {
	var keys []string
	if cfg.EnableIPv4 {
		keys = append(keys, "net/ipv4/ip_forward")
	}
	if cfg.EnableIPv6 {
		keys = append(keys, "net/ipv6/conf/all/forwarding")
	}
	for _, k := range keys {
		if err := os.WriteFile(filepath.Join("/proc/sys", k), []byte("1"), 0o644); err != nil {
			return nil, fmt.Errorf("enable forwarding (%s): %w", k, err)
		}
	}
	return keys, nil
}

// keepLooseRPFilter keeps reverse-path filtering loose (2) on the overlay
// devices whenever strict filtering (1) would apply to them. The kernel
// uses the larger of conf/all and conf/<dev>, so a host hardened with
// all.rp_filter=1 drops pod packets arriving on the overlay whenever the
// route back to their source leaves by another interface (a DirectRouting
// peer that still encapsulates, asymmetric paths after a peer moves).
// Loose mode keeps the spoofing check (the source must be routable at all).
// The devices come and go with the backend's reconciler, so this is a loop.
func keepLooseRPFilter(ctx context.Context, devices []string, every time.Duration, log *slog.Logger) {
	if every <= 0 {
		every = 5 * time.Second
	}
	for {
		all := readSysctl("net/ipv4/conf/all/rp_filter")
		for _, dev := range devices {
			key := "net/ipv4/conf/" + dev + "/rp_filter"
			cur := readSysctl(key)
			if cur < 0 || cur == 2 || (cur == 0 && all != 1) {
				continue // no such device yet, already loose, or no filtering at all
			}
			if err := os.WriteFile(filepath.Join("/proc/sys", key), []byte("2"), 0o644); err != nil {
				log.Warn("set loose reverse-path filtering", "device", dev, "err", err)
				continue
			}
			log.Info("set loose reverse-path filtering on the overlay device", "device", dev, "was", cur, "all", all)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

// readSysctl returns a numeric sysctl, or -1 when it cannot be read.
func readSysctl(key string) float64 {
	data, err := os.ReadFile(filepath.Join("/proc/sys", key))
	if err != nil {
		return -1
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(string(data)), 64)
	if err != nil {
		return -1
	}
	return v
}

func addrLabel(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
