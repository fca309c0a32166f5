package vxlan

// Control-plane benchmark of the vxlan backend at 5,000 peers, against the
// real kernel, the way `loom bench` measures an agent (scale/5000-peers/…)
// but without etcd, the Guard or the agent around it: what the backend
// itself costs. Address plan: one namespace with eth0 198.18.0.11/24 (a
// stub link), this node 10.244.255.248/29; peers are the /29s of
// 10.244.0.0/16 from the bottom, with public IPs in 198.19.0.0/16 (never
// sent to) and VTEP MACs 0e:6c:00:gg:ii:ii.
//
// Sub-benchmarks, one op each:
//   - cold-start: flannel.1 deleted, a new Network told every peer, until
//     Ready (every device, neighbour, FDB entry and route programmed);
//   - restart: the same with everything already in place (it must change
//     nothing: the benchmark fails otherwise);
//   - update-10pct: every 10th peer gets a new VtepMAC and PublicIP, in
//     batches of 100 as the registry's watch delivers them, until the
//     reconcilers have counted each neighbour updated and each FDB entry
//     created and deleted (every count is a change the kernel
//     acknowledged); the kernel's tables are checked after the timing.
//
// As root (it makes a namespace of its own, loomt-vxs-*):
//
//	go test -run '^$' -bench VXLAN5000 -benchtime 5x -benchmem ./internal/backend/vxlan/

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/testnet"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const scalePeers = 5000

// scaleLease is synthetic peer i (gen 0: as first written; gen 1: with a
// new VtepMAC and PublicIP).
func scaleLease(i, gen int) lease.Lease {
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i >> 5), byte(i&31) << 3}), 29)
	mac := net.HardwareAddr{0x0e, 0x6c, 0, byte(gen), byte(i >> 8), byte(i)}
	d, _ := json.Marshal(backendData{VNI: 1, VtepMAC: mac.String()})
	return lease.Lease{
		Subnet: subnet,
		Attrs: lease.Attrs{
			PublicIP:    netip.AddrFrom4([4]byte{198, 19, byte(i>>8 + 64*gen), byte(i)}),
			BackendType: Type,
			BackendData: d,
			NodeName:    fmt.Sprintf("peer-%d", i),
		},
		Expiration: time.Now().Add(time.Hour),
	}
}

type scaleNode struct {
	b     *testing.B
	path  string
	h     *netlink.Handle
	eth0  netlink.Link
	local lease.Lease
	peers []lease.Lease
	dir   string
}

func newScaleNode(b *testing.B) *scaleNode {
	testnet.RequireRoot(b)
	n, h := nstest.NewNode(b, "vxs")
	eth0 := nstest.Stub(b, h, "eth0")
	nstest.Addr(b, h, eth0, "198.18.0.11/24")
	s := &scaleNode{b: b, path: n.Path(), h: h, eth0: eth0, dir: b.TempDir()}
	for i := range scalePeers {
		s.peers = append(s.peers, scaleLease(i, 0))
	}
	return s
}

// start runs a new Network told every peer; stop ends it.
func (s *scaleNode) start() (nw *Network, stop func()) {
	s.b.Helper()
	nw, err := New(Config{
		Backend:      json.RawMessage(`{"Type":"vxlan"}`),
		ExtLinkIndex: s.eth0.Attrs().Index,
		ExtMTU:       1500,
		PublicIP:     netip.MustParseAddr("198.18.0.11"),
		NodeName:     "n1",
		StateDir:     s.dir,
		NetNSPath:    s.path,
		Resync:       time.Hour,
		// The agent logs at Info: formatting what it logs is part of
		// the cost.
		Logger: slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	if err != nil {
		s.b.Fatal(err)
	}
	if !s.local.Subnet.IsValid() {
		s.local = lease.Lease{Subnet: netip.MustParsePrefix("10.244.255.248/29"),
			Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: Type, BackendData: nw.BackendData(), NodeName: "n1"}}
	}
	nw.SetLocal(s.local)
	nw.Handle(added(s.peers...))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- nw.Run(ctx) }()
	return nw, func() {
		cancel()
		if err := <-done; err != nil {
			s.b.Error(err)
		}
	}
}

