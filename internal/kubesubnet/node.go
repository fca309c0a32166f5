package kubesubnet

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	v1 "k8s.io/api/core/v1"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/registry"
)

// PodCIDRs returns a Node's pod subnets by family. kube-controller-manager
// fills spec.podCIDRs (one per family, in dual stack two) and mirrors the
// first into spec.podCIDR; a Node written by hand or by an old controller
// may carry only spec.podCIDR. Neither set: the node has no subnet yet
// (both invalid, no error).
func PodCIDRs(n *v1.Node) (v4, v6 netip.Prefix, err error) {
	list := PodCIDRList(n)
	if len(list) > 2 {
		return v4, v6, fmt.Errorf("spec.podCIDRs %v has %d entries: at most one IPv4 and one IPv6 CIDR", list, len(list))
	}
	for _, s := range list {
		p, perr := netip.ParsePrefix(s)
		if perr != nil {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("podCIDR %q is not a CIDR", s)
		}
		if p != p.Masked() {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("podCIDR %s has host bits set", s)
		}
		dst := &v4
		if p.Addr().Is6() {
			dst = &v6
		}
		if dst.IsValid() {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("spec.podCIDRs %v has two CIDRs of one family", list)
		}
		*dst = p
	}
	return v4, v6, nil
}

// PodCIDRList is a Node's pod CIDRs as written: spec.podCIDRs, else
// spec.podCIDR (a Node written by hand or by an old controller); empty
// when neither is set.
func PodCIDRList(n *v1.Node) []string {
	if len(n.Spec.PodCIDRs) > 0 {
		return n.Spec.PodCIDRs
	}
	if n.Spec.PodCIDR != "" {
		return []string{n.Spec.PodCIDR}
	}
	return nil
}

// HasPodCIDR reports whether the node was given any pod subnet.
func HasPodCIDR(n *v1.Node) bool { return n.Spec.PodCIDR != "" || len(n.Spec.PodCIDRs) > 0 }

// Why a Node's podCIDRs cannot be its node's subnet: the kinds of
// PodCIDRError, for errors.Is.
var (
	// ErrNoPodCIDR: none assigned yet. The agent waits for one.
	ErrNoPodCIDR = errors.New("pod cidr not assigned")
	// ErrBadPodCIDR: spec.podCIDRs does not parse. The agent exits.
	ErrBadPodCIDR = errors.New("podCIDRs unreadable")
	// ErrPodCIDRFamily: no podCIDR of a family the network config
	// enables. The agent exits.
	ErrPodCIDRFamily = errors.New("no podCIDR of an enabled family")
	// ErrPodCIDROutsideNetwork: a podCIDR outside Network (or
	// IPv6Network), the pod CIDR given twice and differently. The agent
	// exits.
	ErrPodCIDROutsideNetwork = errors.New("podCIDR outside Network")
)

// PodCIDRError says why a Node's podCIDRs cannot be its node's subnet, in
// the words the agent logs and doctor reports: Problem what is wrong, Fix
// what to do. Error() is both, as the agent says it.
type PodCIDRError struct {
	Kind    error // ErrNoPodCIDR, ErrBadPodCIDR, ErrPodCIDRFamily or ErrPodCIDROutsideNetwork
	Node    string
	Problem string
	Fix     string
}

func (e *PodCIDRError) Error() string { return e.Problem + ": " + e.Fix }

func (e *PodCIDRError) Unwrap() error { return e.Kind }

// NoPodCIDR is the error of a Node without a podCIDR: kube-controller-manager
// allocates none (no --allocate-node-cidrs), or has not yet. cfg is the
// network config, read from netConfigPath.
func NoPodCIDR(node string, cfg netconf.Config, netConfigPath string) *PodCIDRError {
	cc := ClusterCIDR(cfg)
	return &PodCIDRError{Kind: ErrNoPodCIDR, Node: node,
		Problem: "pod cidr not assigned to node " + node,
		Fix: fmt.Sprintf("kube-controller-manager assigns it only with --allocate-node-cidrs=true and --cluster-cidr=%s "+
			"(kubeadm init --pod-network-cidr=%s, the Network of %s; on a running cluster add both flags to /etc/kubernetes/manifests/kube-controller-manager.yaml, "+
			"and Nodes without a podCIDR get one); or set it by hand: kubectl patch node %s -p '{\"spec\":{\"podCIDR\":\"SUBNET\",\"podCIDRs\":[\"SUBNET\"]}}'",
			cc, cc, netConfigPath, node),
	}
}

