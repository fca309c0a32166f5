package netconf

import (
	"net/netip"
	"testing"
)

// Address plan: pod network 10.244.0.0/16 (/24 node subnets) and
// fd00:10:244::/56 (/64s); underlay 198.18.0.0/24, 2001:db8::/64.

func TestCheckRoutes(t *testing.T) {
	c, err := Parse([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`))
	if err != nil {
		t.Fatal(err)
	}
	route := func(dst, dev, via string, owned bool) HostRoute {
		r := HostRoute{Dst: netip.MustParsePrefix(dst), Dev: dev, Owned: owned}
		if via != "" {
			r.Via = netip.MustParseAddr(via)
		}
		return r
	}
	for _, tc := range []struct {
		name   string
		routes []HostRoute
		want   string // "" for no error
	}{
		{name: "no routes"},
		{name: "a node's usual routes", routes: []HostRoute{
			route("0.0.0.0/0", "eth0", "198.18.0.1", false),
			route("198.18.0.0/24", "eth0", "", false),
			route("::/0", "eth0", "2001:db8::1", false),
			route("2001:db8::/64", "eth0", "", false),
		}},
		{name: "the pod network's own routes", routes: []HostRoute{
			route("10.244.0.0/16", "flannel0", "", true),
			route("10.244.3.0/24", "cni0", "", true),
			route("10.244.4.0/24", "flannel.1", "10.244.4.0", true),
			route("10.244.5.0/24", "eth0", "198.18.0.12", true), // host-gw, protocol 108
		}},
		{name: "a node subnet route flanneld's host-gw left", routes: []HostRoute{
			route("10.244.9.0/24", "eth0", "198.18.0.19", false),
		}},
		{
			name:   "a VPN route covering the pod network",
			routes: []HostRoute{route("10.0.0.0/8", "tun0", "192.0.2.1", false)},
			want:   "Network 10.244.0.0/16 overlaps this node's route 10.0.0.0/8 via 192.0.2.1 dev tun0: traffic to those addresses would go to pods or to the host depending on which route is more specific; set Network to a range no route of the node covers, or remove the route",
		},
		{
			name:   "a blackhole inside the pod network",
			routes: []HostRoute{route("10.244.128.0/17", "", "", false)},
			want:   "Network 10.244.0.0/16 overlaps this node's route 10.244.128.0/17: traffic to those addresses would go to pods or to the host depending on which route is more specific; set Network to a range no route of the node covers, or remove the route",
		},
		{
			name:   "ipv6",
			routes: []HostRoute{route("fd00::/8", "wg0", "", false)},
			want:   "IPv6Network fd00:10:244::/56 overlaps this node's route fd00::/8 dev wg0: traffic to those addresses would go to pods or to the host depending on which route is more specific; set IPv6Network to a range no route of the node covers, or remove the route",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := ""
			if err := c.CheckRoutes(tc.routes); err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Errorf("CheckRoutes:\n got  %q\n want %q", got, tc.want)
			}
		})
	}
}
