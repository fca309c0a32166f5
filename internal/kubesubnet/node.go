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

// podCIDRs returns a Node's pod subnets by family. kube-controller-manager
// fills spec.podCIDRs (one per family, in dual stack two) and mirrors the
// first into spec.podCIDR; a Node written by hand or by an old controller
// may carry only spec.podCIDR. Neither set: the node has no subnet yet.
func podCIDRs(n *v1.Node) (v4, v6 netip.Prefix, err error) {
	list := n.Spec.PodCIDRs
	if len(list) == 0 && n.Spec.PodCIDR != "" {
		list = []string{n.Spec.PodCIDR}
	}
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

// hasPodCIDR reports whether the node was given any pod subnet.
func hasPodCIDR(n *v1.Node) bool { return n.Spec.PodCIDR != "" || len(n.Spec.PodCIDRs) > 0 }

// errNotPeer marks a node that is simply not (yet) a loom or flannel peer:
// no kube-subnet-manager annotation, or no podCIDR. Nothing to report.
var errNotPeer = errors.New("not a kube-subnet-manager node")

// skipError is a node that claims to be a peer but whose data cannot be
// used: the reason is a loom_leases_skipped_total label.
type skipError struct {
	reason string
	detail string
}

func (e *skipError) Error() string { return e.reason + ": " + e.detail }

func skipf(reason, format string, args ...any) error {
	return &skipError{reason: reason, detail: fmt.Sprintf(format, args...)}
}

// nodeLease translates a peer Node into the lease its annotations and
// podCIDRs describe, for the families cfg enables, as flanneld reads it:
// every enabled family needs its podCIDR and public address annotation.
// A node that is not a peer gives errNotPeer; one whose data does not
// decode gives a *skipError (registry.SkipUndecodable). Whether the lease
// is acceptable (inside Network, no overlap, a usable address) is the
// Guard's business, as for leases read from etcd.
func (a annotations) nodeLease(n *v1.Node, cfg netconf.Config) (lease.Lease, error) {
	ann := n.Annotations
	if ann[a.key(annKubeManaged)] != annotationTrue || !hasPodCIDR(n) {
		return lease.Lease{}, errNotPeer
	}
	v4, v6, err := podCIDRs(n)
	if err != nil {
		return lease.Lease{}, skipf(registry.SkipUndecodable, "%v", err)
	}
	l := lease.Lease{Attrs: lease.Attrs{BackendType: ann[a.key(annBackendType)], NodeName: n.Name}}
	if l.Attrs.BackendType == "" {
		return lease.Lease{}, skipf(registry.SkipUndecodable, "no %s annotation", a.key(annBackendType))
	}
	if cfg.EnableIPv4 {
		if !v4.IsValid() {
			return lease.Lease{}, skipf(registry.SkipBadSubnet, "no IPv4 podCIDR (podCIDRs %v) but the network config enables IPv4", n.Spec.PodCIDRs)
		}
		l.Subnet = v4
		if l.Attrs.PublicIP, err = a.publicIP(ann, annPublicIP, false); err != nil {
			return lease.Lease{}, err
		}
		if l.Attrs.BackendData, err = a.backendData(ann, annBackendData); err != nil {
			return lease.Lease{}, err
		}
	}
	if cfg.EnableIPv6 {
		if !v6.IsValid() {
			return lease.Lease{}, skipf(registry.SkipBadSubnet, "no IPv6 podCIDR (podCIDRs %v) but the network config enables IPv6", n.Spec.PodCIDRs)
		}
		l.IPv6Subnet = v6
		ip, err := a.publicIP(ann, annPublicIPv6, true)
		if err != nil {
			return lease.Lease{}, err
		}
		if ip.IsValid() {
			l.Attrs.PublicIPv6 = &ip
		}
		if l.Attrs.BackendV6Data, err = a.backendData(ann, annBackendV6Data); err != nil {
			return lease.Lease{}, err
		}
	}
	return l, nil
}

// publicIP reads an address annotation. Absent, or unspecified (flannel
// writes "0.0.0.0" for "none"), is the invalid Addr: the Guard then skips
// the lease for having no public address.
func (a annotations) publicIP(ann map[string]string, name string, v6 bool) (netip.Addr, error) {
	s := ann[a.key(name)]
	if s == "" {
		return netip.Addr{}, nil
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" || ip.Is6() != v6 || ip.Is4In6() {
		fam := "IPv4"
		if v6 {
			fam = "IPv6"
		}
		return netip.Addr{}, skipf(registry.SkipUndecodable, "%s=%q is not an %s address", a.key(name), s, fam)
	}
	if ip.IsUnspecified() {
		return netip.Addr{}, nil
	}
	return ip, nil
}

// backendData reads a backend data annotation: JSON, with "null" (what
// flanneld writes for host-gw) meaning none, as a lease read from etcd has.
func (a annotations) backendData(ann map[string]string, name string) (json.RawMessage, error) {
	s := strings.TrimSpace(ann[a.key(name)])
	if s == "" || s == jsonNull {
		return nil, nil
	}
	if !json.Valid([]byte(s)) {
		return nil, skipf(registry.SkipUndecodable, "%s=%q is not JSON", a.key(name), truncate(s, 64))
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