// PodCIDROutsideNetwork is the error of a podCIDR that is not inside the
// network config's Network (key "Network") or IPv6Network: the cluster's
// pod CIDR (kubeadm --pod-network-cidr) and net-conf.json disagree.
func PodCIDROutsideNetwork(node string, podCIDR, network netip.Prefix, key, netConfigPath string) *PodCIDRError {
	return &PodCIDRError{Kind: ErrPodCIDROutsideNetwork, Node: node,
		Problem: fmt.Sprintf("node %s has podCIDR %s (from kube-controller-manager --cluster-cidr), which is not inside %s %s of %s", node, podCIDR, key, network, netConfigPath),
		Fix: fmt.Sprintf("set %q to the cluster's pod CIDR (kubeadm --pod-network-cidr / kube-controller-manager --cluster-cidr), or re-create the cluster with --pod-network-cidr=%s",
			key, network),
	}
}

// NodeSubnets is a node's own subnets as its agent takes them: the Node's
// podCIDRs of the families cfg enables (the others invalid), each inside
// its network. Otherwise a *PodCIDRError says why not; only ErrNoPodCIDR is
// worth waiting for.
func NodeSubnets(n *v1.Node, cfg netconf.Config, netConfigPath string) (v4, v6 netip.Prefix, err error) {
	if !HasPodCIDR(n) {
		return v4, v6, NoPodCIDR(n.Name, cfg, netConfigPath)
	}
	v4, v6, err = PodCIDRs(n)
	if err != nil {
		return netip.Prefix{}, netip.Prefix{}, &PodCIDRError{Kind: ErrBadPodCIDR, Node: n.Name, Problem: fmt.Sprintf("node %s: %v", n.Name, err),
			Fix: "kube-controller-manager never writes that; fix the Node's spec or delete the Node and let its kubelet register it again"}
	}
	for _, f := range []struct {
		enabled            bool
		got, network       netip.Prefix
		family, key, other string
	}{
		{cfg.EnableIPv4, v4, cfg.Network, "IPv4", "Network", "EnableIPv4"},
		{cfg.EnableIPv6, v6, cfg.IPv6Network, "IPv6", "IPv6Network", "EnableIPv6"},
	} {
		if !f.enabled {
			continue
		}
		if !f.got.IsValid() {
			return netip.Prefix{}, netip.Prefix{}, &PodCIDRError{Kind: ErrPodCIDRFamily, Node: n.Name,
				Problem: fmt.Sprintf("node %s has no %s podCIDR (podCIDRs %v), but %s enables %s", n.Name, f.family, PodCIDRList(n), netConfigPath, f.family),
				Fix:     fmt.Sprintf("give kube-controller-manager an %s --cluster-cidr (kubeadm --pod-network-cidr), or set \"%s\": false", f.family, f.other)}
		}
		if !f.network.IsValid() || f.network.Bits() > f.got.Bits() || !f.network.Contains(f.got.Addr()) {
			return netip.Prefix{}, netip.Prefix{}, PodCIDROutsideNetwork(n.Name, f.got, f.network, f.key, netConfigPath)
		}
	}
	if !cfg.EnableIPv4 {
		v4 = netip.Prefix{}
	}
	if !cfg.EnableIPv6 {
		v6 = netip.Prefix{}
	}
	return v4, v6, nil
}

// ClusterCIDR is what kube-controller-manager's --cluster-cidr (kubeadm's
// --pod-network-cidr) must be for cfg: Network, and IPv6Network in dual
// stack, comma-separated.
func ClusterCIDR(cfg netconf.Config) string {
	var parts []string
	if cfg.EnableIPv4 && cfg.Network.IsValid() {
		parts = append(parts, cfg.Network.String())
	}
	if cfg.EnableIPv6 && cfg.IPv6Network.IsValid() {
		parts = append(parts, cfg.IPv6Network.String())
	}
	return strings.Join(parts, ",")
}

// ErrNotPeer marks a node that is simply not (yet) a loom or flannel peer:
// no kube-subnet-manager annotation, or no podCIDR. Nothing to report.
var ErrNotPeer = errors.New("not a peer: no podCIDR or no kube-subnet-manager annotation")

// SkipError is a node that claims to be a peer but whose data cannot be
// used.
type SkipError struct {
	Reason string // a registry.Skip* reason, the loom_leases_skipped_total label
	Detail string // what is wrong, naming the annotation or the podCIDR
}

func (e *SkipError) Error() string { return e.Reason + ": " + e.Detail }

