package registry

// The Guard against a reference: the straightforward implementation it
// replaced (every lease compared with every accepted one), kept here to
// check that the indexed one gives the same answers and to measure what the
// index saves. Address plan: pods 10.244.0.0/16 (fc00::/48 for IPv6), node
// public IPs 198.18.0.0/24 and 2001:db8::/64; no store, no kernel.
//
//	go test -run '^$' -bench GuardFilter -benchmem ./internal/registry/

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
)

// refGuard is the Guard as it was before the index: check compares a lease
// with every accepted one. Two differences from that code, both also in
// the Guard: held leases are released in key order (it took Go's random
// map order), and a held lease rewritten with an unusable public IP is
// forgotten (it stayed held, and its old version could be released).
type refGuard struct {
	cfg       netconf.Config
	anySubnet bool
	onSkip    func(l lease.Lease, reason, detail string)
	accepted  map[string]lease.Lease
	held      map[string]lease.Lease
}

func newRefGuard(c GuardConfig) *refGuard {
	return &refGuard{cfg: c.Network, anySubnet: c.AnySubnet, onSkip: c.OnSkip,
		accepted: map[string]lease.Lease{}, held: map[string]lease.Lease{}}
}

func (g *refGuard) Filter(events []lease.Event) []lease.Event {
	var out []lease.Event
	for _, ev := range events {
		key := ev.Lease.Key()
		switch ev.Type {
		case lease.Added:
			reason, detail := g.check(*ev.Lease)
			if reason == "" {
				g.accepted[key] = *ev.Lease
				delete(g.held, key)
				out = append(out, ev)
				continue
			}
			g.onSkip(*ev.Lease, reason, detail)
			if reason != SkipOverlap {
				delete(g.held, key)
			}
			if old, ok := g.accepted[key]; ok {
				delete(g.accepted, key)
				out = append(out, lease.Event{Type: lease.Removed, Lease: &old})
				out = append(out, g.release(old)...)
			}
		case lease.Removed:
			delete(g.held, key)
			if old, ok := g.accepted[key]; ok {
				delete(g.accepted, key)
				out = append(out, lease.Event{Type: lease.Removed, Lease: &old})
				out = append(out, g.release(old)...)
			}
		}
	}
	return out
}

