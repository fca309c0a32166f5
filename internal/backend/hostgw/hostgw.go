// Package hostgw is the host-gw backend: every node is the gateway for its
// own pod subnet, and every other node reaches that subnet through a plain
// route.
//
// Design notes.
//
// Kernel objects owned: one route per peer and address family,
//
//	<peer Subnet>     via <peer PublicIP>   dev <ext iface>   proto 108
//	<peer IPv6Subnet> via <peer PublicIPv6> dev <ext iface>   proto 108
//
// the same routes flannel's host-gw installs, so loom and flanneld nodes mix.
// Nothing else: no device, no neighbour entry (the kernel resolves the
// gateway by ARP/NDP on the underlay), no encapsulation, so host-gw is the
// fastest backend and the one with the fewest moving parts. Forwarding and
// masquerade rules are the firewall package's.
//
// Why it works only on one L2 segment: a route's gateway must be on-link
// (inside a subnet of the ext interface). A peer whose PublicIP is behind a
// router cannot be a next hop; flannel logs a bare netlink error for it.
// loom checks on-link-ness itself, from the ext interface's addresses at
// each sync, and for such a peer logs one error naming the node, its IP and
// the fix (use vxlan, or put the nodes on one subnet), installs no route for
// it, and carries on with the others. When an address change makes the peer
// on-link, the next full sync (triggered by the connected-route event) adds
// the route.
//
// Mechanism: Handle updates the peer cache and triggers a partial sync of
// that peer's keys (old and new subnets), so a peer event changes only that
// peer's routes. The desired routes come from the cache through a pure
// function, plan, computed once per change of the peers or of the ext
// interface's addresses and indexed by key (a partial sync looks at its keys
// only); the reconciler diffs them against the routes with loom's protocol
// and applies the difference; see package reconcile for the triggers and
// package routes for ownership and events.
//
// Quirk: IPv6 addresses are flushed when their link goes down (unless
// net.ipv6.conf.<if>.keep_addr_on_down=1). After a NIC flap, IPv6 peers stop
// being on-link until the address is back; loom then logs them as not on-link
// and drops their routes rather than fail every sync, and re-adds them when
// the address returns.
//
// Scale: one route per peer and family; desired state is O(peers) to
// compute, a sync is one route dump plus one request per changed route.
// The kernel's FIB handles hundreds of thousands of routes; a thousand-node
// cluster is a thousand routes.
package hostgw

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/loomnet/loom/internal/backend"
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
const Type = netconf.BackendHostGW

// fixNotOnLink is the advice logged with a peer whose PublicIP is not on-link.
const fixNotOnLink = "host-gw needs every node on one L2 segment: use the vxlan backend, " +
	"or put the nodes on one subnet (or set -iface/-public-ip so PublicIP is the address on the shared segment)"

// Config configures a Network.
type Config struct {
	// ExtLink names the underlay interface (flannel's -iface), e.g. "eth0".
	ExtLink string
	// ExtLinkIndex identifies the underlay interface when ExtLink is empty.
	ExtLinkIndex int
	// NetNSPath is the network namespace to program, e.g. /run/netns/x;
	// empty means the agent's own.
	NetNSPath string
	// Resync is the period of full resyncs; 0 means 5 s.
	Resync time.Duration
	// Table is the routing table for peer routes; 0 means main.
	Table int
	// Logger; nil means slog.Default().
	Logger *slog.Logger
	// Metrics, when set, receives the backend's collectors (reconcile
	// counters for routes, peer gauges). Use the agent's registry.
	Metrics prometheus.Registerer
}

// Network is the host-gw data path. It implements backend.Network.
type Network struct {
	cfg    Config
	log    *slog.Logger
	routes *reconcile.Reconciler[routes.Key, routes.Route]

	// Gauges for metrics, written by plan's caller at each sync.
	peersRouted     atomic.Int64
	peersUnroutable atomic.Int64

	mu sync.Mutex // guards local, peers and gen
	// local is our own lease (nil until SetLocal): never a route target.
	local *lease.Lease
	// peers are the host-gw peers by lease key.
	peers map[string]lease.Lease
	// gen counts the changes of local and peers, so a plan knows whether
	// it is still current.
	gen uint64

	// Touched only by the reconciler's goroutine (through desired):
	// planned is the last plan, reused while current.
	planned *planned
	// reported holds the peer problems logged so far, so each is logged
	// once when it appears and once when it is resolved.
	reported map[string]problem
}

