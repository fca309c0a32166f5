package iface

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/loomnet/loom/internal/netconf"
)

// ownProtocol is the rtm_protocol of loom's routes (backend/routes.Protocol;
// not imported, so choosing an interface does not pull in the backends).
const ownProtocol = 108

// HostRoutes lists the unicast, blackhole, unreachable and prohibit routes
// of the main routing table, both families, for netconf.CheckRoutes. A
// route is Owned when loom made it (protocol 108) or it leaves through a
// device of the pod network: cni0 and flannel's overlay devices
// (flannel.<VNI>, flannel-v6.<VNI>, flannel0), made by loom or flanneld.
func HostRoutes() ([]netconf.HostRoute, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	var out []netconf.HostRoute
	for _, r := range routes {
		switch r.Type {
		case unix.RTN_UNICAST, unix.RTN_BLACKHOLE, unix.RTN_UNREACHABLE, unix.RTN_PROHIBIT:
		default:
			continue
		}
		if r.Dst == nil {
			continue // a default route
		}
		a, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		hr := netconf.HostRoute{Dst: netip.PrefixFrom(a.Unmap(), ones).Masked(), Dev: names[r.LinkIndex]}
		if gw, ok := netip.AddrFromSlice(r.Gw); ok {
			hr.Via = gw.Unmap()
		}
		hr.Owned = r.Protocol == ownProtocol || podNetworkDevice(hr.Dev)
		out = append(out, hr)
	}
	return out, nil
}

func podNetworkDevice(name string) bool {
	return name == "cni0" || name == "flannel0" || strings.HasPrefix(name, "flannel.") || strings.HasPrefix(name, "flannel-v6.")
}
