package hostgw

// Address plan (no kernel involved): this node n1 is 198.18.0.11/24 and
// 2001:db8::11/64 on eth0 (#2), pods 10.244.1.0/24 and fc00:0:0:1::/64;
// peer nN is 198.18.0.1N / 2001:db8::1N with 10.244.N.0/24, fc00:0:0:N::/64.

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
)

// node returns the lease of node nI (I in 1..9), dual stack, host-gw.
func node(i int) lease.Lease {
	d := string(rune('0' + i))
	v6 := netip.MustParseAddr("2001:db8::1" + d)
	return lease.Lease{
		Subnet:     netip.MustParsePrefix("10.244." + d + ".0/24"),
		IPv6Subnet: netip.MustParsePrefix("fc00:0:0:" + d + "::/64"),
		Attrs: lease.Attrs{
			PublicIP:    netip.MustParseAddr("198.18.0.1" + d),
			PublicIPv6:  &v6,
			BackendType: Type,
			NodeName:    "n" + d,
		},
	}
}

// v4only strips the IPv6 half of a lease.
func v4only(l lease.Lease) lease.Lease {
	l.IPv6Subnet = netip.Prefix{}
	l.Attrs.PublicIPv6 = nil
	return l
}

func TestPlan(t *testing.T) {
	ext := extIface{name: "eth0", index: 2, addrs: []netip.Prefix{
		netip.MustParsePrefix("198.18.0.11/24"),
		netip.MustParsePrefix("2001:db8::11/64"),
		netip.MustParsePrefix("fe80::1/64"),
	}}
	route := func(dst, gw string) routes.Route {
		return routes.Route{Dst: netip.MustParsePrefix(dst), Gw: netip.MustParseAddr(gw), LinkIndex: 2}
	}
	far := v4only(node(5))
	far.Attrs.PublicIP = netip.MustParseAddr("198.19.5.5")
	noV6IP := node(6)
	noV6IP.Attrs.PublicIPv6 = nil
	overlap := v4only(node(7))
	overlap.Subnet = netip.MustParsePrefix("10.244.1.128/25")
	claimsOurIP := v4only(node(8))
	claimsOurIP.Attrs.PublicIP = netip.MustParseAddr("198.18.0.11")
	selfByName := v4only(node(9))
	selfByName.Attrs.NodeName = "n1"

	tests := []struct {
		name         string
		peers        []lease.Lease
		wantRoutes   []routes.Route
		wantProblems []string // one substring of each problem's reason, in order
	}{
		{
			name:  "dual-stack peers: one route per family, same shape",
			peers: []lease.Lease{node(3), node(2)},
			wantRoutes: []routes.Route{
				route("10.244.2.0/24", "198.18.0.12"), route("fc00:0:0:2::/64", "2001:db8::12"),
				route("10.244.3.0/24", "198.18.0.13"), route("fc00:0:0:3::/64", "2001:db8::13"),
			},
		},
		{
			name:         "not on-link: no route, others unaffected",
			peers:        []lease.Lease{far, v4only(node(2))},
			wantRoutes:   []routes.Route{route("10.244.2.0/24", "198.18.0.12")},
			wantProblems: []string{"not on-link on eth0 (its subnets: 198.18.0.0/24, 2001:db8::/64)"},
		},
		{
			name:         "IPv6 subnet without an IPv6 public address",
			peers:        []lease.Lease{noV6IP},
			wantRoutes:   []routes.Route{route("10.244.6.0/24", "198.18.0.16")},
			wantProblems: []string{"no IPv6 public address"},
		},
		{
			name:         "overlaps our own subnet",
			peers:        []lease.Lease{overlap},
			wantProblems: []string{"overlaps this node's own subnet"},
		},
		{
			name:         "claims our public IP",
			peers:        []lease.Lease{claimsOurIP},
			wantProblems: []string{"is an address of this node's eth0"},
		},
		{
			name:  "ourselves, by key or by node name: nothing",
			peers: []lease.Lease{node(1), selfByName},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, ps := plan(node(1), tt.peers, ext)
			if !slices.Equal(rs, tt.wantRoutes) {
				t.Errorf("routes\n %v\nwant\n %v", rs, tt.wantRoutes)
			}
			if len(ps) != len(tt.wantProblems) {
				t.Fatalf("problems %+v, want %d", ps, len(tt.wantProblems))
			}
			for i, p := range ps {
				if !strings.Contains(p.reason, tt.wantProblems[i]) || p.fix == "" || p.node == "" {
					t.Errorf("problem %+v, want reason containing %q, a node and a fix", p, tt.wantProblems[i])
				}
			}
		})
	}
}

func TestNewConfigErrors(t *testing.T) {
	for _, cfg := range []Config{
		{},                            // no interface
		{ExtLink: "eth0", Resync: -1}, // negative resync
		{ExtLink: "eth0", NetNSPath: "/nonexistent/loom-ns"}, // namespace missing
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}