func skipf(reason, format string, args ...any) error {
	return &SkipError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// NodeLease translates a peer Node into the lease its annotations and
// podCIDRs describe, for the families cfg enables, as flanneld reads it:
// every enabled family needs its podCIDR and public address annotation.
// A node that is not a peer gives ErrNotPeer; one whose data does not
// decode gives a *SkipError. Whether the lease is acceptable (inside
// Network, no overlap, a usable address) is the Guard's business, as for
// leases read from etcd. Nodes have no expiry: the lease's Expiration says
// a day from now, so it is never taken for an etcd reservation.
func (a Annotations) NodeLease(n *v1.Node, cfg netconf.Config) (lease.Lease, error) {
	ann := n.Annotations
	if !a.Managed(ann) || !HasPodCIDR(n) {
		return lease.Lease{}, ErrNotPeer
	}
	v4, v6, err := PodCIDRs(n)
	if err != nil {
		return lease.Lease{}, skipf(registry.SkipUndecodable, "%v", err)
	}
	l := lease.Lease{Attrs: lease.Attrs{BackendType: ann[a.Key(AnnBackendType)], NodeName: n.Name}, Expiration: notReserved()}
	if l.Attrs.BackendType == "" {
		return lease.Lease{}, skipf(registry.SkipUndecodable, "no %s annotation", a.Key(AnnBackendType))
	}
	if cfg.EnableIPv4 {
		if !v4.IsValid() {
			return lease.Lease{}, skipf(registry.SkipBadSubnet, "no IPv4 podCIDR (podCIDRs %v) but the network config enables IPv4", n.Spec.PodCIDRs)
		}
		l.Subnet = v4
		if l.Attrs.PublicIP, err = a.PublicIP(ann, AnnPublicIP, false); err != nil {
			return lease.Lease{}, err
		}
		if l.Attrs.BackendData, err = a.BackendData(ann, AnnBackendData); err != nil {
			return lease.Lease{}, err
		}
	}
	if cfg.EnableIPv6 {
		if !v6.IsValid() {
			return lease.Lease{}, skipf(registry.SkipBadSubnet, "no IPv6 podCIDR (podCIDRs %v) but the network config enables IPv6", n.Spec.PodCIDRs)
		}
		l.IPv6Subnet = v6
		ip, err := a.PublicIP(ann, AnnPublicIPv6, true)
		if err != nil {
			return lease.Lease{}, err
		}
		if ip.IsValid() {
			l.Attrs.PublicIPv6 = &ip
		}
		if l.Attrs.BackendV6Data, err = a.BackendData(ann, AnnBackendV6Data); err != nil {
			return lease.Lease{}, err
		}
	}
	return l, nil
}

// OwnLease is the lease a node's agent holds, read back from its Node: the
// subnets NodeSubnets gives (or its error), with the attributes the
// annotations announce when they decode, else only the node's name and
// backend-type (before the agent wrote them, or when they are broken).
func (a Annotations) OwnLease(n *v1.Node, cfg netconf.Config, netConfigPath string) (lease.Lease, error) {
	v4, v6, err := NodeSubnets(n, cfg, netConfigPath)
	if err != nil {
		return lease.Lease{}, err
	}
	l, err := a.NodeLease(n, cfg)
	if err != nil {
		l = lease.Lease{Attrs: lease.Attrs{NodeName: n.Name, BackendType: n.Annotations[a.Key(AnnBackendType)]}, Expiration: notReserved()}
	}
	l.Subnet, l.IPv6Subnet = v4, v6
	return l, nil
}

// PublicIP reads an address annotation (public-ip, public-ipv6 and their
// overrides). Absent, or unspecified (flannel writes "0.0.0.0" for
// "none"), is the invalid Addr: the Guard then skips the lease for having
// no public address. A value that is no address of the family is a
// *SkipError.
func (a Annotations) PublicIP(ann map[string]string, name string, v6 bool) (netip.Addr, error) {
	s := ann[a.Key(name)]
	if s == "" {
		return netip.Addr{}, nil
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" || ip.Is6() != v6 || ip.Is4In6() {
		fam := "IPv4"
		if v6 {
			fam = "IPv6"
		}
		return netip.Addr{}, skipf(registry.SkipUndecodable, "%s=%q is not an %s address", a.Key(name), s, fam)
	}
	if ip.IsUnspecified() {
		return netip.Addr{}, nil
	}
	return ip, nil
}

// BackendData reads a backend data annotation: JSON, with "null" (what
// flanneld writes for host-gw) meaning none, as a lease read from etcd
// has. A value that is not JSON is a *SkipError.
func (a Annotations) BackendData(ann map[string]string, name string) (json.RawMessage, error) {
	s := strings.TrimSpace(ann[a.Key(name)])
	if s == "" || s == jsonNull {
		return nil, nil
	}
	if !json.Valid([]byte(s)) {
		return nil, skipf(registry.SkipUndecodable, "%s=%q is not JSON", a.Key(name), truncate(s, 64))
	}
	return json.RawMessage(s), nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// sameLease reports whether two leases say the same to the data path.
func sameLease(a, b lease.Lease) bool {
	return a.Subnet == b.Subnet && a.IPv6Subnet == b.IPv6Subnet &&
		a.Attrs.PublicIP == b.Attrs.PublicIP && sameAddrPtr(a.Attrs.PublicIPv6, b.Attrs.PublicIPv6) &&
		a.Attrs.BackendType == b.Attrs.BackendType && a.Attrs.NodeName == b.Attrs.NodeName &&
		string(a.Attrs.BackendData) == string(b.Attrs.BackendData) &&
		string(a.Attrs.BackendV6Data) == string(b.Attrs.BackendV6Data)
}

func sameAddrPtr(a, b *netip.Addr) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}
