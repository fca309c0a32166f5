// Package vxlan is the vxlan backend: pods reach the pods of other nodes
// through the kernel's VXLAN overlay, with flannel's devices, entries and
// wire format, so loom and flanneld nodes mix in one cluster.
//
// Design notes.
//
// Kernel objects owned, per enabled address family (IPv4: flannel.<VNI>,
// local = PublicIP; IPv6: flannel-v6.<VNI>, local = PublicIPv6; one code path
// for both):
//
//	device   flannel.1 type vxlan id 1 dstport 8472 local <PublicIP> dev <ext> nolearning
//	         address <VtepMAC> mtu <underlay − 50> tx-checksum-ip-generic off, up
//	address  <own subnet>.0/32 dev flannel.1                (IPv6: <own subnet>::/128)
//	peer     neigh <peer subnet .0> lladdr <peer VtepMAC> dev flannel.1 nud permanent
//	         fdb   <peer VtepMAC> dev flannel.1 dst <peer PublicIP> self permanent
//	         route <peer subnet> via <peer subnet .0> dev flannel.1 onlink proto 108
//	or, with DirectRouting, for a peer whose PublicIP is on-link on the underlay:
//	         route <peer subnet> via <peer PublicIP> dev <ext> proto 108
//
// Why this shape: it is flannel's, so the packets are flannel's too. A pod's
// packet for a peer subnet takes the route; its gateway, the peer subnet's
// first address (which is the peer's own flannel.1 address), resolves through
// the static neighbour to the peer's VTEP MAC; the VXLAN driver finds that MAC
// in its FDB, with the peer's public IP, and sends the Ethernet frame inside
// UDP to port 8472 with the VNI. The peer's device, whose MAC the frame is
// addressed to, decapsulates it and routes the inner packet to the pod. Every
// node is told every peer up front, so nothing is learned and nothing is
// flooded: no ARP and no unknown unicast ever crosses the overlay. The /32
// (/128) address gives the device no connected subnet and no broadcast route;
// it is the source address of host-to-pod traffic, so replies come back.
//
// Mechanism: one reconciler (package reconcile) per object kind: devices with
// their attributes, address and offload (package links), neighbours (package
// neigh), FDB entries (package fdb) and routes (package routes). Each diffs
// its desired state against what loom owns and applies the difference, on
// peer events (partial syncs of that peer's keys), netlink events and a
// periodic resync. The desired state comes from the peer cache through the
// pure function plan, computed once per change of the peers (or of the
// underlay and devices it reads) and indexed by key, so a partial sync looks
// at nothing but its keys. The four run in one reconcile.Group, one
// goroutine, in this order within every pass:
//
//  1. Devices first; the others start once the device reconciler has synced
//     fully. A route via flannel.1 onlink needs the device up (the kernel
//     refuses it otherwise), and neighbours and FDB entries need the device.
//  2. Neighbours and FDB entries next, routes last, so a new peer's route
//     lands after its neighbour and FDB entry, in the same pass, as flannel
//     orders them. Handle triggers the three in one Group.Batch, so they are
//     served by one pass. Nothing depends on the order: a packet routed
//     before its neighbour exists waits in the kernel's queue of the
//     unresolved neighbour, which the permanent entry releases.
//  3. Whenever the link reconciler creates or changes a device (someone
//     deleted it, took it down, changed its MAC), the three others are asked
//     for a full sync (replayingLinks): deleting a device drops everything on
//     it, taking it down flushes its neighbours and IPv4 routes (without a
//     route event), and changing its MAC flushes its neighbours, permanent
//     ones included. Until the device is back and up, their desired-state
//     functions fail, which makes a sync touch nothing.
//
// VTEP MAC: derived from the node name and the device name (VtepMAC), or
// taken from Config.StateDir when one is persisted there, and persisted
// there. It stays the same across agent restarts, reboots and re-created
// devices, so peers' neighbour and FDB entries never go stale. (flanneld gives
// a new device a random MAC, kept only in Kubernetes annotations, and its
// peers send to the old MAC until the new lease reaches them.)
//
// MTU: flannel.<VNI> gets the underlay MTU − 50 (outer Ethernet 14, IPv4 20,
// UDP 8, VXLAN 8) and flannel-v6.<VNI> the underlay MTU − 70 (IPv6 40, not
// 20: flannel takes 50 for both and overflows an IPv6 underlay by 20 bytes).
// Pods get the smaller of the two (MTU). Backend.MTU, as in flannel, stands
// for the underlay's MTU in that sum.
//
// Kernel quirk: TX checksum offload is turned off on the devices; the reason
// is at the line that does it, in desiredLinks.
//
// Scale: one neighbour, one FDB entry and one route per peer and family, so
// O(peers) kernel objects. Desired-state work is O(peers) per change of the
// peers (a batch of watch events), with each lease's backend data decoded
// once when it arrives; a sync is one dump per kind (5,000 peers: a few
// milliseconds) and one request per changed object. Devices: one per
// family, whatever the cluster size. The kernel's own cost dominates a cold
// start: every route has its own gateway, and IPv4 keeps such routes' next
// hops (fib_info) in one hash chain per device and protocol, which each
// insertion walks, so adding N routes is O(N²) in the kernel (5,000 routes:
// about 0.4 s of kernel time here, against 0.1 s for 5,000 routes sharing
// one gateway). Only nexthop objects (RTA_NH_ID) would avoid that, at the
// cost of routes that no longer look like flannel's.
//
// Shutdown leaves everything in place, so pods keep working while the agent
// restarts; the next agent finds the state as it should be and changes
// nothing.
package vxlan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/loomnet/loom/internal/backend"
	"github.com/loomnet/loom/internal/backend/fdb"
	"github.com/loomnet/loom/internal/backend/links"
	"github.com/loomnet/loom/internal/backend/neigh"
	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Type is the BackendType this backend writes into its lease and accepts
