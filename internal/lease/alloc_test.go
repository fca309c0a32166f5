package lease

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/netconf"
)

// Address plan: pods 10.0.0.0/8, 10.244.0.0/16 and 10.244.0.0/28; IPv6 pods
// fc00::/48 (subnets /64) and fc00::/120 (subnets /126).

func v4Config(network string, subnetLen int, lo, hi string) netconf.Config {
	return netconf.Config{
		EnableIPv4: true,
		Network:    netip.MustParsePrefix(network),
		SubnetLen:  subnetLen,
		SubnetMin:  netip.MustParseAddr(lo),
		SubnetMax:  netip.MustParseAddr(hi),
	}
}

func live(v4 string) Lease {
	return Lease{Subnet: netip.MustParsePrefix(v4), Expiration: time.Now().Add(time.Hour)}
}

func reservation(v4 string) Lease {
	return Lease{Subnet: netip.MustParsePrefix(v4)}
}

func seeded(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 0)) }

func TestAllocateInRange(t *testing.T) {
	cfg := v4Config("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0")
	rnd := seeded(1)
	seen := map[netip.Prefix]bool{}
	for range 500 {
		v4, v6, err := Allocate(cfg, nil, rnd)
		if err != nil {
			t.Fatal(err)
		}
		if v6.IsValid() {
			t.Fatalf("IPv6 subnet %s from an IPv4-only config", v6)
		}
		if !Fits(cfg, v4, v6) {
			t.Fatalf("%s is outside the configured range", v4)
		}
		seen[v4] = true
	}
	// 500 uniform draws from 255 candidates: all but a handful show up.
	if len(seen) < 200 {
		t.Errorf("only %d distinct subnets in 500 draws: not spread over the range", len(seen))
	}
}

// Filling the whole range one lease at a time must hand out every candidate
// exactly once and then fail with the exhaustion error.
func TestAllocateFillsRangeThenExhausts(t *testing.T) {
	cfg := v4Config("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0")
	rnd := seeded(2)
	var taken []Lease
	got := map[netip.Prefix]bool{}
	for i := range 255 {
		v4, _, err := Allocate(cfg, taken, rnd)
		if err != nil {
			t.Fatalf("allocation %d: %v", i, err)
		}
		if got[v4] {
			t.Fatalf("allocation %d: %s handed out twice", i, v4)
		}
		got[v4] = true
		if i%5 == 0 {
			taken = append(taken, reservation(v4.String()))
		} else {
			taken = append(taken, live(v4.String()))
		}
	}
	_, _, err := Allocate(cfg, taken, rnd)
	want := "no free subnet in 10.244.0.0/16 between 10.244.1.0 and 10.244.255.0 (204 leased, 51 reserved)"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant %s", err, want)
	}
	if !errors.Is(err, ErrNoFreeSubnet) {
		t.Errorf("errors.Is(%v, ErrNoFreeSubnet) = false", err)
	}
}

func TestAllocateExhaustionMessage(t *testing.T) {
	// 10.244.0.0/28 in /30s with flannel's defaults: .4, .8 and .12.
	cfg := v4Config("10.244.0.0/28", 30, "10.244.0.4", "10.244.0.12")
	taken := []Lease{
		live("10.244.0.4/30"),
		reservation("10.244.0.8/30"),
		live("10.244.0.12/30"),
		live("10.244.0.0/30"),     // outside SubnetMin: not counted
		live("192.168.0.0/24"),    // another network: not counted
		reservation("10.0.0.0/8"), // covers everything: counted once
	}
	_, _, err := Allocate(cfg, taken, seeded(3))
	want := "no free subnet in 10.244.0.0/28 between 10.244.0.4 and 10.244.0.12 (2 leased, 2 reserved)"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant %s", err, want)
	}
}

func TestAllocateHonoursReservations(t *testing.T) {
	cfg := v4Config("10.244.0.0/28", 30, "10.244.0.4", "10.244.0.12")
	taken := []Lease{reservation("10.244.0.4/30"), live("10.244.0.12/30")}
	for seed := range uint64(50) {
		v4, _, err := Allocate(cfg, taken, seeded(seed))
		if err != nil {
			t.Fatal(err)
		}
		if v4 != netip.MustParsePrefix("10.244.0.8/30") {
			t.Fatalf("seed %d: got %s, want the only free subnet 10.244.0.8/30", seed, v4)
		}
	}
}

