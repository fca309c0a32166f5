package netconf

import (
	"errors"
	"fmt"
	"net/netip"
)

// HostRoute is a route of the node's main routing table, as CheckRoutes
// needs it.
type HostRoute struct {
	Dst netip.Prefix
	Dev string     // output device, "" for a blackhole or unreachable route
	Via netip.Addr // gateway; invalid for a direct route
	// Owned marks a route of the pod network's own making: loom's routes
	// (protocol 108) and routes on the overlay and CNI devices (flannel.1,
	// flannel0, cni0), which loom or flanneld put there.
	Owned bool
}

func (r HostRoute) String() string {
	s := r.Dst.String()
	if r.Via.IsValid() {
		s += " via " + r.Via.String()
	}
	if r.Dev != "" {
		s += " dev " + r.Dev
	}
	return s
}

// CheckRoutes refuses a pod network that a route of the node overlaps.
// Pod subnet routes are more specific than most host routes, so a host
// route covering Network (a VPN's 10.0.0.0/8, a cloud's peering route)
// would lose the host's traffic to those addresses to the pods, and a host
// route inside Network would capture pod traffic: both break the node in
// ways that are hard to trace. Not counted: default routes, routes Owned by
// the pod network, and routes to exactly one node subnet (SubnetLen long,
// inside Network), which flanneld's host-gw backend leaves behind and which
// peers' leases replace. All conflicts are reported.
func (c Config) CheckRoutes(routes []HostRoute) error {
	var errs []error
	for _, is6 := range []bool{false, true} {
		f := c.family(is6)
		if !f.enabled {
			continue
		}
		for _, r := range routes {
			if r.Owned || !r.Dst.IsValid() || r.Dst.Bits() == 0 || r.Dst.Addr().Is6() != is6 || !f.network.Overlaps(r.Dst) {
				continue
			}
			if r.Dst.Bits() == f.subnetLen && f.network.Contains(r.Dst.Addr()) {
				continue
			}
			errs = append(errs, fmt.Errorf("%s %s overlaps this node's route %s: traffic to those addresses would go to pods or to the host depending on which route is more specific; set %s to a range no route of the node covers, or remove the route",
				f.key(keyNetwork), f.network, r, f.key(keyNetwork)))
		}
	}
	return errors.Join(errs...)
}