// from peers.
const Type = netconf.BackendVXLAN

// The bytes VXLAN adds to a pod's packet: outer Ethernet 14, outer IP header
// (20 or 40), UDP 8, VXLAN 8.
const (
	overheadIPv4 = 50
	overheadIPv6 = 70
)

// minIPv6MTU is the smallest MTU IPv6 works on (RFC 8200); the kernel
// disables IPv6 on a link below it.
const minIPv6MTU = 1280

// DeviceName is the VXLAN device of a family, as flannel names it:
// flannel.<VNI> for IPv4, flannel-v6.<VNI> for IPv6.
func DeviceName(vni int, v6 bool) string {
	if v6 {
		return fmt.Sprintf("flannel-v6.%d", vni)
	}
	return fmt.Sprintf("flannel.%d", vni)
}

// Config configures a Network.
type Config struct {
	// Backend is the network config's Backend object (netconf.Backend.Raw),
	// decoded by ParseOptions.
	Backend json.RawMessage
	// ExtLinkIndex is the underlay interface (flannel's -iface), chosen by
	// the agent. Required.
	ExtLinkIndex int
	// ExtMTU is its MTU. Required unless Backend sets MTU.
	ExtMTU int
	// PublicIP is this node's IPv4 underlay address, the local end of
	// flannel.<VNI>; invalid when IPv4 is disabled in the network config.
	PublicIP netip.Addr
	// PublicIPv6 is this node's IPv6 underlay address, the local end of
	// flannel-v6.<VNI>; invalid when IPv6 is disabled (or the node has no
	// IPv6 address).
	PublicIPv6 netip.Addr
	// NodeName identifies the node; the VTEP MACs are derived from it.
	// Required.
	NodeName string
	// StateDir, when set, is where the VTEP MACs are persisted
	// (<StateDir>/flannel.1.mac); a valid MAC found there is used.
	StateDir string
	// NetNSPath is the network namespace to program, e.g. /run/netns/x;
	// empty means the agent's own.
	NetNSPath string
	// Resync is the period of full resyncs; 0 means 5 s.
	Resync time.Duration
	// KernelRelease decides the checksum workaround (uname -r); "" means
	// the running kernel's. Tests set it.
	KernelRelease string
	// Logger; nil means slog.Default().
	Logger *slog.Logger
	// Metrics, when set, receives the backend's collectors (reconcile
	// counters for links, neighbours, FDB entries and routes; peer gauges).
	// Use the agent's registry.
	Metrics prometheus.Registerer
}

