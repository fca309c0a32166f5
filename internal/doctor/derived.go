package doctor

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/loomnet/loom/internal/kubesubnet"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
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
		return l.Subnet, f.leaseRef(l)
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

// kube reports whether the agent runs in Kubernetes mode: the registry is
// the API server's Nodes.
func (f *Facts) kube() bool { return f.Opts.KubeSubnetMgr }

// leaseRef names a lease and where it lives, for evidence: its etcd key,
// or in Kubernetes mode its Node.
func (f *Facts) leaseRef(l lease.Lease) string {
	if f.kube() {
		var cidrs []string
		for _, p := range []netip.Prefix{l.Subnet, l.IPv6Subnet} {
			if p.IsValid() {
				cidrs = append(cidrs, p.String())
			}
		}
		return fmt.Sprintf("Node %s podCIDR %s", l.Attrs.NodeName, strings.Join(cidrs, ","))
	}
	return fmt.Sprintf("lease %s%s (node %s)", f.subnetsPrefix(), l.Key(), nodeOf(l))
}

// forgetPeer is the command that makes every node forget a dead peer: its
// lease deleted from etcd, or its Node from the API.
func (f *Facts) forgetPeer(l lease.Lease) string {
	if f.kube() {
		return "kubectl delete node " + l.Attrs.NodeName
	}
	return f.etcdctl("del " + f.subnetsPrefix() + l.Key())
}

// sameBackend reports whether this node's backend programs a route to l:
// every backend skips peers of another type (flannel's udp writes none).
func (f *Facts) sameBackend(l lease.Lease) bool {
	mine, theirs := f.backendType(), l.Attrs.BackendType
	return theirs == mine || (theirs == "" && mine == netconf.BackendUDP) || mine == ""
}

// publicIPOverridden reports whether ip is this node's public address by
// the operator's choice (the public-ip-overwrite annotation of its Node):
// then the address peers use differs from the interface's on purpose.
func (f *Facts) publicIPOverridden(ip netip.Addr) bool {
	n := f.Kube.Node
	if !f.kube() || n == nil {
		return false
	}
	over, err := f.Kube.annotations().PublicIP(n.Annotations, kubesubnet.AnnPublicIPOverwrite, false)
	return err == nil && over.IsValid() && over == ip
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