func (g *refGuard) release(gone lease.Lease) []lease.Event {
	var out []lease.Event
	keys := make([]string, 0, len(g.held))
	for k := range g.held {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, key := range keys {
		l, ok := g.held[key]
		if !ok || !overlaps(l, gone) {
			continue
		}
		if reason, _ := g.check(l); reason == "" {
			delete(g.held, key)
			g.accepted[key] = l
			out = append(out, lease.Event{Type: lease.Added, Lease: &l})
		}
	}
	return out
}

func (g *refGuard) check(l lease.Lease) (reason, detail string) {
	key := l.Key()
	for _, f := range []struct {
		subnet, network netip.Prefix
		enabled         bool
		name            string
	}{
		{l.Subnet, g.cfg.Network, g.cfg.EnableIPv4, "Network"},
		{l.IPv6Subnet, g.cfg.IPv6Network, g.cfg.EnableIPv6, "IPv6Network"},
	} {
		if !f.subnet.IsValid() {
			continue
		}
		if !f.enabled || !contains(f.network, f.subnet) {
			return SkipOutsideNetwork, fmt.Sprintf("subnet %s is not inside %s %s", f.subnet, f.name, f.network)
		}
	}
	var over []string
	for k, other := range g.accepted {
		if k != key && overlaps(l, other) {
			over = append(over, other.String())
		}
	}
	slices.Sort(over)
	if !g.anySubnet && !lease.Fits(g.cfg, l.Subnet, l.IPv6Subnet) {
		detail = fmt.Sprintf("not a subnet the network config hands out (SubnetLen %d between %s and %s)", g.cfg.SubnetLen, g.cfg.SubnetMin, g.cfg.SubnetMax)
		if len(over) > 0 {
			detail += "; it overlaps " + strings.Join(over, ", ")
		}
		return SkipBadSubnet, detail
	}
	pg := &Guard{cfg: g.cfg}
	if len(over) > 0 {
		if r, _ := pg.publicIPs(l.Attrs); r == "" {
			g.held[key] = l
		} else {
			delete(g.held, key)
		}
		return SkipOverlap, "overlaps " + strings.Join(over, ", ")
	}
	return pg.publicIPs(l.Attrs)
}

// guardConfigs are the configs the comparison runs under: IPv4 /24s, dual
// stack (where two keys can pair one IPv4 subnet with two IPv6 ones), and
// Kubernetes mode (any length: nested subnets are overlaps, and held).
var guardConfigs = []struct {
	name      string
	netConf   string
	anySubnet bool
	dual      bool
}{
	{"ipv4", `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`, false, false},
	{"dual", `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`, false, true},
	{"any-length", `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`, true, true},
	{"ipv4-any-length", `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`, true, false},
}

// fuzzEvents turns bytes into lease events over a small address space, so
// that overlaps, nesting, rewrites and removals are common. Each event takes
// four bytes: type and IPv4 shape, IPv4 subnet, IPv6 subnet, public IP.
// With dual, most leases have an IPv6 subnet; without, few do.
func fuzzEvents(b []byte, dual bool) []lease.Event {
	var evs []lease.Event
	for len(b) >= 4 {
		op, s4, s6, ip := b[0], b[1], b[2], b[3]
		b = b[4:]
		var l lease.Lease
		if op&0x0e != 0 { // else IPv6 only
			bits := []int{24, 24, 24, 23, 22, 25, 16, 8}[op>>1&7]
			third := s4 & 15
			if s4&0x30 == 0 { // now and then, far apart
				third = s4
			}
			l.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, third, 0}), bits).Masked()
			if s4&0xc0 == 0xc0 {
				l.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, s4 & 15, 0}), 24)
			}
		}
		withV6 := s6&0xf0 == 0xf0
		if dual {
			withV6 = s6&0xe0 != 0xe0
		}
		if withV6 || !l.Subnet.IsValid() {
			bits := []int{64, 64, 64, 63, 62, 48, 65, 32}[s6>>4&7]
			a := netip.AddrFrom16([16]byte{0xfc, 0, 0, 0, 0, 0, 0, s6 & 15})
			l.IPv6Subnet = netip.PrefixFrom(a, bits).Masked()
		}
		switch ip & 15 {
		case 0:
			l.Attrs.PublicIP = netip.MustParseAddr("127.0.0.1")
		case 1:
			l.Attrs.PublicIP = netip.IPv4Unspecified()
		case 2:
			v6 := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: ip >> 4})
			l.Attrs.PublicIPv6 = &v6
		case 3:
			l.Attrs.PublicIP = netip.AddrFrom4([4]byte{10, 244, 1, ip >> 4})
		default:
			l.Attrs.PublicIP = netip.AddrFrom4([4]byte{198, 18, 0, ip >> 4})
		}
		l.Attrs.NodeName = fmt.Sprint("n", ip>>4)
		typ := lease.Added
		if op&1 != 0 && ip&0x40 != 0 {
			typ = lease.Removed
		}
		evs = append(evs, lease.Event{Type: typ, Lease: &l})
	}
	return evs
}

// compareGuards feeds events, in batches of batch, to a Guard and to the
// reference, and fails on the first difference in what they pass on or
// skip.
func compareGuards(t *testing.T, cfg netconf.Config, anySubnet bool, events []lease.Event, batch int) {
	t.Helper()
	var gotSkips, wantSkips []string
	record := func(to *[]string) func(lease.Lease, string, string) {
		return func(l lease.Lease, reason, detail string) {
			*to = append(*to, l.String()+" "+reason+": "+detail)
		}
	}
	g := NewGuard(GuardConfig{Network: cfg, AnySubnet: anySubnet, OnSkip: record(&gotSkips)})
	ref := newRefGuard(GuardConfig{Network: cfg, AnySubnet: anySubnet, OnSkip: record(&wantSkips)})
	show := func(evs []lease.Event) string {
		var s []string
		for _, ev := range evs {
			s = append(s, fmt.Sprintf("%v %s@%v/%v", ev.Type, ev.Lease, ev.Lease.Attrs.PublicIP, ev.Lease.Attrs.PublicIPv6))
		}
		return strings.Join(s, "; ")
	}
	for i := 0; i < len(events); i += batch {
		in := events[i:min(i+batch, len(events))]
		got, want := show(g.Filter(in)), show(ref.Filter(in))
		if got != want {
			t.Fatalf("after %s:\npassed %s\nreference passed %s", show(events[:i+len(in)]), got, want)
		}
		if !slices.Equal(gotSkips, wantSkips) {
			t.Fatalf("after %s:\nskipped %q\nreference skipped %q", show(events[:i+len(in)]), gotSkips, wantSkips)
		}
	}
}