func TestAllocateDeterministic(t *testing.T) {
	cfg := v4Config("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0")
	taken := []Lease{live("10.0.1.0/24"), reservation("10.128.0.0/9")}
	run := func() []netip.Prefix {
		rnd := seeded(42)
		var out []netip.Prefix
		for range 20 {
			v4, _, err := Allocate(cfg, taken, rnd)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, v4)
		}
		return out
	}
	a, b := run(), run()
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("same seed, different picks:\n%v\n%v", a, b)
	}
	for _, p := range a {
		if netip.MustParsePrefix("10.128.0.0/9").Overlaps(p) {
			t.Fatalf("%s is inside the reserved 10.128.0.0/9", p)
		}
	}
}

// A /8 in /30s is four million candidates. With all but the last one taken
// by a few big reservations the pick must still be instant and exact.
func TestAllocateHugeRange(t *testing.T) {
	cfg := v4Config("10.0.0.0/8", 30, "10.0.0.4", "10.255.255.252")
	taken := []Lease{
		reservation("10.0.0.0/9"),
		reservation("10.128.0.0/10"),
		reservation("10.192.0.0/11"),
		reservation("10.224.0.0/12"),
		reservation("10.240.0.0/13"),
		reservation("10.248.0.0/14"),
		reservation("10.252.0.0/15"),
		reservation("10.254.0.0/16"),
		reservation("10.255.0.0/17"),
		reservation("10.255.128.0/18"),
		reservation("10.255.192.0/19"),
		reservation("10.255.224.0/20"),
		reservation("10.255.240.0/21"),
		reservation("10.255.248.0/22"),
		reservation("10.255.252.0/23"),
		reservation("10.255.254.0/24"),
		reservation("10.255.255.0/25"),
		reservation("10.255.255.128/26"),
		reservation("10.255.255.192/27"),
		reservation("10.255.255.224/28"),
		reservation("10.255.255.240/29"),
		live("10.255.255.248/30"),
	}
	start := time.Now()
	v4, _, err := Allocate(cfg, taken, seeded(4))
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.MustParsePrefix("10.255.255.252/30"); v4 != want {
		t.Fatalf("got %s, want %s", v4, want)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("allocation took %v: candidates are being materialised", d)
	}
}

func TestAllocateDualStackPairsByIndex(t *testing.T) {
	cfg := v4Config("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0")
	cfg.EnableIPv6 = true
	cfg.IPv6Network = netip.MustParsePrefix("fc00::/48")
	cfg.IPv6SubnetLen = 64
	cfg.IPv6SubnetMin = netip.MustParseAddr("fc00:0:0:1::")
	cfg.IPv6SubnetMax = netip.MustParseAddr("fc00:0:0:ffff::")
	rnd := seeded(5)
	for range 100 {
		v4, v6, err := Allocate(cfg, nil, rnd)
		if err != nil {
			t.Fatal(err)
		}
		// Index i is 10.244.(i+1).0/24 and fc00:0:0:(i+1)::/64.
		want := netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfc, 0, 0, 0, 0, 0, 0, v4.Addr().As4()[2]}), 64)
		if v6 != want {
			t.Fatalf("%s paired with %s, want %s", v4, v6, want)
		}
		if !Fits(cfg, v4, v6) {
			t.Fatalf("%s & %s does not fit", v4, v6)
		}
	}

	// A lease holding only the IPv6 half of index 0 (a flanneld node with a
	// different pairing) blocks index 0 too.
	small := cfg
	small.SubnetMax = netip.MustParseAddr("10.244.2.0") // two candidates
	taken := []Lease{{
		Subnet:     netip.MustParsePrefix("10.244.200.0/24"),
		IPv6Subnet: netip.MustParsePrefix("fc00:0:0:1::/64"),
		Expiration: time.Now().Add(time.Hour),
	}}
	for seed := range uint64(20) {
		v4, v6, err := Allocate(small, taken, seeded(seed))
		if err != nil {
			t.Fatal(err)
		}
		if v4.String() != "10.244.2.0/24" || v6.String() != "fc00:0:0:2::/64" {
			t.Fatalf("got %s & %s, want 10.244.2.0/24 & fc00:0:0:2::/64", v4, v6)
		}
	}
	taken = append(taken, live("10.244.2.0/24"))
	_, _, err := Allocate(small, taken, seeded(0))
	want := "no free subnet in 10.244.0.0/16 between 10.244.1.0 and 10.244.2.0 paired with fc00::/48 between fc00:0:0:1:: and fc00:0:0:ffff:: (2 leased, 0 reserved)"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant %s", err, want)
	}
}

