package udp

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// drop is why the data path dropped a packet.
type drop int

const (
	dropNoPeer    drop = iota // sending: no peer's subnet holds the destination
	dropLinkLocal             // sending: multicast or link-local (the kernel's own IPv6 chatter on flannel0)
	dropNotLocal              // receiving: the destination is not in this node's subnet
	dropMalformed             // not an IP packet (or a TUN frame that makes no sense)
	dropTruncated             // receiving: a datagram larger than the receive buffer
	dropSendError             // the socket refused the datagram
	dropTUNError              // flannel0 refused the packet, or was missing
	numDrops
)

var dropNames = [numDrops]string{"no_peer", "link_local", "not_local", "malformed", "truncated", "send_error", "tun_error"}

// counters are the data path's counters. Workers add to them once per
// batch, from a tally.
type counters struct {
	txPackets, txBytes atomic.Uint64
	rxPackets, rxBytes atomic.Uint64
	drops              [numDrops]atomic.Uint64
	recreated          atomic.Uint64
	peersSkipped       atomic.Int64

	// The offloads of the current device and sockets.
	tunOffload, gso, gro atomic.Bool
}

// tally counts one batch in a worker, without atomics.
type tally struct {
	packets, bytes uint64
	drops          [numDrops]uint64
}

func (c *counters) addTx(t *tally) {
	c.txPackets.Add(t.packets)
	c.txBytes.Add(t.bytes)
	c.addDrops(t)
}

func (c *counters) addRx(t *tally) {
	c.rxPackets.Add(t.packets)
	c.rxBytes.Add(t.bytes)
	c.addDrops(t)
}

func (c *counters) addDrops(t *tally) {
	for i, v := range t.drops {
		if v != 0 {
			c.drops[i].Add(v)
		}
	}
	*t = tally{}
}

// Stats is a snapshot of the data path's counters.
type Stats struct {
	TxPackets, TxBytes uint64            // inner packets (and bytes) sent to peers
	RxPackets, RxBytes uint64            // inner packets (and bytes) written to flannel0
	Dropped            map[string]uint64 // by reason (no_peer, not_local, ...)
	Recreated          uint64            // times flannel0 was found deleted and re-created
	Peers              int               // peers in the forwarding table
	PeersSkipped       int               // peers ignored for running another backend
	Offloads           Offloads
}

// Offloads says which offloads the data path runs with.
type Offloads struct {
	TUN bool // flannel0 with IFF_VNET_HDR: TSO and checksum offload, user-space GRO
	GSO bool // UDP_SEGMENT on every socket
	GRO bool // UDP_GRO on every socket
}

// Stats returns a snapshot of the counters.
func (n *Network) Stats() Stats {
	c := &n.stats
	s := Stats{
		TxPackets: c.txPackets.Load(), TxBytes: c.txBytes.Load(),
		RxPackets: c.rxPackets.Load(), RxBytes: c.rxBytes.Load(),
		Dropped:      make(map[string]uint64, numDrops),
		Recreated:    c.recreated.Load(),
		Peers:        n.table.Load().peers,
		PeersSkipped: int(c.peersSkipped.Load()),
		Offloads:     Offloads{TUN: c.tunOffload.Load(), GSO: c.gso.Load(), GRO: c.gro.Load()},
	}
	for i := range c.drops {
		s.Dropped[dropNames[i]] = c.drops[i].Load()
	}
	return s
}

// collector exports Stats at each scrape.
func (n *Network) collector() prometheus.Collector {
	return &collector{
		stats: n.Stats,
		packets: prometheus.NewDesc("loom_udp_packets_total",
			"Inner packets forwarded, by direction (tx: flannel0 to peers, rx: peers to flannel0).", []string{"direction"}, nil),
		bytes: prometheus.NewDesc("loom_udp_bytes_total",
			"Bytes of inner packets forwarded, by direction.", []string{"direction"}, nil),
		dropped: prometheus.NewDesc("loom_udp_dropped_total",
			"Inner packets dropped, by reason.", []string{"reason"}, nil),
		recreated: prometheus.NewDesc("loom_udp_device_recreated_total",
			"Times flannel0 was found deleted and re-created.", nil, nil),
		peers: prometheus.NewDesc("loom_udp_peers",
			"Peers in the forwarding table.", nil, nil),
		skipped: prometheus.NewDesc("loom_udp_peers_skipped",
			"Peers ignored because they run another backend type; the log names them.", nil, nil),
		offload: prometheus.NewDesc("loom_udp_offload",
			"1 when an offload is on: tun (TSO/GRO via IFF_VNET_HDR), gso (UDP_SEGMENT), gro (UDP_GRO).", []string{"offload"}, nil),
	}
}

type collector struct {
	stats                                                       func() Stats
	packets, bytes, dropped, recreated, peers, skipped, offload *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.packets, c.bytes, c.dropped, c.recreated, c.peers, c.skipped, c.offload} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter(c.packets, s.TxPackets, "tx")
	counter(c.packets, s.RxPackets, "rx")
	counter(c.bytes, s.TxBytes, "tx")
	counter(c.bytes, s.RxBytes, "rx")
	for _, name := range dropNames {
		counter(c.dropped, s.Dropped[name], name)
	}
	counter(c.recreated, s.Recreated)
	gauge(c.peers, float64(s.Peers))
	gauge(c.skipped, float64(s.PeersSkipped))
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	gauge(c.offload, b(s.Offloads.TUN), "tun")
	gauge(c.offload, b(s.Offloads.GSO), "gso")
	gauge(c.offload, b(s.Offloads.GRO), "gro")
}