// family is one of this node's VXLAN devices.
type family struct {
	v6    bool
	dev   string
	local netip.Addr
	mac   net.HardwareAddr
	mtu   int
}

// Network is the vxlan data path. It implements backend.Network.
type Network struct {
	cfg  Config
	opts Options
	log  *slog.Logger
	fams []family // the enabled families, IPv4 first

	// The reconcilers, run in this order by group.
	group *reconcile.Group
	link  *reconcile.Reconciler[string, links.Device]
	neigh *reconcile.Reconciler[neigh.Key, neigh.Neigh]
	fdb   *reconcile.Reconciler[fdb.Key, fdb.Entry]
	route *reconcile.Reconciler[routes.Key, routes.Route]

	// Peer gauges, set by the route reconciler's goroutine at each sync.
	subnets *prometheus.GaugeVec // by path: vxlan, direct
	skipped *prometheus.GaugeVec // by reason: other-backend, unusable

	mu sync.Mutex // guards local, peers and gen
	// local is our own lease (nil until SetLocal): never programmed.
	local *lease.Lease
	// peers holds every other lease by key, whatever its backend: plan
	// decides what each gets.
	peers map[string]peer
	// gen counts the changes of local and peers, so a plan knows whether
	// it is still current.
	gen uint64

	// Touched only by the goroutine that runs group (through the desired
	// state functions):
	// planned is the last plan, indexed; reused while current.
	planned *planned
	// reported holds the peer problems logged so far, so each is logged
	// once when it appears and once when it goes.
	reported map[string]problem
	// direct holds the subnets routed directly at the last route sync.
	direct []netip.Prefix
}

// planned is the desired state for one version of the peers and of the
// world, indexed for the reconcilers.
type planned struct {
	gen      uint64
	w        world
	d        desired
	neighs   *reconcile.State[neigh.Key, neigh.Neigh]
	fdbs     *reconcile.State[fdb.Key, fdb.Entry]
	routes   *reconcile.State[routes.Key, routes.Route]
	reported bool // its problems have been reported
}

var _ backend.Network = (*Network)(nil)

// New checks cfg, derives (or loads) the VTEP MACs, and returns a Network.
// Nothing is programmed until Run.
func New(cfg Config) (*Network, error) {
	opts, err := ParseOptions(cfg.Backend)
	if err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	n := &Network{
		cfg:      cfg,
		opts:     opts,
		log:      cfg.Logger.With("backend", Type),
		peers:    make(map[string]peer),
		reported: make(map[string]problem),
		group:    reconcile.NewGroup(0),
	}
	if n.fams, err = families(cfg, opts, n.log); err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}

	// Fail early on a wrong interface or namespace.
	err = withHandle(cfg.NetNSPath, func(h *netlink.Handle) error {
		_, err := extLink(h, cfg.ExtLinkIndex)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}

	mk := func(name string) reconcile.Config {
		return reconcile.Config{Name: name, Resync: cfg.Resync, Group: n.group, Logger: n.log}
	}
	if n.link, err = reconcile.New[string, links.Device](mk("link")); err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}
	if n.neigh, err = reconcile.New[neigh.Key, neigh.Neigh](mk("neigh")); err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}
	if n.fdb, err = reconcile.New[fdb.Key, fdb.Entry](mk("fdb")); err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}
	if n.route, err = reconcile.New[routes.Key, routes.Route](mk("route")); err != nil {
		return nil, fmt.Errorf("vxlan: %w", err)
	}

	n.subnets = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "loom_vxlan_peer_subnets",
		Help: "Peer subnets programmed, by path: vxlan (encapsulated) or direct (DirectRouting).",
	}, []string{"path"})
	n.skipped = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "loom_vxlan_peers_skipped",
		Help: "Peers with a subnet left unprogrammed, by reason (other-backend, unusable); the log says why.",
	}, []string{"reason"})
	if cfg.Metrics != nil {
		for _, c := range []prometheus.Collector{
			n.link.Collector(), n.neigh.Collector(), n.fdb.Collector(), n.route.Collector(), n.subnets, n.skipped,
		} {
			if err := cfg.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("vxlan: register metrics: %w", err)
			}
		}
	}
	return n, nil
}

