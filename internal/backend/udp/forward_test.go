package udp

// Packet plan (no kernel involved): this node n1 holds 10.244.1.0/24 and
// fc00:0:0:1::/64; peer n2 holds 10.244.2.0/24 and fc00:0:0:2::/64 at
// 198.18.0.12:8285.

import (
	"log/slog"
	"net/netip"
	"testing"

	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/loomnet/loom/internal/lease"
)

// ipPacket returns a minimal IPv4 or IPv6 header (and 8 bytes of payload)
// from src to dst.
func ipPacket(src, dst string) []byte {
	s, d := netip.MustParseAddr(src), netip.MustParseAddr(dst)
	if s.Is4() {
		p := make([]byte, 28)
		p[0] = 0x45
		p[3] = 28
		p[8], p[9] = 64, 17
		copy(p[12:], s.AsSlice())
		copy(p[16:], d.AsSlice())
		return p
	}
	p := make([]byte, 48)
	p[0] = 0x60
	p[5], p[6], p[7] = 8, 17, 64
	copy(p[8:], s.AsSlice())
	copy(p[24:], d.AsSlice())
	return p
}

func TestInnerDst(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    []byte
		want string // "" : not an IP packet
	}{
		{"IPv4", ipPacket("10.244.1.10", "10.244.2.10"), "10.244.2.10"},
		{"IPv6", ipPacket("fc00:0:0:1::10", "fc00:0:0:2::10"), "fc00:0:0:2::10"},
		{"empty", nil, ""},
		{"short IPv4", ipPacket("10.244.1.10", "10.244.2.10")[:19], ""},
		{"short IPv6", ipPacket("fc00::1", "fc00::2")[:39], ""},
		{"IPv4 with IHL 4", append([]byte{0x44}, ipPacket("10.244.1.10", "10.244.2.10")[1:]...), ""},
		{"version 5", append([]byte{0x55}, ipPacket("10.244.1.10", "10.244.2.10")[1:]...), ""},
	} {
		got, ok := innerDst(tc.p)
		if (tc.want == "") != !ok || (ok && got != netip.MustParseAddr(tc.want)) {
			t.Errorf("%s: innerDst = %v, %v; want %q", tc.name, got, ok, tc.want)
		}
	}
}

// fakeSender records what route queues.
type fakeSender struct {
	eps  []netip.AddrPort
	pkts [][]byte
}

func (f *fakeSender) Add(ep netip.AddrPort, p []byte) bool {
	f.eps = append(f.eps, ep)
	f.pkts = append(f.pkts, p)
	return true
}

func testTable() *table {
	t, _ := plan(planInput{local: node(1), hasLocal: true, peers: []lease.Lease{node(2)}, port: 8285, self: netip.MustParseAddr("198.18.0.11")})
	return t
}

func TestRoute(t *testing.T) {
	n2 := netip.MustParseAddrPort("198.18.0.12:8285")
	pkts := [][]byte{
		ipPacket("10.244.1.10", "10.244.2.10"),
		ipPacket("10.244.1.10", "10.244.2.11"),
		ipPacket("fc00:0:0:1::10", "fc00:0:0:2::10"),
		ipPacket("10.244.1.10", "10.244.9.9"),      // no peer
		ipPacket("10.244.1.10", "10.244.1.20"),     // our own subnet: not through flannel0
		ipPacket("fe80::1", "ff02::2"),             // the kernel's router solicitation
		ipPacket("fc00:0:0:1::", "fe80::2"),        // link-local
		{0x00, 0x01},                               // not IP
		ipPacket("10.244.1.10", "10.244.2.10")[:4], // truncated
	}
	var f fakeSender
	var c tally
	route(testTable(), pkts, &f, &c)
	if len(f.pkts) != 3 {
		t.Fatalf("queued %d packets, want 3", len(f.pkts))
	}
	for i, ep := range f.eps {
		if ep != n2 || &f.pkts[i][0] != &pkts[i][0] {
			t.Errorf("packet %d: queued for %v (or copied), want n2 %v", i, ep, n2)
		}
	}
	want := tally{}
	want.drops[dropNoPeer] = 2
	want.drops[dropLinkLocal] = 2
	want.drops[dropMalformed] = 2
	if c != want {
		t.Errorf("tally %+v, want %+v", c, want)
	}
}

func TestDeliverable(t *testing.T) {
	pkts := [][]byte{
		ipPacket("10.244.2.10", "10.244.1.10"),
		ipPacket("fc00:0:0:2::10", "fc00:0:0:1::10"),
		ipPacket("10.244.2.10", "10.244.1.0"),  // flannel0's own address: host traffic
		ipPacket("10.244.2.10", "10.244.3.10"), // another node's pod: never relayed
		ipPacket("10.244.2.10", "198.18.0.11"), // the node's underlay address
		ipPacket("fc00:0:0:2::10", "fc00:0:0:3::1"),
		{0x45},
	}
	var c tally
	keep := deliverable(testTable(), pkts, nil, &c)
	if len(keep) != 3 {
		t.Fatalf("kept %d packets, want 3", len(keep))
	}
	want := tally{}
	want.drops[dropNotLocal] = 3
	want.drops[dropMalformed] = 1
	if c != want {
		t.Errorf("tally %+v, want %+v", c, want)
	}
	// Before SetLocal nothing is ours.
	var c2 tally
	if keep := deliverable(&table{}, pkts[:1], nil, &c2); len(keep) != 0 || c2.drops[dropNotLocal] != 1 {
		t.Errorf("without a local lease: kept %d", len(keep))
	}
}

// Handle and SetLocal update the table the data path reads, and log a
// peer's problem once when it appears and once when it goes.
func TestHandle(t *testing.T) {
	logs := &nstest.LogBuffer{}
	n, err := New(Config{
		Network: netConfig(t), PublicIP: netip.MustParseAddr("198.18.0.11"), ExtMTU: 1500,
		Logger: slog.New(slog.NewTextHandler(logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	dst := netip.MustParseAddr("10.244.2.10")
	if _, ok := n.table.Load().lookup(dst); ok {
		t.Fatal("a peer before any event")
	}
	vx := node(4)
	vx.Attrs.BackendType = "vxlan"
	n.SetLocal(node(1))
	n.Handle(added(node(1), node(2), vx))
	n.Handle(added(vx)) // again: no second log line
	if ep, ok := n.table.Load().lookup(dst); !ok || ep != netip.MustParseAddrPort("198.18.0.12:8285") {
		t.Errorf("lookup after Added: %v %v", ep, ok)
	}
	if !n.table.Load().isLocal(netip.MustParseAddr("10.244.1.10")) {
		t.Error("own subnet not local after SetLocal")
	}
	s := n.Stats()
	if s.Peers != 1 || s.PeersSkipped != 1 {
		t.Errorf("stats %+v: want 1 peer, 1 skipped", s)
	}
	if got := len(logs.Lines("level=WARN", "runs backend vxlan", "node=n4")); got != 1 {
		t.Errorf("%d warnings for the vxlan peer, want 1:\n%s", got, logs)
	}

	n.Handle([]lease.Event{{Type: lease.Removed, Lease: new(node(2))}, {Type: lease.Removed, Lease: &vx}})
	if _, ok := n.table.Load().lookup(dst); ok {
		t.Error("peer still routed after Removed")
	}
	if s := n.Stats(); s.Peers != 0 || s.PeersSkipped != 0 {
		t.Errorf("stats %+v after removal", s)
	}
	if len(logs.Lines("peer problem gone", "node=n4")) != 1 {
		t.Errorf("the vxlan peer leaving was not logged:\n%s", logs)
	}
}
