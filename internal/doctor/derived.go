package doctor

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/loomnet/loom/internal/lease"
)

// Conclusions several checks draw from the same facts.

// ownLease is the lease this node holds in the registry: the one carrying
// its node name or, for a lease written by flanneld (no name), its public IP.
func (f *Facts) ownLease() (lease.Lease, bool) {
	if !f.Store.Listed() {
		return lease.Lease{}, false
	}
	for _, l := range f.Store.Leases {
		if l.Attrs.NodeName != "" && l.Attrs.NodeName == f.Node {
			return l, true
		}
	}
	for _, l := range f.Store.Leases {
		if l.Attrs.NodeName == "" && f.Underlay.PublicIP.IsValid() && l.Attrs.PublicIP == f.Underlay.PublicIP {
			return l, true
		}
	}
	return lease.Lease{}, false
}

// peerLeases is every lease but this node's own.
func (f *Facts) peerLeases() []lease.Lease {
	own, haveOwn := f.ownLease()
	var out []lease.Lease
	for _, l := range f.Store.Leases {
		if haveOwn && l.Key() == own.Key() {
			continue
		}
		out = append(out, l)
	}
	return out
}

// currentSubnet is the node's pod subnet: its registry lease when the
// registry was read and holds one, else what subnet.env says.
func (f *Facts) currentSubnet() (netip.Prefix, string) {
	if l, ok := f.ownLease(); ok && l.Subnet.IsValid() {
		return l.Subnet, fmt.Sprintf("registry lease %s%s", f.subnetsPrefix(), l.Key())
	}
	if e := f.SubnetEnv.Env; e != nil && e.Subnet.IsValid() {
		return e.Subnet.Masked(), fmt.Sprintf("%s: FLANNEL_SUBNET=%s", f.SubnetEnv.Path, e.Subnet)
	}
	return netip.Prefix{}, ""
}

// network is the pod network the running agent works with: FLANNEL_NETWORK
// in subnet.env (the agent wrote it from the config it read at start), else
// the network config's.
func (f *Facts) network() (netip.Prefix, string) {
	if e := f.SubnetEnv.Env; e != nil && e.Network.IsValid() {
		return e.Network, fmt.Sprintf("%s: FLANNEL_NETWORK=%s", f.SubnetEnv.Path, e.Network)
	}
	if f.Config != nil && f.Config.Network.IsValid() {
		return f.Config.Network, fmt.Sprintf("%s: Network %s", f.ConfigFrom, f.Config.Network)
	}
	return netip.Prefix{}, ""
}

// backendType is the configured backend, "" when the config is unknown.
func (f *Facts) backendType() string {
	if f.Config == nil {
		return ""
	}
	return f.Config.Backend.Type
}

func (f *Facts) subnetsPrefix() string {
	return strings.TrimSuffix(f.Store.Prefix, "/") + "/subnets/"
}

// etcdctl renders an etcdctl command line against the agent's endpoints.
func (f *Facts) etcdctl(args string) string {
	return fmt.Sprintf("etcdctl --endpoints=%s %s", strings.Join(f.Store.Endpoints, ","), args)
}

// podAddr is the n-th address of a subnet (1 is the gateway).
func podAddr(p netip.Prefix, n int) netip.Addr {
	a := p.Masked().Addr()
	for range n {
		a = a.Next()
	}
	return a
}

// gatewayOf is the address the bridge holds: the first of the subnet, with
// the subnet's length (FLANNEL_SUBNET's form).
func gatewayOf(p netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(podAddr(p, 1), p.Bits())
}

// nodeOf names the node of a lease for messages.
func nodeOf(l lease.Lease) string {
	if l.Attrs.NodeName != "" {
		return l.Attrs.NodeName
	}
	if l.Reserved() {
		return "reservation"
	}
	return "flanneld@" + l.Attrs.PublicIP.String()
}
