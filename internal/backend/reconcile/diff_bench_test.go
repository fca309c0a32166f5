package reconcile_test

// Micro-benchmarks of the desired-state diff at 5,000 peers, with the real
// object kinds of the vxlan backend (their Key and Equal, which touch no
// netlink handle). A full sync diffs every key; a partial sync (a peer
// event) only that peer's. Diff takes the desired objects as a slice, as
// syncs did before State; DiffState ("indexed") takes them indexed once,
// as the backends now keep them between peer changes. Address plan: peers
// 10.244.0.0/16 split into /29s, public IPs 198.19.0.0/16; no kernel is
// touched.
//
//	go test -run '^$' -bench Diff5000 -benchmem ./internal/backend/reconcile/

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/loomnet/loom/internal/backend/fdb"
	"github.com/loomnet/loom/internal/backend/neigh"
	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/loomnet/loom/internal/backend/routes"
)

const benchPeers = 5000

// peerObjects returns what the vxlan backend wants for n peers: one route,
// neighbour and FDB entry each. gen changes the MACs and public IPs of
// every 10th peer, as an update of 10% of the leases does.
func peerObjects(n, gen int) ([]routes.Route, []neigh.Neigh, []fdb.Entry) {
	rs := make([]routes.Route, 0, n)
	ns := make([]neigh.Neigh, 0, n)
	fs := make([]fdb.Entry, 0, n)
	for i := range n {
		g := 0
		if i%10 == 0 {
			g = gen
		}
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i >> 5), byte(i&31) << 3}), 29)
		mac := net.HardwareAddr{0x0e, 0x6c, 0x6d, byte(g), byte(i >> 8), byte(i)}
		pub := netip.AddrFrom4([4]byte{198, 19, byte(i>>8 + g*128), byte(i)})
		rs = append(rs, routes.Route{Dst: subnet, Gw: subnet.Addr(), LinkIndex: 3, OnLink: true})
		ns = append(ns, neigh.Neigh{Dev: "flannel.1", IP: subnet.Addr(), MAC: mac})
		fs = append(fs, fdb.Entry{Dev: "flannel.1", MAC: mac, Dst: pub})
	}
	return rs, ns, fs
}

func BenchmarkDiff5000Peers(b *testing.B) {
	h := &netlink.Handle{} // never used: Key and Equal are pure
	rk, err := routes.NewKind(routes.Config{Handle: h})
	if err != nil {
		b.Fatal(err)
	}
	nk, err := neigh.NewKind(neigh.Config{Handle: h, Devices: []string{"flannel.1"}})
	if err != nil {
		b.Fatal(err)
	}
	fk, err := fdb.NewKind(fdb.Config{Handle: h, Devices: []string{"flannel.1"}})
	if err != nil {
		b.Fatal(err)
	}
	wantR, wantN, wantF := peerObjects(benchPeers, 0)
	haveR, haveN, haveF := peerObjects(benchPeers, 1) // kernel still has 10% old
	// A few foreign routes, as a node has: connected, default, cni0.
	foreign := []routes.Route{
		{Dst: netip.MustParsePrefix("0.0.0.0/0"), Gw: netip.MustParseAddr("198.18.0.1"), LinkIndex: 2},
		{Dst: netip.MustParsePrefix("198.18.0.0/24"), LinkIndex: 2},
		{Dst: netip.MustParsePrefix("10.244.250.0/24"), LinkIndex: 4},
	}
	one := routes.Key{Dst: wantR[4321].Dst}

	b.Run("routes/full/in-sync", func(b *testing.B) {
		for b.Loop() {
			if p := reconcile.Diff(rk, wantR, wantR, foreign, nil); len(p.Create)+len(p.Update)+len(p.Delete) != 0 {
				b.Fatalf("in-sync diff has work: %d/%d/%d", len(p.Create), len(p.Update), len(p.Delete))
			}
		}
	})
	b.Run("routes/full/cold", func(b *testing.B) {
		for b.Loop() {
			if p := reconcile.Diff(rk, wantR, nil, foreign, nil); len(p.Create) != benchPeers {
				b.Fatalf("cold diff creates %d, want %d", len(p.Create), benchPeers)
			}
		}
	})
	b.Run("routes/partial/one-peer", func(b *testing.B) {
		scope := func(k routes.Key) bool { return k == one }
		for b.Loop() {
			reconcile.Diff(rk, wantR, wantR, foreign, scope)
		}
	})
	stateR := reconcile.NewState(rk.Key, wantR)
	b.Run("routes/full/in-sync/indexed", func(b *testing.B) {
		for b.Loop() {
			if p := reconcile.DiffState(rk, stateR, wantR, foreign, nil); len(p.Create)+len(p.Update)+len(p.Delete) != 0 {
				b.Fatalf("in-sync diff has work: %d/%d/%d", len(p.Create), len(p.Update), len(p.Delete))
			}
		}
	})
	b.Run("routes/partial/one-peer/indexed", func(b *testing.B) {
		keys := map[routes.Key]struct{}{one: {}}
		for b.Loop() {
			reconcile.DiffState(rk, stateR, wantR, foreign, keys)
		}
	})
	b.Run("routes/index", func(b *testing.B) {
		for b.Loop() {
			reconcile.NewState(rk.Key, wantR)
		}
	})
	b.Run("neigh/full/10pct-changed", func(b *testing.B) {
		for b.Loop() {
			if p := reconcile.Diff(nk, wantN, haveN, nil, nil); len(p.Update) != benchPeers/10 {
				b.Fatalf("diff updates %d neighbours, want %d", len(p.Update), benchPeers/10)
			}
		}
	})
	b.Run("fdb/full/10pct-changed", func(b *testing.B) {
		// New MACs: each changed peer is one create and one delete.
		for b.Loop() {
			if p := reconcile.Diff(fk, wantF, haveF, nil, nil); len(p.Create) != benchPeers/10 || len(p.Delete) != benchPeers/10 {
				b.Fatalf("diff creates %d and deletes %d FDB entries, want %d each", len(p.Create), len(p.Delete), benchPeers/10)
			}
		}
	})
	b.Run("fdb/full/in-sync", func(b *testing.B) {
		for b.Loop() {
			reconcile.Diff(fk, wantF, wantF, nil, nil)
		}
	})
	stateF := reconcile.NewState(fk.Key, wantF)
	b.Run("fdb/partial/10pct-changed/indexed", func(b *testing.B) {
		// The keys a 10% update triggers: each changed peer's old and new
		// MAC.
		keys := map[fdb.Key]struct{}{}
		for i := 0; i < benchPeers; i += 10 {
			keys[wantF[i].Key()] = struct{}{}
			keys[haveF[i].Key()] = struct{}{}
		}
		for b.Loop() {
			if p := reconcile.DiffState(fk, stateF, haveF, nil, keys); len(p.Create) != benchPeers/10 || len(p.Delete) != benchPeers/10 {
				b.Fatalf("diff creates %d and deletes %d FDB entries, want %d each", len(p.Create), len(p.Delete), benchPeers/10)
			}
		}
	})
	_ = haveR
}
