package lease

// Micro-benchmarks of subnet allocation with a nearly full and a full
// range: 10.0.0.0/8 in /24s (65,535 candidates, 10.0.1.0 to 10.255.255.0)
// and flannel's default 10.244.0.0/16 in /24s (255 candidates). Every
// agent start with no lease of its own runs Allocate over the whole
// listing.
//
//	go test -run '^$' -bench AllocateNearlyFull -benchmem ./internal/lease/

import (
	"errors"
	"net/netip"
	"testing"
)

// takenAllBut leases every /24 of network but free of them, spread evenly
// (none left when free is 0), in key order as a registry listing returns
// them. The network's first /24 is below SubnetMin and never leased.
func takenAllBut(b *testing.B, network string, free int) []Lease {
	b.Helper()
	p := netip.MustParsePrefix(network)
	total := 1 << (24 - p.Bits())
	step := 1
	if free > 0 {
		step = total / free
	}
	base := p.Addr().As4()
	var taken []Lease
	for i := 1; i < total; i++ {
		if free > 0 && i%step == step/2 {
			continue
		}
		a := base
		a[1] += byte(i >> 8)
		a[2] = byte(i)
		taken = append(taken, live(netip.PrefixFrom(netip.AddrFrom4(a), 24).String()))
	}
	if len(taken) == 0 {
		b.Fatalf("no leases for %s", network)
	}
	return taken
}

func BenchmarkAllocateNearlyFull(b *testing.B) {
	for _, tc := range []struct {
		name    string
		network string
		lo, hi  string
		free    int // candidates left free
	}{
		{name: "10.0.0.0_8-65535-candidates-16-free", network: "10.0.0.0/8", lo: "10.0.1.0", hi: "10.255.255.0", free: 16},
		{name: "10.244.0.0_16-255-candidates-1-free", network: "10.244.0.0/16", lo: "10.244.1.0", hi: "10.244.255.0", free: 1},
	} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := v4Config(tc.network, 24, tc.lo, tc.hi)
			taken := takenAllBut(b, tc.network, tc.free)
			rnd := seeded(1)
			for b.Loop() {
				if _, _, err := Allocate(cfg, taken, rnd); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(taken)), "leases")
		})
	}
}

// BenchmarkAllocateFull is the exhausted range: every candidate taken, the
// answer is ErrNoFreeSubnet with its counts.
func BenchmarkAllocateFull(b *testing.B) {
	cfg := v4Config("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0")
	taken := takenAllBut(b, "10.0.0.0/8", 0)
	rnd := seeded(1)
	for b.Loop() {
		if _, _, err := Allocate(cfg, taken, rnd); !errors.Is(err, ErrNoFreeSubnet) {
			b.Fatalf("Allocate on a full range: %v, want ErrNoFreeSubnet", err)
		}
	}
	b.ReportMetric(float64(len(taken)), "leases")
}