// planned is the desired state for one version of the peers and of the ext
// interface.
type planned struct {
	gen    uint64
	ext    extIface
	routes *reconcile.State[routes.Key, routes.Route]
}

var _ backend.Network = (*Network)(nil)

// New checks cfg, resolves the ext interface in its namespace and returns a
// Network. Nothing is programmed until Run.
func New(cfg Config) (*Network, error) {
	if cfg.ExtLink == "" && cfg.ExtLinkIndex <= 0 {
		return nil, errors.New("host-gw: no underlay interface: set Config.ExtLink (e.g. \"eth0\") or Config.ExtLinkIndex")
	}
	if cfg.Resync < 0 {
		return nil, fmt.Errorf("host-gw: Resync %v is negative", cfg.Resync)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	n := &Network{
		cfg:      cfg,
		log:      cfg.Logger.With("backend", Type),
		peers:    make(map[string]lease.Lease),
		reported: make(map[string]problem),
	}
	var err error
	n.routes, err = reconcile.New[routes.Key, routes.Route](reconcile.Config{
		Name:   "route",
		Resync: cfg.Resync,
		Logger: n.log,
	})
	if err != nil {
		return nil, fmt.Errorf("host-gw: %w", err)
	}

	// Fail early on a wrong interface name or namespace.
	err = n.withHandle(func(h *netlink.Handle) error {
		_, err := n.extLink(h)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("host-gw: %w", err)
	}

	if cfg.Metrics != nil {
		cs := []prometheus.Collector{
			n.routes.Collector(),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "loom_hostgw_peers_routed",
				Help: "host-gw peers with a route for every subnet they lease.",
			}, func() float64 { return float64(n.peersRouted.Load()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "loom_hostgw_peers_unroutable",
				Help: "host-gw peers lacking a route (not on-link, no public IP...); the log says why.",
			}, func() float64 { return float64(n.peersUnroutable.Load()) }),
		}
		for _, c := range cs {
			if err := cfg.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("host-gw: register metrics: %w", err)
			}
		}
	}
	return n, nil
}

// withHandle runs fn with a netlink handle bound to the Network's namespace.
func (n *Network) withHandle(fn func(*netlink.Handle) error) error {
	nsh := netns.None()
	if n.cfg.NetNSPath != "" {
		var err error
		if nsh, err = netns.GetFromPath(n.cfg.NetNSPath); err != nil {
			return fmt.Errorf("open namespace %s: %w", n.cfg.NetNSPath, err)
		}
		defer nsh.Close()
	}
	h, err := netlink.NewHandleAt(nsh, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink handle: %w", err)
	}
	defer h.Close()
	return fn(h)
}

// extLink finds the underlay interface, by name when one is configured (it
// survives the interface being re-created), else by index.
func (n *Network) extLink(h *netlink.Handle) (netlink.Link, error) {
	if n.cfg.ExtLink != "" {
		l, err := h.LinkByName(n.cfg.ExtLink)
		if err != nil {
			return nil, fmt.Errorf("underlay interface %q: %w", n.cfg.ExtLink, err)
		}
		return l, nil
	}
	l, err := h.LinkByIndex(n.cfg.ExtLinkIndex)
	if err != nil {
		return nil, fmt.Errorf("underlay interface #%d: %w", n.cfg.ExtLinkIndex, err)
	}
	return l, nil
}

// SetLocal records our own lease. Its subnets are never routed to, and a
// peer event for it is ignored.
func (n *Network) SetLocal(own lease.Lease) {
	n.mu.Lock()
	n.local = &own
	delete(n.peers, own.Key())
	n.gen++
	n.mu.Unlock()
	n.routes.TriggerFull()
}

// Handle applies a batch of peer events to the cache and asks for a sync of
// exactly the routes of the peers involved.
func (n *Network) Handle(events []lease.Event) {
	var keys []routes.Key
	n.mu.Lock()
	for _, ev := range events {
		l := ev.Lease
		// A lease that looks like this node's is kept too (plan leaves
		// it out): another node may hold this node's old subnet by the
		// time SetLocal moves this node to a new one.
		id := l.Key()
		if old, ok := n.peers[id]; ok {
			keys = append(keys, routeKeys(old)...)
		}
		switch ev.Type {
		case lease.Added:
			if l.Attrs.BackendType != Type {
				delete(n.peers, id)
				n.log.Warn("ignoring a peer with another backend: no route to it",
					"node", l.Attrs.NodeName, "subnet", id, "peer_backend", l.Attrs.BackendType,
					"fix", "run every node of the cluster with the same backend type")
				continue
			}
			n.peers[id] = *l
			keys = append(keys, routeKeys(*l)...)
		case lease.Removed:
			delete(n.peers, id)
		default:
			n.log.Error("ignoring a lease event of unknown type", "type", ev.Type, "subnet", id)
		}
	}
	n.gen++
	n.mu.Unlock()
	n.routes.Trigger(keys...)
}

