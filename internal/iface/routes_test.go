package iface

import (
	"net"
	"slices"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/loomnet/loom/internal/netconf"
)

// In setup's namespace, add what a node may have besides its underlay: a
// VPN-like route over the pod network, a blackhole, loom's own route
// (protocol 108) and a route on cni0. HostRoutes reports each, marks the
// pod network's own, and the agent's check refuses only the foreign ones.
func TestHostRoutes(t *testing.T) {
	n := setup(t)
	var routes []netconf.HostRoute
	err := n.Do(func(ns.NetNS) error {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = "cni0"
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
			return err
		}
		cni0, _ := netlink.LinkByName("cni0")
		if err := netlink.LinkSetUp(cni0); err != nil {
			return err
		}
		eth1, _ := netlink.LinkByName("eth1")
		for _, r := range []*netlink.Route{
			{LinkIndex: eth1.Attrs().Index, Dst: cidr("10.0.0.0/8"), Gw: net.ParseIP("198.18.0.254")},
			{Dst: cidr("10.244.128.0/17"), Type: unix.RTN_BLACKHOLE},
			{LinkIndex: eth1.Attrs().Index, Dst: cidr("10.244.5.0/24"), Gw: net.ParseIP("198.18.0.12"), Protocol: ownProtocol},
			{LinkIndex: cni0.Attrs().Index, Dst: cidr("10.244.3.0/24"), Scope: netlink.SCOPE_LINK},
		} {
			if err := netlink.RouteAdd(r); err != nil {
				return err
			}
		}
		var err error
		routes, err = HostRoutes()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range routes {
		s := r.String()
		if r.Owned {
			s += " (owned)"
		}
		got = append(got, s)
	}
	for _, want := range []string{
		"10.0.0.0/8 via 198.18.0.254 dev eth1",
		"10.244.128.0/17",
		"10.244.5.0/24 via 198.18.0.12 dev eth1 (owned)",
		"10.244.3.0/24 dev cni0 (owned)",
		"198.18.0.0/24 dev eth1",
	} {
		if !slices.Contains(got, want) {
			t.Errorf("HostRoutes lacks %q: %q", want, got)
		}
	}
	cfg, err := netconf.Parse([]byte(`{"Network":"10.244.0.0/16"}`))
	if err != nil {
		t.Fatal(err)
	}
	err = cfg.CheckRoutes(routes)
	if err == nil {
		t.Fatal("CheckRoutes accepted a pod network under 10.0.0.0/8 and a blackhole")
	}
	t.Log(err)
}

func cidr(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}