func FuzzGuardMatchesReference(f *testing.F) {
	f.Add([]byte{0x02, 0x01, 0x01, 0x08, 0x02, 0x01, 0x02, 0x10, 0x03, 0x01, 0x01, 0x48})
	f.Add([]byte{0x0c, 0x00, 0x05, 0x08, 0x02, 0x01, 0x05, 0x10, 0x02, 0x02, 0x35, 0x18, 0x0d, 0x00, 0x05, 0x48})
	f.Add([]byte{0x02, 0x03, 0x03, 0x08, 0x02, 0x03, 0x04, 0x10, 0x02, 0x03, 0x04, 0x00, 0x03, 0x03, 0x03, 0x48})
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, c := range guardConfigs {
			cfg := testConfig(t, c.netConf)
			events := fuzzEvents(b, c.dual)
			compareGuards(t, cfg, c.anySubnet, events, 1)
			compareGuards(t, cfg, c.anySubnet, events, 3)
		}
	})
}

// Long random sequences, beyond what the fuzz seeds reach in a normal run.
func TestGuardMatchesReference(t *testing.T) {
	for _, c := range guardConfigs {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig(t, c.netConf)
			for seed := range uint64(40) {
				b := make([]byte, 4*300)
				x := seed*0x9e3779b97f4a7c15 + 1
				for i := 0; i < len(b); i += 8 {
					x ^= x << 13
					x ^= x >> 7
					x ^= x << 17
					binary.LittleEndian.PutUint64(b[i:], x)
				}
				compareGuards(t, cfg, c.anySubnet, fuzzEvents(b, c.dual), 1+int(seed%5))
			}
		})
	}
}

// A lease held for an overlap, then rewritten with a loopback public IP:
// when the overlap goes, nothing is released (the old version, with its
// usable address, must not reach the data path).
func TestGuardForgetsHeldLeaseTurnedBad(t *testing.T) {
	cfg := testConfig(t, `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`)
	g := NewGuard(GuardConfig{Network: cfg})
	mk := func(v6, ip string) lease.Lease {
		return lease.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), IPv6Subnet: netip.MustParsePrefix(v6),
			Attrs: lease.Attrs{PublicIP: netip.MustParseAddr(ip)}, Expiration: time.Now().Add(time.Hour)}
	}
	first := mk("fc00:0:0:1::/64", "198.18.0.11")
	second := mk("fc00:0:0:2::/64", "198.18.0.12")
	g.Filter([]lease.Event{{Type: lease.Added, Lease: &first}, {Type: lease.Added, Lease: &second}})
	g.Filter([]lease.Event{{Type: lease.Added, Lease: new(mk("fc00:0:0:2::/64", "127.0.0.1"))}})
	got := g.Filter([]lease.Event{{Type: lease.Removed, Lease: &first}})
	if len(got) != 1 || got[0].Type != lease.Removed {
		t.Fatalf("after the holder went: %v, want only its removal", got)
	}
}

// guardBenchLeases are n vxlan leases on the /29s of 10.244.0.0/16 (from
// the second: the first is not handed out), in the order a store lists
// them (by key, as text).
func guardBenchLeases(n int) []lease.Event {
	evs := make([]lease.Event, n)
	for j := range evs {
		i := j + 1
		subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i >> 5), byte(i&31) << 3}), 29)
		evs[j] = lease.Event{Type: lease.Added, Lease: &lease.Lease{Subnet: subnet,
			Attrs: lease.Attrs{PublicIP: netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), BackendType: "vxlan"}}}
	}
	slices.SortFunc(evs, func(a, b lease.Event) int { return strings.Compare(a.Lease.Key(), b.Lease.Key()) })
	return evs
}

// 5,000 leases listed at start, then 10% of them rewritten one event at a
// time: the Guard next to the reference.
func BenchmarkGuardFilter5000(b *testing.B) {
	cfg, err := netconf.Parse([]byte(`{"Network":"10.244.0.0/16","SubnetLen":29,"Backend":{"Type":"vxlan"}}`))
	if err != nil {
		b.Fatal(err)
	}
	evs := guardBenchLeases(5000)
	type filter interface {
		Filter([]lease.Event) []lease.Event
	}
	for _, impl := range []struct {
		name string
		mk   func() filter
	}{
		{"indexed", func() filter { return NewGuard(GuardConfig{Network: cfg}) }},
		{"reference", func() filter {
			return newRefGuard(GuardConfig{Network: cfg, OnSkip: func(lease.Lease, string, string) {}})
		}},
	} {
		b.Run(impl.name+"/list", func(b *testing.B) {
			for b.Loop() {
				if got := impl.mk().Filter(evs); len(got) != len(evs) {
					b.Fatalf("passed %d of %d", len(got), len(evs))
				}
			}
		})
		b.Run(impl.name+"/update-10pct", func(b *testing.B) {
			g := impl.mk()
			g.Filter(evs)
			for b.Loop() {
				for i := 0; i < len(evs); i += 10 {
					if got := g.Filter(evs[i : i+1]); len(got) != 1 {
						b.Fatalf("passed %v", got)
					}
				}
			}
		})
	}
}
