package udp

// Address plan (no kernel involved): this node n1 is 198.18.0.11 on the
// underlay, pods 10.244.1.0/24 and fc00:0:0:1::/64; peer nN is 198.18.0.1N
// (and 2001:db8::1N) with 10.244.N.0/24 and fc00:0:0:N::/64.

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/loomnet/loom/internal/lease"
)

// node returns the lease of node nI (I in 1..9), dual stack, udp.
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

func TestPlan(t *testing.T) {
	ep := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

	flannel := node(3) // flanneld's udp backend writes no BackendType
	flannel.Attrs.BackendType = ""
	vx := node(4)
	vx.Attrs.BackendType = "vxlan"
	overlap := node(5)
	overlap.Subnet = netip.MustParsePrefix("10.244.1.128/25")
	overlap.IPv6Subnet = netip.Prefix{}
	claimsOurIP := node(6)
	claimsOurIP.Attrs.PublicIP = netip.MustParseAddr("198.18.0.11")
	noIP := node(7)
	noIP.Attrs.PublicIP = netip.Addr{}
	selfByName := node(8)
	selfByName.Attrs.NodeName = "n1"
	// A /25 inside n2's /24 (an odd registry, or a reservation): the
	// longer prefix wins for its half.
	narrow := node(9)
	narrow.Subnet = netip.MustParsePrefix("10.244.2.128/25")
	narrow.IPv6Subnet = netip.Prefix{}

	tests := []struct {
		name      string
		peers     []lease.Lease
		underlay6 bool
		hits      map[string]string // inner destination → endpoint ("" : no peer)
		problems  []string          // substrings, one per problem, in order
		peerCount int
	}{{
		name:      "two peers, both families",
		peers:     []lease.Lease{node(2), flannel},
		hits:      map[string]string{"10.244.2.7": "198.18.0.12:8285", "fc00:0:0:3::9": "198.18.0.13:8285", "10.244.9.1": ""},
		peerCount: 2,
	}, {
		name:      "own subnet never a peer",
		peers:     []lease.Lease{node(1), node(2)},
		hits:      map[string]string{"10.244.1.10": "", "fc00:0:0:1::10": ""},
		peerCount: 1,
	}, {
		name:      "other backend skipped",
		peers:     []lease.Lease{vx},
		hits:      map[string]string{"10.244.4.1": ""},
		problems:  []string{"runs backend vxlan"},
		peerCount: 0,
	}, {
		name:      "overlap with own subnet",
		peers:     []lease.Lease{overlap},
		hits:      map[string]string{"10.244.1.200": ""},
		problems:  []string{"overlaps this node's own subnet"},
		peerCount: 0,
	}, {
		name:     "peer claims our public IP",
		peers:    []lease.Lease{claimsOurIP},
		hits:     map[string]string{"10.244.6.1": ""},
		problems: []string{"is this node's", "is this node's"},
	}, {
		name:     "peer without a public IPv4",
		peers:    []lease.Lease{noIP},
		problems: []string{"no IPv4 public address", "no IPv4 public address"},
	}, {
		name:  "self by node name",
		peers: []lease.Lease{selfByName},
		hits:  map[string]string{"10.244.8.1": ""},
	}, {
		name:      "longest prefix",
		peers:     []lease.Lease{node(2), narrow},
		hits:      map[string]string{"10.244.2.1": "198.18.0.12:8285", "10.244.2.200": "198.18.0.19:8285"},
		peerCount: 2,
	}, {
		name:      "IPv6 underlay",
		peers:     []lease.Lease{node(2)},
		underlay6: true,
		hits:      map[string]string{"10.244.2.7": "[2001:db8::12]:8285", "fc00:0:0:2::1": "[2001:db8::12]:8285"},
		peerCount: 1,
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			self := netip.MustParseAddr("198.18.0.11")
			if tc.underlay6 {
				self = netip.MustParseAddr("2001:db8::11")
			}
			tab, ps := plan(planInput{local: node(1), hasLocal: true, peers: tc.peers, port: 8285, underlay6: tc.underlay6, self: self})
			for dst, want := range tc.hits {
				got, ok := tab.lookup(netip.MustParseAddr(dst))
				switch {
				case want == "" && ok:
					t.Errorf("lookup(%s) = %v, want no peer", dst, got)
				case want != "" && (!ok || got != ep(want)):
					t.Errorf("lookup(%s) = %v, %v; want %s", dst, got, ok, want)
				}
			}
			if len(ps) != len(tc.problems) {
				t.Fatalf("problems %+v, want %d", ps, len(tc.problems))
			}
			for i, p := range ps {
				if !strings.Contains(p.reason, tc.problems[i]) || p.fix == "" {
					t.Errorf("problem %d: %+v, want reason with %q and a fix", i, p, tc.problems[i])
				}
			}
			if tab.peers != tc.peerCount {
				t.Errorf("peers = %d, want %d", tab.peers, tc.peerCount)
			}
		})
	}
}

func TestTableLocal(t *testing.T) {
	tab, _ := plan(planInput{local: node(1), hasLocal: true, port: 8285})
	for dst, want := range map[string]bool{
		"10.244.1.0": true, "10.244.1.255": true, "fc00:0:0:1::10": true,
		"10.244.2.1": false, "fc00:0:0:2::1": false, "198.18.0.11": false,
	} {
		if got := tab.isLocal(netip.MustParseAddr(dst)); got != want {
			t.Errorf("isLocal(%s) = %v, want %v", dst, got, want)
		}
	}
	empty, _ := plan(planInput{port: 8285})
	if empty.isLocal(netip.MustParseAddr("10.244.1.1")) {
		t.Error("a table without a local lease delivers packets")
	}
}