// families checks the addresses and MTUs of cfg and describes the device of
// each enabled family.
func families(cfg Config, opts Options, log *slog.Logger) ([]family, error) {
	switch {
	case cfg.ExtLinkIndex <= 0:
		return nil, errors.New("Config.ExtLinkIndex is not set: pass the index of the underlay interface (-iface)")
	case cfg.NodeName == "":
		return nil, errors.New("Config.NodeName is empty: the VTEP MAC is derived from the node name")
	case cfg.Resync < 0:
		return nil, fmt.Errorf("Config.Resync %v is negative", cfg.Resync)
	case !cfg.PublicIP.IsValid() && !cfg.PublicIPv6.IsValid():
		return nil, errors.New("neither Config.PublicIP nor Config.PublicIPv6 is set: a VXLAN device needs this node's underlay address")
	case cfg.PublicIP.IsValid() && !cfg.PublicIP.Is4():
		return nil, fmt.Errorf("Config.PublicIP %s is not an IPv4 address: put IPv6 in PublicIPv6", cfg.PublicIP)
	case cfg.PublicIPv6.IsValid() && (!cfg.PublicIPv6.Is6() || cfg.PublicIPv6.Is4In6()):
		return nil, fmt.Errorf("Config.PublicIPv6 %s is not an IPv6 address", cfg.PublicIPv6)
	}
	base, err := underlayMTU(opts.MTU, cfg.ExtMTU)
	if err != nil {
		return nil, err
	}
	var fams []family
	for _, f := range []struct {
		v6    bool
		local netip.Addr
	}{{false, cfg.PublicIP}, {true, cfg.PublicIPv6}} {
		if !f.local.IsValid() {
			continue
		}
		mtu, err := deviceMTU(base, f.v6)
		if err != nil {
			return nil, err
		}
		dev := DeviceName(opts.VNI, f.v6)
		fams = append(fams, family{v6: f.v6, dev: dev, local: f.local, mtu: mtu,
			mac: vtepMAC(cfg.StateDir, cfg.NodeName, dev, log)})
	}
	return fams, nil
}

// underlayMTU is the MTU the encapsulated packets may use: Backend.MTU when
// set (flannel's meaning), else the underlay interface's.
func underlayMTU(opt, ext int) (int, error) {
	switch {
	case opt == 0 && ext <= 0:
		return 0, fmt.Errorf("Config.ExtMTU %d is not an MTU: pass the underlay interface's MTU, or set Backend.MTU", ext)
	case opt == 0:
		return ext, nil
	case ext > 0 && opt > ext:
		return 0, fmt.Errorf("Backend.MTU %d is above the underlay interface's MTU %d: encapsulated packets would not fit; lower it or leave it out", opt, ext)
	}
	return opt, nil
}

// deviceMTU is the MTU of the VXLAN device over an underlay of MTU base.
func deviceMTU(base int, v6 bool) (int, error) {
	if v6 {
		mtu := base - overheadIPv6
		if mtu < minIPv6MTU {
			return 0, fmt.Errorf("an underlay MTU of %d leaves %d for pods over an IPv6 underlay, below IPv6's minimum %d: "+
				"raise the underlay's MTU (and Backend.MTU if set) to at least %d", base, mtu, minIPv6MTU, minIPv6MTU+overheadIPv6)
		}
		return mtu, nil
	}
	mtu := base - overheadIPv4
	if mtu < minPodMTU {
		return 0, fmt.Errorf("an underlay MTU of %d leaves %d for pods, below IPv4's minimum %d: raise the underlay's MTU (and Backend.MTU if set)",
			base, mtu, minPodMTU)
	}
	return mtu, nil
}

