// Package udp is the udp backend: pod packets travel between nodes as the
// payload of UDP datagrams, encapsulated and decapsulated by this process.
// It is for kernels without VXLAN; it speaks flannel's udp wire format, so
// loom and flanneld nodes running udp talk to each other.
//
// Design notes.
//
// Wire format (flannel's): the payload of each datagram to
// <peer PublicIP>:8285 is exactly one inner IP packet, with no header of
// ours. Nothing says which cluster or peer a datagram is from; the receiver
// only checks that the inner destination is in its own subnet (anything
// else is dropped and counted, so a packet can never bounce between
// nodes). Leases as flanneld's udp backend writes them: no BackendData, and
// no BackendType, which is therefore taken to mean udp. flannel's proxy also
// decrements the inner TTL at both ends; loom does not: the kernel already
// does at each node it forwards through, and the rule above stops loops.
//
// Kernel objects owned, all in the Network's namespace:
//
//	flannel0           TUN (IFF_TUN|IFF_NO_PI), multi-queue, persistent,
//	                   MTU = underlay MTU − 28 (− 48 over an IPv6 underlay)
//	<subnet>.0/32      on flannel0, and <IPv6 subnet>::/128: the source
//	                   address of host-to-remote-pod traffic
//	<Network> dev flannel0 proto 108, and <IPv6Network>: every pod subnet
//	                   goes to flannel0; the node's own subnet is more
//	                   specific (on cni0), so only remote pods come here
//	UDP sockets        <PublicIP>:<Port>, SO_REUSEPORT
//
// flannel puts the same /32 address and route on flannel0 (a /32, not the
// Network's length, so the kernel adds no broadcast routes). loom owns
// flannel0 whole: addresses on it that it does not want are removed.
//
// Reconciliation: the route goes through package reconcile (routes with
// protocol 108). The device has its own small loop, in the same style: at
// start, every Resync, on link and address events for flannel0, and when a
// reader finds the device deleted (EBADFD), it makes the device match: a
// deleted flannel0 is opened anew (and its route re-added by a full route
// sync), a wrong MTU, a missing address or a down link restored. Run leaves
// it all in place when it returns: flannel0 is persistent, so the routes and
// addresses survive an agent restart, and the next agent attaches to it.
//
// Data path: two kinds of goroutines, each owning the memory it uses, so
// nothing is allocated per packet and no buffer crosses goroutines:
//
//	transmit, one per TUN queue: read a batch from flannel0 → look up each
//	  inner destination in the peer table → one sendmmsg for the batch.
//	  They end and start with each incarnation of flannel0, so their
//	  buffers come from a sync.Pool.
//	receive, one per UDP socket: one recvmmsg → keep the packets for our
//	  own subnets → write them to flannel0. They live as long as Run and
//	  allocate their buffers once.
//
// The peer table is immutable and replaced whole on every peer change
// (atomic.Pointer): the packet path takes no lock. Lookup is by longest
// prefix, one map lookup per distinct subnet length (one, in practice).
//
// Offloads, each detected at start with a clean fallback, and logged:
// flannel0 with IFF_VNET_HDR and TSO hands over 64 KiB TCP super-packets,
// cut into MSS-sized packets with correct checksums in user space (package
// tun); UDP GSO sends each batch of equal-sized datagrams to a peer as one
// message, UDP GRO receives them as one buffer (package batch); and the
// TCP segments received are merged back into 64 KiB frames for flannel0.
// Every datagram still carries exactly one inner packet, so a flanneld
// peer sees nothing new. Without them: one packet per TUN read and write,
// still one system call per batch on the socket.
//
// Scale: queues and sockets = min(CPUs, 4); the kernel spreads flows over
// TUN queues by hash (and datagrams over sockets by 4-tuple, so one peer's
// traffic lands on one socket). Per packet the work is a header parse and a
// map lookup; per batch one system call each way, and with the offloads one
// per 64 KiB. flannel's udp backend is one C thread doing read, sendto,
// recv and write per packet, at ~2.6% of the underlay's throughput; one TCP
// stream through this one runs at 70-90% of the plain underlay's on the
// test machine (BenchmarkUDPBackendTCP), ~15% with the TUN offload alone
// (kernels before 4.18 have no UDP GSO) and ~10% with none. The peer table
// is rebuilt whole on each peer event: O(peers), for a thousand peers well
// under a millisecond, and never on the packet path.
//
// Kernel quirks: see packages tun and batch (EBADFD after deletion,
// untrustworthy hdr_len when forwarding, GSO without TX checksum offload).
// IPv6 link-local traffic the kernel itself sends on flannel0 (router
// solicitations, MLD) has no peer; it is dropped and counted apart.
package udp

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/loomnet/loom/internal/backend"
	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/prometheus/client_golang/prometheus"
)