func isSelf(local, l lease.Lease) bool {
	return l.Key() == local.Key() || (l.Attrs.NodeName != "" && l.Attrs.NodeName == local.Attrs.NodeName)
}

// routeKeys are the keys of the routes a lease can give rise to.
func routeKeys(l lease.Lease) []routes.Key {
	var ks []routes.Key
	for _, leg := range legs(l) {
		if leg.dst.IsValid() {
			ks = append(ks, routes.Route{Dst: leg.dst}.Key())
		}
	}
	return ks
}

// Run programs the routes until ctx ends, then returns nil and leaves them
// in place. It fails only when the namespace or the route event
// subscription cannot be opened. Call SetLocal first: until then each sync
// fails and the Network is not ready.
func (n *Network) Run(ctx context.Context) error {
	return n.withHandle(func(h *netlink.Handle) error {
		underlay := 0
		if l, err := n.extLink(h); err == nil {
			underlay = l.Attrs().Index
		}
		kind, err := routes.NewKind(routes.Config{
			Handle:       h,
			NetNSPath:    n.cfg.NetNSPath,
			Table:        n.cfg.Table,
			UnderlayLink: underlay,
			Logger:       n.log,
		})
		if err != nil {
			return fmt.Errorf("host-gw: %w", err)
		}
		n.log.Info("programming peer routes", "iface", n.cfg.ExtLink, "namespace", n.cfg.NetNSPath)
		if err := n.routes.RunState(ctx, kind, func() (*reconcile.State[routes.Key, routes.Route], error) { return n.desired(h) }); err != nil {
			return fmt.Errorf("host-gw: %w", err)
		}
		return nil
	})
}

// Ready reports whether every peer route has been programmed at least once.
func (n *Network) Ready() bool { return n.routes.Ready() }

// Stats returns the route reconciler's counters.
func (n *Network) Stats() reconcile.Stats { return n.routes.Stats() }

// desired returns the routes for the current cache and the ext interface's
// current addresses, planned anew (and peer problems that changed reported)
// when either changed since the last plan.
func (n *Network) desired(h *netlink.Handle) (*reconcile.State[routes.Key, routes.Route], error) {
	link, err := n.extLink(h)
	if err != nil {
		return nil, err
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", link.Attrs().Name, err)
	}
	ext := extIface{name: link.Attrs().Name, index: link.Attrs().Index}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		bits, _ := a.Mask.Size()
		ext.addrs = append(ext.addrs, netip.PrefixFrom(ip.Unmap(), bits))
	}

	n.mu.Lock()
	if n.local == nil {
		n.mu.Unlock()
		return nil, errors.New("own lease not set: the agent calls SetLocal before Run")
	}
	if p := n.planned; p != nil && p.gen == n.gen && p.ext.equal(ext) {
		n.mu.Unlock()
		return p.routes, nil
	}
	gen, local := n.gen, *n.local
	peers := make([]lease.Lease, 0, len(n.peers))
	for _, p := range n.peers {
		if !isSelf(local, p) { // not a peer, not counted
			peers = append(peers, p)
		}
	}
	n.mu.Unlock()

	rs, problems := plan(local, peers, ext)
	n.report(problems, len(peers))
	n.planned = &planned{gen: gen, ext: ext, routes: reconcile.NewState(routes.Route.Key, rs)}
	return n.planned.routes, nil
}

// extIface is what plan needs to know about the underlay interface.
type extIface struct {
	name  string
	index int
	addrs []netip.Prefix // its addresses, with their prefix lengths
}

func (e extIface) equal(o extIface) bool {
	return e.name == o.name && e.index == o.index && slices.Equal(e.addrs, o.addrs)
}

// onLink reports whether ip lies in a subnet of the interface.
func (e extIface) onLink(ip netip.Addr) bool {
	return slices.ContainsFunc(e.addrs, func(p netip.Prefix) bool { return p.Masked().Contains(ip) })
}

// owns reports whether ip is an address of the interface.
func (e extIface) owns(ip netip.Addr) bool {
	return slices.ContainsFunc(e.addrs, func(p netip.Prefix) bool { return p.Addr() == ip })
}