// BackendData is the vxlan part of this node's lease for IPv4, with
// flannel's field names: {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}. nil when
// IPv4 is disabled. The agent puts it in the lease before acquiring it.
func (n *Network) BackendData() json.RawMessage { return n.backendData(false) }

// BackendV6Data is the same for IPv6 (lease.Attrs.BackendV6Data, as flannel
// writes it for flannel-v6.<VNI>). nil when IPv6 is disabled.
func (n *Network) BackendV6Data() json.RawMessage { return n.backendData(true) }

func (n *Network) backendData(v6 bool) json.RawMessage {
	for _, f := range n.fams {
		if f.v6 == v6 {
			b, _ := json.Marshal(backendData{VNI: n.opts.VNI, VtepMAC: f.mac.String()}) // cannot fail: an int and a string
			return b
		}
	}
	return nil
}

// MTU is the MTU pods get (FLANNEL_MTU in subnet.env): the smallest MTU of
// this node's VXLAN devices.
func (n *Network) MTU() int {
	m := 0
	for _, f := range n.fams {
		if m == 0 || f.mtu < m {
			m = f.mtu
		}
	}
	return m
}

// SetLocal records our own lease: it decides the devices' addresses, and it
// is never programmed as a peer.
func (n *Network) SetLocal(own lease.Lease) {
	n.mu.Lock()
	n.local = &own
	delete(n.peers, own.Key())
	n.gen++
	n.mu.Unlock()
	n.group.Batch(func() {
		n.link.TriggerFull()
		n.neigh.TriggerFull()
		n.fdb.TriggerFull()
		n.route.TriggerFull()
	})
}

// Handle applies a batch of peer events to the cache and asks for a sync of
// exactly the neighbours, FDB entries and routes of the peers involved, in
// one pass.
func (n *Network) Handle(events []lease.Event) {
	// Decode the backend data before taking the lock: a list at start
	// brings thousands of leases.
	ps := make([]peer, len(events))
	for i, ev := range events {
		if ev.Type == lease.Added {
			ps[i] = newPeer(ev.Lease.Key(), ev.Lease)
		} else {
			ps[i].key = ev.Lease.Key()
		}
	}
	var ks keys
	n.mu.Lock()
	for i, ev := range events {
		// A lease under this node's own key or name is kept too; plan
		// leaves it out while it is this node's. After a partition longer
		// than the TTL another node may take this node's old subnet while
		// this node moves to a new one: that lease arrives while it still
		// looks like ours and must be programmed once SetLocal says
		// otherwise.
		id := ps[i].key
		if old, ok := n.peers[id]; ok {
			ks.add(n.fams, old)
		}
		switch ev.Type {
		case lease.Added:
			n.peers[id] = ps[i]
			ks.add(n.fams, ps[i])
		case lease.Removed:
			delete(n.peers, id)
		default:
			n.log.Error("ignoring a lease event of unknown type", "type", ev.Type, "subnet", id)
		}
	}
	n.gen++
	n.mu.Unlock()
	n.group.Batch(func() {
		n.neigh.Trigger(ks.neigh...)
		n.fdb.Trigger(ks.fdb...)
		n.route.Trigger(ks.route...)
	})
}

// keys are the reconcile keys a set of leases can give rise to.
type keys struct {
	neigh []neigh.Key
	fdb   []fdb.Key
	route []routes.Key
}

func (ks *keys) add(fams []family, p peer) {
	for _, f := range fams {
		lg := legOf(p.l, f.v6)
		if !lg.subnet.IsValid() {
			continue
		}
		ks.neigh = append(ks.neigh, neigh.Key{Dev: f.dev, IP: lg.subnet.Addr()})
		if d := p.data(f.v6); d.err == nil {
			ks.fdb = append(ks.fdb, fdb.KeyOf(f.dev, d.mac))
		}
		ks.route = append(ks.route, routes.Route{Dst: lg.subnet}.Key())
	}
}

// Ready reports whether every device, neighbour, FDB entry and route has
// been programmed at least once.
func (n *Network) Ready() bool {
	return n.link.Ready() && n.neigh.Ready() && n.fdb.Ready() && n.route.Ready()
}