// Type is the BackendType this backend writes into its lease and accepts
// from peers (with the empty one flanneld's udp backend writes).
const Type = netconf.BackendUDP

// DeviceName is the TUN device, as flannel names it.
const DeviceName = "flannel0"

// Encapsulation overhead: the outer IP and UDP headers.
const (
	overhead4 = 20 + 8
	overhead6 = 40 + 8
)

// Data path sizes.
const (
	maxWorkers = 4   // TUN queues and UDP sockets, at most
	txBatch    = 128 // packets per TUN read batch and per sendmmsg
	rxSlots    = 16  // recvmmsg slots with GRO (64 KiB each)
	rxSlotsMTU = 64  // recvmmsg slots without GRO (one datagram each)
	sockBuffer = 4 << 20
)

// Config configures a Network.
type Config struct {
	// Backend is the network config's Backend object (netconf.Backend.Raw):
	// {"Type": "udp", "Port": 8285}; see ParseOptions.
	Backend json.RawMessage
	// Network is the whole pod network: flannel0 carries all of it.
	Network netconf.Config
	// ExtLinkIndex is the underlay interface (flannel's -iface): route
	// events on it do not concern flannel0.
	ExtLinkIndex int
	// ExtMTU is the underlay interface's MTU.
	ExtMTU int
	// PublicIP is this node's underlay address: the UDP sockets bind it,
	// and its family decides which public address of each peer is used.
	PublicIP netip.Addr
	// NetNSPath is the network namespace to work in, e.g. /run/netns/x;
	// empty means the agent's own. flannel0 and the sockets are made there.
	NetNSPath string
	// Resync is the period of full resyncs; 0 means 5 s.
	Resync time.Duration
	// Logger; nil means slog.Default().
	Logger *slog.Logger
	// Metrics, when set, receives the backend's collectors. Use the
	// agent's registry.
	Metrics prometheus.Registerer

	// noOffload turns every offload off, noUDPOffload only UDP GSO and
	// GRO (tests and benchmarks of the fallback paths).
	noOffload, noUDPOffload bool
	// workers overrides the number of TUN queues and sockets (tests).
	workers int
}

// Network is the udp data path. It implements backend.Network.
type Network struct {
	// Set by New, read-only after.
	cfg       Config
	opts      Options
	log       *slog.Logger
	mtu       int
	underlay6 bool // PublicIP is IPv6: peers are reached at PublicIPv6
	workers   int  // TUN queues and UDP sockets
	routes    *reconcile.Reconciler[routes.Key, routes.Route]
	txPool    sync.Pool     // *txBuffers
	kick      chan struct{} // at most one pending wake-up of the device loop

	// Lock-free: the data path reads these on every batch.
	table atomic.Pointer[table]  // the peer table; never nil after New
	dev   atomic.Pointer[device] // flannel0 as currently open; nil when none; written by the device loop
	stats counters
	ready atomic.Bool // flannel0 fully configured at least once

	mu sync.Mutex // guards local, peers, reported; table is rebuilt under it
	// local is our own lease (nil until SetLocal).
	local *lease.Lease
	// peers are the peer leases by key, of any backend type.
	peers map[string]lease.Lease
	// reported holds the peer problems logged so far, by id.
	reported map[string]problem
}

var _ backend.Network = (*Network)(nil)

