package vxlan

// Address plan (no kernel involved): this node n1 is 198.18.0.11/24 and
// 2001:db8::11/64 on eth0 (#2), with flannel.1 (#10) and flannel-v6.1 (#11);
// pods 10.244.1.0/24 and fc00:0:0:1::/64. Peer nN is 198.18.0.1N /
// 2001:db8::1N with 10.244.N.0/24 and fc00:0:0:N::/64, and VTEP MACs
// VtepMAC("nN", device). "far" peers sit in 198.19.0.0/24 and 2001:db8:1::/64,
// behind a router.

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/loomnet/loom/internal/backend/fdb"
	"github.com/loomnet/loom/internal/backend/neigh"
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
)

// data renders a lease's vxlan backend data, as a node's BackendData does.
func data(mac net.HardwareAddr) json.RawMessage {
	b, err := json.Marshal(backendData{VNI: 1, VtepMAC: mac.String()})
	if err != nil {
		panic(err)
	}
	return b
}

// node returns the lease of node nI (I in 1..9), dual stack, vxlan.
func node(i int) lease.Lease {
	d := fmt.Sprint(i)
	name := "n" + d
	v6 := netip.MustParseAddr("2001:db8::1" + d)
	return lease.Lease{
		Subnet:     netip.MustParsePrefix("10.244." + d + ".0/24"),
		IPv6Subnet: netip.MustParsePrefix("fc00:0:0:" + d + "::/64"),
		Attrs: lease.Attrs{
			PublicIP:      netip.MustParseAddr("198.18.0.1" + d),
			PublicIPv6:    &v6,
			BackendType:   Type,
			BackendData:   data(VtepMAC(name, "flannel.1")),
			BackendV6Data: data(VtepMAC(name, "flannel-v6.1")),
			NodeName:      name,
		},
	}
}

// v4only strips the IPv6 half of a lease.
func v4only(l lease.Lease) lease.Lease {
	l.IPv6Subnet = netip.Prefix{}
	l.Attrs.PublicIPv6 = nil
	l.Attrs.BackendV6Data = nil
	return l
}

// far moves a lease's public addresses behind the router.
func far(l lease.Lease) lease.Lease {
	d := strings.TrimPrefix(l.Attrs.NodeName, "n")
	l.Attrs.PublicIP = netip.MustParseAddr("198.19.0.1" + d)
	v6 := netip.MustParseAddr("2001:db8:1::1" + d)
	l.Attrs.PublicIPv6 = &v6
	return l
}

func testWorld(directRouting bool) world {
	return world{
		vni:           1,
		directRouting: directRouting,
		devs:          []famDev{{v6: false, name: "flannel.1", index: 10}, {v6: true, name: "flannel-v6.1", index: 11}},
		ext: extIface{name: "eth0", index: 2, addrs: []netip.Prefix{
			netip.MustParsePrefix("198.18.0.11/24"),
			netip.MustParsePrefix("2001:db8::11/64"),
			netip.MustParsePrefix("fe80::1/64"),
		}},
	}
}

// overlay is what plan must give a peer reached through VXLAN in one
// family.
type overlay struct {
	neigh neigh.Neigh
	fdb   fdb.Entry
	route routes.Route
}

func viaVXLAN(l lease.Lease, v6 bool) overlay {
	dev, idx, subnet, public := "flannel.1", 10, l.Subnet, l.Attrs.PublicIP
	if v6 {
		dev, idx, subnet, public = "flannel-v6.1", 11, l.IPv6Subnet, *l.Attrs.PublicIPv6
	}
	mac := VtepMAC(l.Attrs.NodeName, dev)
	return overlay{
		neigh: neigh.Neigh{Dev: dev, IP: subnet.Addr(), MAC: mac},
		fdb:   fdb.Entry{Dev: dev, MAC: mac, Dst: public},
		route: routes.Route{Dst: subnet, Gw: subnet.Addr(), LinkIndex: idx, OnLink: true},
	}
}

func direct(l lease.Lease, v6 bool) routes.Route {
	if v6 {
		return routes.Route{Dst: l.IPv6Subnet, Gw: *l.Attrs.PublicIPv6, LinkIndex: 2}
	}
	return routes.Route{Dst: l.Subnet, Gw: l.Attrs.PublicIP, LinkIndex: 2}
}