// Run programs the kernel until ctx ends, then returns nil and leaves
// everything in place. It fails only when the namespace or an event
// subscription cannot be opened. Call SetLocal first: until then the devices
// cannot be configured and the Network is not ready.
func (n *Network) Run(ctx context.Context) error {
	nsh, closeNS, err := openNS(n.cfg.NetNSPath)
	if err != nil {
		return fmt.Errorf("vxlan: %w", err)
	}
	defer closeNS()
	// One handle: the four reconcilers take turns on one goroutine (a
	// handle is not safe for concurrent use; the event watchers have
	// sockets of their own).
	h, err := netlink.NewHandleAt(nsh, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("vxlan: netlink handle: %w", err)
	}
	defer h.Close()

	var devs []string
	for _, f := range n.fams {
		devs = append(devs, f.dev)
	}
	// Both device names of this VNI are loom's, so a device of a family
	// that has been disabled since it was made is removed.
	owned := []string{DeviceName(n.opts.VNI, false), DeviceName(n.opts.VNI, true)}
	lk, err := links.NewKind(links.Config{Handle: h, NetNSPath: n.cfg.NetNSPath, Logger: n.log,
		Owns: func(name string) bool { return slices.Contains(owned, name) }})
	if err != nil {
		return fmt.Errorf("vxlan: %w", err)
	}
	defer lk.Close()
	nk, err := neigh.NewKind(neigh.Config{Handle: h, NetNSPath: n.cfg.NetNSPath, Devices: devs, Logger: n.log})
	if err != nil {
		return fmt.Errorf("vxlan: %w", err)
	}
	fk, err := fdb.NewKind(fdb.Config{Handle: h, NetNSPath: n.cfg.NetNSPath, Devices: devs, Logger: n.log})
	if err != nil {
		return fmt.Errorf("vxlan: %w", err)
	}
	rk, err := routes.NewKind(routes.Config{Handle: h, NetNSPath: n.cfg.NetNSPath,
		UnderlayLink: n.cfg.ExtLinkIndex, Logger: n.log})
	if err != nil {
		return fmt.Errorf("vxlan: %w", err)
	}

	n.log.Info("programming the VXLAN overlay", "vni", n.opts.VNI, "port", n.opts.Port, "devices", devs,
		"direct_routing", n.opts.DirectRouting, "mtu", n.MTU(), "namespace", n.cfg.NetNSPath)
	err = n.group.Run(ctx,
		n.link.Stage(replayingLinks{Kind: lk, replay: n.replay}, func() (*reconcile.State[string, links.Device], error) {
			ds, err := n.desiredLinks()
			if err != nil {
				return nil, err
			}
			return reconcile.NewState(lk.Key, ds), nil
		}),
		n.neigh.Stage(nk, func() (*reconcile.State[neigh.Key, neigh.Neigh], error) {
			p, err := n.current(h)
			if err != nil {
				return nil, err
			}
			return p.neighs, nil
		}),
		n.fdb.Stage(fk, func() (*reconcile.State[fdb.Key, fdb.Entry], error) {
			p, err := n.current(h)
			if err != nil {
				return nil, err
			}
			return p.fdbs, nil
		}),
		n.route.Stage(rk, func() (*reconcile.State[routes.Key, routes.Route], error) { return n.desiredRoutes(h) }),
	)
	if err != nil {
		return fmt.Errorf("vxlan: %w", err)
	}
	return nil
}

// replay asks for a full sync of everything that lives on the devices.
func (n *Network) replay() {
	n.neigh.TriggerFull()
	n.fdb.TriggerFull()
	n.route.TriggerFull()
}

// replayingLinks is the link Kind, plus a replay of the objects on a device
// after the device is created or changed (see the package notes, item 3).
type replayingLinks struct {
	*links.Kind
	replay func()
}

func (k replayingLinks) Create(d links.Device) error {
	err := k.Kind.Create(d)
	if err == nil {
		k.replay()
	}
	return err
}