// waitReady polls nw.Ready every millisecond.
func (s *scaleNode) waitReady(nw *Network) {
	deadline := time.Now().Add(time.Minute)
	for !nw.Ready() {
		if time.Now().After(deadline) {
			s.b.Fatal("not ready within a minute")
		}
		time.Sleep(time.Millisecond)
	}
}

// fdbState returns the FDB of flannel.1: MAC → destination.
func (s *scaleNode) fdbState() (map[string]netip.Addr, map[netip.Addr]string) {
	s.b.Helper()
	l, err := s.h.LinkByName("flannel.1")
	if err != nil {
		s.b.Fatal(err)
	}
	fdbs, err := s.h.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		s.b.Fatal(err)
	}
	f := make(map[string]netip.Addr, len(fdbs))
	for _, e := range fdbs {
		ip, _ := netip.AddrFromSlice(e.IP)
		f[e.HardwareAddr.String()] = ip.Unmap()
	}
	ns, err := s.h.NeighList(l.Attrs().Index, unix.AF_INET)
	if err != nil {
		s.b.Fatal(err)
	}
	n := make(map[netip.Addr]string, len(ns))
	for _, e := range ns {
		ip, _ := netip.AddrFromSlice(e.IP)
		n[ip.Unmap()] = e.HardwareAddr.String()
	}
	return f, n
}

func BenchmarkVXLAN5000Peers(b *testing.B) {
	s := newScaleNode(b)
	changes := func(nw *Network) uint64 {
		var sum uint64
		for _, st := range nw.stats() {
			sum += st.Created + st.Updated + st.Deleted
		}
		return sum
	}

	b.Run("cold-start", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			if l, err := s.h.LinkByName("flannel.1"); err == nil {
				if err := s.h.LinkDel(l); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
			nw, stop := s.start()
			s.waitReady(nw)
			b.StopTimer()
			stop()
			b.StartTimer()
		}
	})
	b.Run("restart", func(b *testing.B) {
		nw, stop := s.start() // everything in place before the first op
		s.waitReady(nw)
		stop()
		for b.Loop() {
			nw, stop := s.start()
			s.waitReady(nw)
			b.StopTimer()
			if c := changes(nw); c != 0 {
				b.Errorf("a restart changed %d objects", c)
			}
			stop()
			b.StartTimer()
		}
	})
	b.Run("update-10pct", func(b *testing.B) {
		nw, stop := s.start()
		defer stop()
		s.waitReady(nw)
		gen := 0
		for b.Loop() {
			gen ^= 1
			before := nw.stats()
			var batch []lease.Event
			var want []lease.Lease
			for i := 0; i < scalePeers; i += 10 {
				l := scaleLease(i, gen)
				want = append(want, l)
				batch = append(batch, lease.Event{Type: lease.Added, Lease: &l})
				if len(batch) == 100 {
					nw.Handle(batch)
					batch = nil
				}
			}
			nw.Handle(batch)
			// The reconcilers count what the kernel acknowledged: each
			// changed peer is a neighbour updated, and an FDB entry
			// created and one deleted. Polling the kernel's tables
			// instead would compete for the CPU with what is measured.
			n := uint64(len(want))
			deadline := time.Now().Add(time.Minute)
			for {
				st := nw.stats()
				if st["neigh"].Updated-before["neigh"].Updated >= n && st["fdb"].Created-before["fdb"].Created >= n &&
					st["fdb"].Deleted-before["fdb"].Deleted >= n {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("update not reflected within a minute: %+v", st)
				}
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			f, nb := s.fdbState()
			for _, l := range want {
				d, _ := decodeData(l.Attrs.BackendData)
				if f[d.mac.String()] != l.Attrs.PublicIP || nb[l.Subnet.Addr()] != d.mac.String() {
					b.Fatalf("the kernel does not show %v", l)
				}
			}
			if len(f) != scalePeers {
				b.Fatalf("%d FDB entries, want %d", len(f), scalePeers)
			}
			b.StartTimer()
		}
	})
}