func TestPlan(t *testing.T) {
	hostgw := v4only(node(5))
	hostgw.Attrs.BackendType = "host-gw"
	selfByName := v4only(node(6))
	selfByName.Attrs.NodeName = "n1"
	noData := v4only(node(7))
	noData.Attrs.BackendData = nil
	otherVNI := v4only(node(8))
	otherVNI.Attrs.BackendData = json.RawMessage(`{"VNI":2,"VtepMAC":"02:00:00:00:00:08"}`)
	sameMAC := v4only(node(9))
	sameMAC.Attrs.BackendData = node(2).Attrs.BackendData
	overlap := v4only(node(7))
	overlap.Subnet = netip.MustParsePrefix("10.244.1.128/25")
	ourIP := v4only(node(8))
	ourIP.Attrs.PublicIP = netip.MustParseAddr("198.18.0.11")
	noV6IP := node(4)
	noV6IP.Attrs.PublicIPv6 = nil
	macUpper := v4only(node(3))
	macUpper.Attrs.BackendData = json.RawMessage(`{"vni":1,"vtepmac":"` + strings.ToUpper(VtepMAC("n3", "flannel.1").String()) + `"}`)

	tests := []struct {
		name          string
		directRouting bool
		peers         []lease.Lease
		wantVXLAN     []overlay      // in order
		wantDirect    []routes.Route // in order, after the VXLAN routes of the same peer
		wantRoutes    []routes.Route // when set: the exact route list
		wantProblems  []string       // kind: a substring of the reason, in order
	}{
		{
			name:  "dual-stack peers: neighbour, FDB entry and onlink route per family, one code path",
			peers: []lease.Lease{node(3), node(2)},
			wantVXLAN: []overlay{
				viaVXLAN(node(2), false), viaVXLAN(node(2), true),
				viaVXLAN(node(3), false), viaVXLAN(node(3), true),
			},
		},
		{
			name:          "DirectRouting: on-link peers get a direct route and nothing else; routed ones VXLAN",
			directRouting: true,
			peers:         []lease.Lease{node(2), far(node(3))},
			wantVXLAN:     []overlay{viaVXLAN(far(node(3)), false), viaVXLAN(far(node(3)), true)},
			wantRoutes: []routes.Route{
				direct(node(2), false), direct(node(2), true),
				viaVXLAN(far(node(3)), false).route, viaVXLAN(far(node(3)), true).route,
			},
		},
		{
			name:      "without DirectRouting, on-link peers use VXLAN too",
			peers:     []lease.Lease{v4only(node(2))},
			wantVXLAN: []overlay{viaVXLAN(node(2), false)},
		},
		{
			name:         "a peer of another backend gets nothing",
			peers:        []lease.Lease{hostgw, v4only(node(2))},
			wantVXLAN:    []overlay{viaVXLAN(node(2), false)},
			wantProblems: []string{skipOtherBackend + `: the peer runs the "host-gw" backend`},
		},
		{
			name:  "ourselves, by key or by node name: nothing",
			peers: []lease.Lease{node(1), selfByName},
		},
		{
			name:      "keys and MAC spelling are flannel's: case-insensitive",
			peers:     []lease.Lease{macUpper},
			wantVXLAN: []overlay{viaVXLAN(node(3), false)},
		},
		{
			name:         "a peer without BackendData: nothing, never half",
			peers:        []lease.Lease{noData},
			wantProblems: []string{skipUnusable + ": the lease's BackendData is unusable: it is missing"},
		},
		{
			name:         "another VNI",
			peers:        []lease.Lease{otherVNI},
			wantProblems: []string{skipUnusable + ": the peer's VXLAN network identifier is 2, this node's 1"},
		},
		{
			name:         "two peers with one VTEP MAC: the first keeps it",
			peers:        []lease.Lease{sameMAC, v4only(node(2))},
			wantVXLAN:    []overlay{viaVXLAN(node(2), false)},
			wantProblems: []string{skipUnusable + ": its VtepMAC " + VtepMAC("n2", "flannel.1").String() + " is also the VtepMAC of 10.244.2.0-24 (node n2)"},
		},
		{
			name:         "overlaps our subnet",
			peers:        []lease.Lease{overlap},
			wantProblems: []string{skipUnusable + ": the subnet overlaps this node's own subnet 10.244.1.0/24"},
		},
		{
			name:         "claims our public IP",
			peers:        []lease.Lease{ourIP},
			wantProblems: []string{skipUnusable + ": the peer's public address 198.18.0.11 is an address of this node's eth0"},
		},
		{
			name:         "an IPv6 subnet without an IPv6 public address: the IPv4 half still works",
			peers:        []lease.Lease{noV6IP},
			wantVXLAN:    []overlay{viaVXLAN(node(4), false)},
			wantProblems: []string{skipUnusable + ": the lease has an IPv6 subnet but no IPv6 public address"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := plan(node(1), tt.peers, testWorld(tt.directRouting))
			var wantN []neigh.Neigh
			var wantF []fdb.Entry
			var wantR []routes.Route
			for _, o := range tt.wantVXLAN {
				wantN, wantF, wantR = append(wantN, o.neigh), append(wantF, o.fdb), append(wantR, o.route)
			}
			if tt.wantRoutes != nil {
				wantR = tt.wantRoutes
			}
			if fmt.Sprint(d.neighs) != fmt.Sprint(wantN) {
				t.Errorf("neighbours\n %v\nwant\n %v", d.neighs, wantN)
			}
			if fmt.Sprint(d.fdbs) != fmt.Sprint(wantF) {
				t.Errorf("FDB entries\n %v\nwant\n %v", d.fdbs, wantF)
			}
			if !slices.Equal(d.routes, wantR) {
				t.Errorf("routes\n %v\nwant\n %v", d.routes, wantR)
			}
			if d.vxlan != len(tt.wantVXLAN) || len(d.direct)+d.vxlan != len(d.routes) {
				t.Errorf("counted %d vxlan and %d direct subnets for %d routes", d.vxlan, len(d.direct), len(d.routes))
			}
			var got []string
			for _, p := range d.problems {
				got = append(got, p.kind+": "+p.reason)
				if p.fix == "" || p.node == "" || p.peer == "" {
					t.Errorf("problem %+v lacks a node, a lease or a fix", p)
				}
			}
			if len(got) != len(tt.wantProblems) {
				t.Fatalf("problems\n %q\nwant\n %q", got, tt.wantProblems)
			}
			for i := range got {
				if !strings.HasPrefix(got[i], tt.wantProblems[i]) {
					t.Errorf("problem %q, want it to start with %q", got[i], tt.wantProblems[i])
				}
			}
		})
	}
}