func TestAllocateIPv6Only(t *testing.T) {
	cfg := netconf.Config{
		EnableIPv6:    true,
		IPv6Network:   netip.MustParsePrefix("fc00::/120"),
		IPv6SubnetLen: 126,
		IPv6SubnetMin: netip.MustParseAddr("fc00::4"),
		IPv6SubnetMax: netip.MustParseAddr("fc00::fc"),
	}
	taken := []Lease{{IPv6Subnet: netip.MustParsePrefix("fc00::/121")}} // .. fc00::7f reserved
	rnd := seeded(6)
	for range 100 {
		v4, v6, err := Allocate(cfg, taken, rnd)
		if err != nil {
			t.Fatal(err)
		}
		if v4.IsValid() || v6.Bits() != 126 || v6.Addr().Less(netip.MustParseAddr("fc00::80")) {
			t.Fatalf("got %s & %s", v4, v6)
		}
	}
	taken = append(taken, Lease{IPv6Subnet: netip.MustParsePrefix("fc00::80/121"), Expiration: time.Now()})
	_, _, err := Allocate(cfg, taken, rnd)
	want := "no free subnet in fc00::/120 between fc00::4 and fc00::fc (1 leased, 1 reserved)"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant %s", err, want)
	}
}

// A huge IPv6 range (2^104 candidates) caps the candidate count at 2^64-1,
// the first fc00::/48 worth of /112s, instead of overflowing.
func TestAllocateHugeIPv6(t *testing.T) {
	cfg := netconf.Config{
		EnableIPv6:    true,
		IPv6Network:   netip.MustParsePrefix("fc00::/8"),
		IPv6SubnetLen: 112,
		IPv6SubnetMin: netip.MustParseAddr("fc00::"),
		IPv6SubnetMax: netip.MustParseAddr("fcff:ffff:ffff:ffff:ffff:ffff:ffff:0"),
	}
	reserved := netip.MustParsePrefix("fc00::/49")
	rnd := seeded(7)
	for range 100 {
		_, v6, err := Allocate(cfg, []Lease{{IPv6Subnet: reserved}}, rnd)
		if err != nil {
			t.Fatal(err)
		}
		if v6.Bits() != 112 || !netip.MustParsePrefix("fc00::/48").Contains(v6.Addr()) || reserved.Overlaps(v6) {
			t.Fatalf("got %s, want a /112 in fc00:0:0:8000::/49", v6)
		}
	}
}

func TestAllocateBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  netconf.Config
	}{
		{name: "nothing enabled", cfg: netconf.Config{}},
		{name: "no network", cfg: netconf.Config{EnableIPv4: true, SubnetLen: 24}},
		{name: "subnet shorter than network", cfg: v4Config("10.244.0.0/16", 8, "10.244.0.0", "10.244.0.0")},
		{name: "range outside network", cfg: v4Config("10.244.0.0/16", 24, "10.245.1.0", "10.245.2.0")},
		{name: "range reversed", cfg: v4Config("10.244.0.0/16", 24, "10.244.9.0", "10.244.2.0")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := Allocate(tc.cfg, nil, seeded(0)); err == nil || errors.Is(err, ErrNoFreeSubnet) {
				t.Fatalf("err = %v, want a config error", err)
			}
		})
	}
}

func TestFits(t *testing.T) {
	cfg := v4Config("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0")
	for _, tc := range []struct {
		name   string
		v4, v6 string
		want   bool
	}{
		{name: "first", v4: "10.244.1.0/24", want: true},
		{name: "last", v4: "10.244.255.0/24", want: true},
		{name: "below min", v4: "10.244.0.0/24"},
		{name: "other network", v4: "10.245.1.0/24"},
		{name: "wrong length", v4: "10.244.2.0/25"},
		{name: "v6 when disabled", v4: "10.244.1.0/24", v6: "fc00:0:0:1::/64"},
		{name: "no v4", v6: "fc00:0:0:1::/64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var v4, v6 netip.Prefix
			if tc.v4 != "" {
				v4 = netip.MustParsePrefix(tc.v4)
			}
			if tc.v6 != "" {
				v6 = netip.MustParsePrefix(tc.v6)
			}
			if got := Fits(cfg, v4, v6); got != tc.want {
				t.Fatalf("Fits(%s, %s) = %v, want %v", v4, v6, got, tc.want)
			}
		})
	}
}

func BenchmarkAllocate1000Leases(b *testing.B) {
	cfg := v4Config("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0")
	rnd := seeded(8)
	var taken []Lease
	for range 1000 {
		v4, _, err := Allocate(cfg, taken, rnd)
		if err != nil {
			b.Fatal(err)
		}
		taken = append(taken, live(v4.String()))
	}
	for b.Loop() {
		if _, _, err := Allocate(cfg, taken, rnd); err != nil {
			b.Fatal(err)
		}
	}
}