func (k replayingLinks) Update(d links.Device) error {
	err := k.Kind.Update(d)
	if err == nil {
		k.replay()
	}
	return err
}

// localLease returns our lease, or an error before SetLocal.
func (n *Network) localLease() (lease.Lease, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.local == nil {
		return lease.Lease{}, errors.New("own lease not set: the agent calls SetLocal before Run")
	}
	return *n.local, nil
}

// desiredLinks computes this node's devices.
func (n *Network) desiredLinks() ([]links.Device, error) {
	local, err := n.localLease()
	if err != nil {
		return nil, err
	}
	var ds []links.Device
	for _, f := range n.fams {
		own := legOf(&local, f.v6)
		if !own.subnet.IsValid() {
			field := "PublicIP"
			if f.v6 {
				field = "PublicIPv6"
			}
			return nil, fmt.Errorf("this node's lease %s has no %s subnet, but Config.%s is set: "+
				"the agent passes the public address of the families the network config enables only", local, famName(f.v6), field)
		}
		ds = append(ds, links.Device{
			Name:          f.dev,
			VNI:           n.opts.VNI,
			Port:          n.opts.Port,
			Local:         f.local,
			UnderlayIndex: n.cfg.ExtLinkIndex,
			Learning:      n.opts.Learning,
			GBP:           n.opts.GBP,
			MAC:           f.mac,
			MTU:           f.mtu,
			Addrs:         []netip.Prefix{netip.PrefixFrom(own.subnet.Addr(), own.subnet.Addr().BitLen())},
			// TX checksum offload off where the kernel has the VXLAN
			// checksum bug. When netfilter NATs the encapsulated UDP
			// packet (kube-proxy's MASQUERADE --random-fully matched it in
			// Kubernetes 1.17 and 1.18; a NAT between nodes does too),
			// kernels without the fix (before 5.7, 5.6.13, 5.4.41,
			// 4.19.123, 4.14.181) send it with a wrong UDP checksum. The
			// peer drops it, and TCP's SYN retries (1+2+4+8+16+32 s) make
			// the 63-second delays to Services of kubernetes#88986/#91519
			// (flannel PR #1282). On fixed kernels offload stays on:
			// computing checksums in software costs ~5x throughput here.
			TxChecksum: n.txChecksum(),
			Up:         true,
		})
	}
	return ds, nil
}

// txChecksum is whether the devices keep TX checksum offload: the
// ChecksumOffload option when set, else on unless the kernel has the bug.
func (n *Network) txChecksum() bool {
	if n.opts.ChecksumOffload != nil {
		return *n.opts.ChecksumOffload
	}
	release := n.cfg.KernelRelease
	if release == "" {
		release = kernelRelease()
	}
	return !hasChecksumBug(release)
}

func famName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// world reads what plan needs from the kernel: the underlay's addresses and
// the devices, which must exist and be up.
func (n *Network) world(h *netlink.Handle) (world, error) {
	w := world{vni: n.opts.VNI, directRouting: n.opts.DirectRouting}
	link, err := extLink(h, n.cfg.ExtLinkIndex)
	if err != nil {
		return world{}, err
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return world{}, fmt.Errorf("addresses of %s: %w", link.Attrs().Name, err)
	}
	w.ext = extIface{name: link.Attrs().Name, index: link.Attrs().Index}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			bits, _ := a.Mask.Size()
			w.ext.addrs = append(w.ext.addrs, netip.PrefixFrom(ip.Unmap(), bits))
		}
	}
	for _, f := range n.fams {
		l, err := h.LinkByName(f.dev)
		if err != nil {
			return world{}, fmt.Errorf("device %s is missing (the link reconciler re-creates it): %w", f.dev, err)
		}
		if l.Attrs().Flags&net.FlagUp == 0 {
			return world{}, fmt.Errorf("device %s is down (the link reconciler sets it up)", f.dev)
		}
		w.devs = append(w.devs, famDev{v6: f.v6, name: f.dev, index: l.Attrs().Index})
	}
	return w, nil
}