func (e extIface) subnets() string {
	var ss []string
	for _, p := range e.addrs {
		if !p.Addr().IsLinkLocalUnicast() {
			ss = append(ss, p.Masked().String())
		}
	}
	if len(ss) == 0 {
		return "none"
	}
	return strings.Join(ss, ", ")
}

// leg is one address family of a lease: the subnet and where to send it.
type leg struct {
	dst netip.Prefix
	gw  netip.Addr
}

// legs returns the IPv4 and the IPv6 leg of a lease, so both go through one
// code path. An unused family has an invalid dst.
func legs(l lease.Lease) [2]leg {
	v6 := leg{dst: l.IPv6Subnet}
	if l.Attrs.PublicIPv6 != nil {
		v6.gw = *l.Attrs.PublicIPv6
	}
	return [2]leg{{dst: l.Subnet, gw: l.Attrs.PublicIP}, v6}
}

// problem is a peer subnet that gets no route, and why.
type problem struct {
	peer   string // lease key
	node   string
	subnet netip.Prefix
	gw     netip.Addr
	reason string
	fix    string
}

func (p problem) id() string { return p.subnet.String() }

// plan computes the desired routes: for each peer and family, its subnet via
// its public address on the ext interface, unless that cannot work. It is
// pure. Peers come out sorted by subnet, so the output is deterministic.
func plan(local lease.Lease, peers []lease.Lease, ext extIface) ([]routes.Route, []problem) {
	// Sort by key, each key made once (not twice per comparison).
	type keyed struct {
		key string
		l   lease.Lease
	}
	ks := make([]keyed, len(peers))
	for i, p := range peers {
		ks[i] = keyed{p.Key(), p}
	}
	slices.SortFunc(ks, func(a, b keyed) int { return cmp.Compare(a.key, b.key) })
	localLegs := legs(local)
	localKey := local.Key()

	var rs []routes.Route
	var ps []problem
	for _, k := range ks {
		p := k.l
		if k.key == localKey || (p.Attrs.NodeName != "" && p.Attrs.NodeName == local.Attrs.NodeName) {
			continue
		}
		for i, lg := range legs(p) {
			if !lg.dst.IsValid() {
				continue
			}
			fam := "IPv4"
			if lg.dst.Addr().Is6() {
				fam = "IPv6"
			}
			bad := func(reason, fix string) {
				ps = append(ps, problem{peer: k.key, node: p.Attrs.NodeName, subnet: lg.dst, gw: lg.gw, reason: reason, fix: fix})
			}
			switch {
			case !lg.gw.IsValid() || lg.gw.BitLen() != lg.dst.Addr().BitLen():
				bad("the lease has an "+fam+" subnet but no "+fam+" public address",
					"start the peer's agent with an "+fam+" address on its -iface, or disable "+fam+" in the network config")
			case localLegs[i].dst.IsValid() && localLegs[i].dst.Overlaps(lg.dst):
				bad("the subnet overlaps this node's own subnet "+localLegs[i].dst.String(),
					"the registry holds two overlapping leases: delete the stale one")
			case ext.owns(lg.gw):
				bad("the public address is an address of this node's "+ext.name,
					"two nodes claim one public IP: set -iface or -public-ip on one of them")
			case !ext.onLink(lg.gw):
				bad(fmt.Sprintf("the public address is not on-link on %s (its subnets: %s)", ext.name, ext.subnets()),
					fixNotOnLink)
			default:
				rs = append(rs, routes.Route{Dst: lg.dst.Masked(), Gw: lg.gw, LinkIndex: ext.index})
			}
		}
	}
	return rs, ps
}

// report logs problems that appeared or changed since the last sync, and
// those that went (resolved, or the peer left); it updates the gauges.
func (n *Network) report(ps []problem, peers int) {
	now := make(map[string]problem, len(ps))
	unroutable := make(map[string]bool)
	for _, p := range ps {
		now[p.id()] = p
		unroutable[p.peer] = true
		if old, ok := n.reported[p.id()]; ok && old == p {
			continue
		}
		n.log.Error("no route to peer: "+p.reason,
			"node", p.node, "subnet", p.subnet, "public_ip", p.gw, "fix", p.fix)
	}
	for id, old := range n.reported {
		if _, ok := now[id]; !ok {
			n.log.Info("peer problem gone (resolved, or the peer left)", "node", old.node, "subnet", old.subnet, "was", old.reason)
		}
	}
	n.reported = now
	n.peersUnroutable.Store(int64(len(unroutable)))
	n.peersRouted.Store(int64(peers - len(unroutable)))
}
