package cni

import (
	"fmt"
	"net/netip"

	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/subnetenv"
)

// family is what one address family of the node's subnet gives a pod. IPv4
// and IPv6 are two values of it and go through the same code.
type family struct {
	pool    ipam.Range     // where the pod's address comes from
	gateway netip.Prefix   // the bridge's address, e.g. 10.244.1.1/24 (FLANNEL_SUBNET as written)
	network netip.Prefix   // FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK; may be invalid
	routes  []netip.Prefix // the pod's routes via gateway.Addr()
}

// plan is everything ADD, CHECK and STATUS derive from the configuration and
// subnet.env before touching the kernel; it is pure, so it is unit-tested.
type plan struct {
	mtu      int
	families []family // IPv4 first: range index 0 in the IPAM store, as host-local numbers them
}

func (p plan) pools() []ipam.Range {
	out := make([]ipam.Range, len(p.families))
	for i, f := range p.families {
		out[i] = f.pool
	}
	return out
}

// newPlan fails only on a subnet.env that no agent should have written; the
// caller reports that as "plugin not available".
func newPlan(c *Config, env subnetenv.Env) (plan, error) {
	p := plan{mtu: env.MTU}
	if c.MTU != 0 {
		p.mtu = c.MTU
	}
	for _, fam := range []struct {
		subnet, network netip.Prefix
		subnetKey       string
	}{
		{env.Subnet, env.Network, "FLANNEL_SUBNET"},
		{env.IPv6Subnet, env.IPv6Network, "FLANNEL_IPV6_SUBNET"},
	} {
		if !fam.subnet.IsValid() {
			continue
		}
		gw := fam.subnet.Addr()
		if gw == fam.subnet.Masked().Addr() {
			return plan{}, fmt.Errorf("%s=%s names the network address: it must hold the gateway address, e.g. %s/%d",
				fam.subnetKey, fam.subnet, gw.Next(), fam.subnet.Bits())
		}
		f := family{
			pool:    ipam.Range{Subnet: fam.subnet.Masked(), Gateway: gw},
			gateway: fam.subnet,
			network: fam.network,
		}
		switch {
		case c.IsDefaultGateway:
			f.routes = []netip.Prefix{netip.PrefixFrom(unspecified(gw), 0)}
		case fam.network.IsValid():
			f.routes = []netip.Prefix{fam.network}
		default:
			return plan{}, fmt.Errorf("isDefaultGateway is false, so pods get a route to the pod network only, but subnet.env sets %s without its network (FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK)", fam.subnetKey)
		}
		p.families = append(p.families, f)
	}
	return p, nil
}

func unspecified(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

// familyOf returns the family whose pool holds a.
func (p plan) familyOf(a netip.Addr) (family, bool) {
	for _, f := range p.families {
		if f.pool.Contains(a) {
			return f, true
		}
	}
	return family{}, false
}

// podConfig gives the pod's addresses (one per family, with the subnet's
// length) and routes, from the addresses IPAM allocated in family order.
func (p plan) podConfig(addrs []netip.Addr) ([]netip.Prefix, []route) {
	var prefixes []netip.Prefix
	var routes []route
	for i, f := range p.families {
		prefixes = append(prefixes, netip.PrefixFrom(addrs[i], f.pool.Subnet.Bits()))
		for _, dst := range f.routes {
			routes = append(routes, route{dst: dst, gw: f.gateway.Addr()})
		}
	}
	return prefixes, routes
}