// current returns the plan for the peers and the world as they are now:
// the last one if neither changed since, else a new one.
func (n *Network) current(h *netlink.Handle) (*planned, error) {
	w, err := n.world(h)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	if n.local == nil {
		n.mu.Unlock()
		return nil, errors.New("own lease not set: the agent calls SetLocal before Run")
	}
	if p := n.planned; p != nil && p.gen == n.gen && p.w.equal(w) {
		n.mu.Unlock()
		return p, nil
	}
	gen, local := n.gen, *n.local
	peers := make([]peer, 0, len(n.peers))
	for _, p := range n.peers {
		peers = append(peers, p)
	}
	n.mu.Unlock()

	d := planPeers(local, peers, w)
	n.planned = &planned{gen: gen, w: w, d: d,
		neighs: reconcile.NewState(neigh.Neigh.Key, d.neighs),
		fdbs:   reconcile.NewState(fdb.Entry.Key, d.fdbs),
		routes: reconcile.NewState(routes.Route.Key, d.routes),
	}
	return n.planned, nil
}

// desiredRoutes returns the routes, reports peer problems of a new plan,
// and when the set of directly routed subnets changed (an underlay address
// came or went), asks for a full sync of neighbours and FDB entries, which
// follow it.
func (n *Network) desiredRoutes(h *netlink.Handle) (*reconcile.State[routes.Key, routes.Route], error) {
	p, err := n.current(h)
	if err != nil {
		return nil, err
	}
	if !p.reported {
		n.report(p.d)
		p.reported = true
	}
	if !slices.Equal(p.d.direct, n.direct) {
		n.direct = p.d.direct
		n.neigh.TriggerFull()
		n.fdb.TriggerFull()
	}
	return p.routes, nil
}

// report logs problems that appeared or changed since the last sync, and
// those that went (resolved, or the peer left); it updates the gauges.
func (n *Network) report(d desired) {
	now := make(map[string]problem, len(d.problems))
	skipped := map[string]map[string]bool{skipOtherBackend: {}, skipUnusable: {}}
	for _, p := range d.problems {
		now[p.id()] = p
		skipped[p.kind][p.peer] = true
		if old, ok := n.reported[p.id()]; ok && old == p {
			continue
		}
		attrs := []any{"node", p.node, "lease", p.peer, "fix", p.fix}
		if p.subnet.IsValid() {
			attrs = append(attrs, "subnet", p.subnet)
		}
		if p.kind == skipOtherBackend {
			n.log.Warn("skipping a peer: "+p.reason, attrs...)
		} else {
			n.log.Error("no route to a peer subnet: "+p.reason, attrs...)
		}
	}
	for id, old := range n.reported {
		if _, ok := now[id]; !ok {
			n.log.Info("peer problem gone (resolved, or the peer left)", "node", old.node, "lease", old.peer, "was", old.reason)
		}
	}
	n.reported = now
	for reason, peers := range skipped {
		n.skipped.WithLabelValues(reason).Set(float64(len(peers)))
	}
	n.subnets.WithLabelValues("vxlan").Set(float64(d.vxlan))
	n.subnets.WithLabelValues("direct").Set(float64(len(d.direct)))
}

// openNS opens the namespace at path; "" means the agent's own (netns.None,
// which netlink takes as "where the caller is").
func openNS(path string) (netns.NsHandle, func(), error) {
	if path == "" {
		return netns.None(), func() {}, nil
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		return netns.None(), nil, fmt.Errorf("open namespace %s: %w", path, err)
	}
	return h, func() { h.Close() }, nil
}

// withHandle runs fn with a netlink handle bound to the namespace at path.
func withHandle(path string, fn func(*netlink.Handle) error) error {
	nsh, closeNS, err := openNS(path)
	if err != nil {
		return err
	}
	defer closeNS()
	h, err := netlink.NewHandleAt(nsh, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink handle: %w", err)
	}
	defer h.Close()
	return fn(h)
}

func extLink(h *netlink.Handle, index int) (netlink.Link, error) {
	l, err := h.LinkByIndex(index)
	if err != nil {
		return nil, fmt.Errorf("underlay interface #%d: %w", index, err)
	}
	return l, nil
}