// The decision is per peer and per family: an IPv4 underlay address can be
// on-link while the same peer's IPv6 one is routed.
func TestPlanDirectRoutingPerFamily(t *testing.T) {
	p := node(2)
	v6 := netip.MustParseAddr("2001:db8:1::12")
	p.Attrs.PublicIPv6 = &v6
	d := plan(node(1), []lease.Lease{p}, testWorld(true))
	want := []routes.Route{direct(p, false), viaVXLAN(p, true).route}
	if !slices.Equal(d.routes, want) {
		t.Errorf("routes %v, want %v", d.routes, want)
	}
	if len(d.neighs) != 1 || d.neighs[0].Dev != "flannel-v6.1" || len(d.fdbs) != 1 || d.fdbs[0].Dst != v6 {
		t.Errorf("neighbours %v, FDB %v: want only the IPv6 leg's", d.neighs, d.fdbs)
	}
}

// An IPv4-only node programs nothing for its peers' IPv6 halves.
func TestPlanOnlyOwnFamilies(t *testing.T) {
	w := testWorld(false)
	w.devs = w.devs[:1]
	d := plan(v4only(node(1)), []lease.Lease{node(2)}, w)
	o := viaVXLAN(node(2), false)
	if fmt.Sprint(d.neighs, d.fdbs, d.routes) != fmt.Sprint([]neigh.Neigh{o.neigh}, []fdb.Entry{o.fdb}, []routes.Route{o.route}) {
		t.Errorf("plan = %v %v %v, want only the IPv4 leg", d.neighs, d.fdbs, d.routes)
	}
}