// New checks cfg and returns a Network. Nothing is created in the kernel
// until Run.
func New(cfg Config) (*Network, error) {
	opts, err := ParseOptions(cfg.Backend)
	if err != nil {
		return nil, err
	}
	if !cfg.PublicIP.IsValid() {
		return nil, errors.New("udp backend: Config.PublicIP is not set: it is the underlay address the UDP sockets bind")
	}
	if !cfg.Network.Network.IsValid() && !cfg.Network.IPv6Network.IsValid() {
		return nil, errors.New("udp backend: Config.Network has neither Network nor IPv6Network: pass the parsed network config")
	}
	if cfg.Resync < 0 {
		return nil, fmt.Errorf("udp backend: Resync %v is negative", cfg.Resync)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	n := &Network{
		cfg:       cfg,
		opts:      opts,
		log:       cfg.Logger.With("backend", Type),
		underlay6: cfg.PublicIP.Unmap().Is6(),
		kick:      make(chan struct{}, 1),
		peers:     make(map[string]lease.Lease),
		reported:  make(map[string]problem),
	}
	n.cfg.PublicIP = cfg.PublicIP.Unmap()
	n.mtu = cfg.ExtMTU - overhead4
	if n.underlay6 {
		n.mtu = cfg.ExtMTU - overhead6
	}
	// An IPv4 link needs 68 bytes, an IPv6 one 1280.
	minMTU := 68
	if cfg.Network.IPv6Network.IsValid() {
		minMTU = 1280
	}
	if n.mtu < minMTU {
		return nil, fmt.Errorf("udp backend: underlay MTU %d leaves %d for flannel0, below the minimum %d: "+
			"choose an underlay interface (-iface) with an MTU of at least %d", cfg.ExtMTU, n.mtu, minMTU, cfg.ExtMTU-n.mtu+minMTU)
	}
	n.workers = min(runtime.NumCPU(), maxWorkers)
	if cfg.workers > 0 {
		n.workers = cfg.workers
	}
	n.table.Store(&table{})
	n.txPool.New = func() any { return newTxBuffers() }

	n.routes, err = reconcile.New[routes.Key, routes.Route](reconcile.Config{
		Name:   "route",
		Resync: cfg.Resync,
		Logger: n.log,
	})
	if err != nil {
		return nil, fmt.Errorf("udp backend: %w", err)
	}
	if cfg.Metrics != nil {
		for _, c := range []prometheus.Collector{n.routes.Collector(), n.collector()} {
			if err := cfg.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("udp backend: register metrics: %w", err)
			}
		}
	}
	return n, nil
}

// MTU is flannel0's MTU, the MTU pods must use: the underlay's less the
// outer IP and UDP headers.
func (n *Network) MTU() int { return n.mtu }

// BackendData is what goes into the lease's BackendData: nothing, as
// flannel's udp backend writes none (peers need only the PublicIP).
func (n *Network) BackendData() json.RawMessage { return nil }

// Options returns the parsed backend options.
func (n *Network) Options() Options { return n.opts }

// SetLocal records our own lease: its subnets are what the receive path
// delivers and what flannel0's addresses are made from.
func (n *Network) SetLocal(own lease.Lease) {
	n.mu.Lock()
	n.local = &own
	delete(n.peers, own.Key())
	n.rebuildLocked()
	n.mu.Unlock()
	n.kickDevice()
}

// Handle applies a batch of peer events and swaps in a new peer table.
func (n *Network) Handle(events []lease.Event) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, ev := range events {
		l := ev.Lease
		switch ev.Type {
		case lease.Added:
			n.peers[l.Key()] = *l
		case lease.Removed:
			delete(n.peers, l.Key())
		default:
			n.log.Error("ignoring a lease event of unknown type", "type", ev.Type, "subnet", l.Key())
		}
	}
	n.rebuildLocked()
}

// rebuildLocked recomputes the peer table from the cache, publishes it and
// reports problems that changed.
func (n *Network) rebuildLocked() {
	in := planInput{port: n.opts.Port, underlay6: n.underlay6, self: n.cfg.PublicIP}
	if n.local != nil {
		in.local, in.hasLocal = *n.local, true
	}
	for _, p := range n.peers {
		in.peers = append(in.peers, p)
	}
	t, ps := plan(in)
	n.table.Store(t)
	n.reportLocked(ps)
}

// reportLocked logs problems that appeared or changed since the last
// rebuild, and those that went.
func (n *Network) reportLocked(ps []problem) {
	now := make(map[string]problem, len(ps))
	for _, p := range ps {
		now[p.id] = p
		if old, ok := n.reported[p.id]; ok && old == p {
			continue
		}
		args := []any{"node", p.node, "lease", p.id, "fix", p.fix}
		if p.subnet.IsValid() {
			args = append(args, "subnet", p.subnet)
		}
		if p.warn {
			n.log.Warn("ignoring a peer: "+p.reason, args...)
		} else {
			n.log.Error("no route to peer: "+p.reason, args...)
		}
	}
	for id, old := range n.reported {
		if _, ok := now[id]; !ok {
			n.log.Info("peer problem gone (resolved, or the peer left)", "node", old.node, "lease", id, "was", old.reason)
		}
	}
	n.reported = now
	skipped := 0
	for _, p := range ps {
		if p.warn {
			skipped++
		}
	}
	n.stats.peersSkipped.Store(int64(skipped))
}

// Ready reports whether flannel0 and its route have been fully programmed
// at least once.
func (n *Network) Ready() bool { return n.ready.Load() && n.routes.Ready() }

func (n *Network) kickDevice() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}
