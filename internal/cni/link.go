package cni

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"syscall"

	"github.com/vishvananda/netlink"
)

// Kernel objects loom-cni owns on a node:
//
//	node netns:  bridge cni0 (fixed MAC, gateway addresses, up)
//	             veth<8 hex> per pod interface, a port of cni0, hairpin on
//	pod netns:   CNI_IFNAME, the other end of that veth, with the pod's
//	             addresses and its default route (or a route to the pod
//	             network) via the gateway
//
// Both namespaces are reached through netlink handles bound to them, so no
// thread ever switches namespace.

// HostVethName is the node-side name of the veth of one pod interface. It is
// derived from the attachment rather than random so that DEL and GC find it
// from (container ID, ifname) alone, also when the pod's netns is gone, and
// so `loom doctor` can tell which pod a veth belongs to.
func HostVethName(containerID, ifname string) string {
	sum := sha256.Sum256([]byte(containerID + "\x00" + ifname))
	return "veth" + hex.EncodeToString(sum[:4])
}

// bridgeMAC gives the bridge a fixed, locally administered MAC derived from
// its gateway addresses. A bridge without an assigned MAC takes the lowest
// MAC of its ports and changes it as pods come and go, which leaves the
// pods' neighbour entries for the gateway stale; a value derived from the
// node's subnet also survives the bridge being re-created.
func bridgeMAC(fams []family) net.HardwareAddr {
	h := sha256.New()
	for _, f := range fams {
		h.Write(f.gateway.Addr().AsSlice())
	}
	mac := net.HardwareAddr(h.Sum(nil)[:6])
	mac[0] = mac[0]&^0x01 | 0x02 // unicast, locally administered
	return mac
}

// ensureBridge creates the bridge if it is missing and makes sure it is up
// and holds the gateway addresses. Concurrent ADDs race to create it; the
// losers find it.
func ensureBridge(h *netlink.Handle, name string, mtu int, fams []family) (*netlink.Bridge, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	// An MTU given at creation is not "set by the user" for the bridge
	// driver: the bridge keeps following its ports' smallest MTU, so a later
	// FLANNEL_MTU change takes effect as pods are re-created.
	attrs.MTU = mtu
	attrs.HardwareAddr = bridgeMAC(fams)
	if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil && !errors.Is(err, syscall.EEXIST) {
		return nil, fmt.Errorf("create bridge %s: %w", name, err)
	}
	l, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("find bridge %s: %w", name, err)
	}
	br, ok := l.(*netlink.Bridge)
	if !ok {
		return nil, fmt.Errorf("%s exists and is a %s, not a bridge: delete it or set bridge in the CNI config", name, l.Type())
	}
	if err := h.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("set bridge %s up: %w", name, err)
	}
	for _, f := range fams {
		if err := ensureGateway(h, br, f); err != nil {
			return nil, err
		}
	}
	return br, nil
}

// ensureGateway puts the family's gateway address on the bridge. Addresses
// of the same family inside the pod network that are not the gateway are
// left over from a subnet this node held before (flannel's bridge plugin
// then fails every ADD until someone deletes cni0 by hand); they are
// replaced. Addresses outside the pod network are someone else's and kept.
func ensureGateway(h *netlink.Handle, br netlink.Link, f family) error {
	have, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(br, familyOf(f.gateway.Addr())) })
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", br.Attrs().Name, err)
	}
	found := false
	for _, a := range have {
		p, ok := prefixOf(a.IPNet)
		switch {
		case !ok || a.Scope != int(netlink.SCOPE_UNIVERSE):
		case p == f.gateway:
			found = true
		case f.network.IsValid() && f.network.Contains(p.Addr()):
			if err := h.AddrDel(br, &a); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) {
				return fmt.Errorf("remove stale address %s from %s: %w", p, br.Attrs().Name, err)
			}
		}
	}
	if found {
		return nil
	}
	if err := h.AddrReplace(br, newAddr(f.gateway)); err != nil {
		return fmt.Errorf("add gateway %s to %s: %w", f.gateway, br.Attrs().Name, err)
	}
	return nil
}

// createVeth creates the pair in one request, the pod end directly in the
// pod's netns, so no half-moved interface can be left behind.
func createVeth(host *netlink.Handle, podNS int, hostName, ifName string, mtu int) error {
	attrs := netlink.NewLinkAttrs()
	attrs.Name = hostName
	attrs.MTU = mtu
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: ifName, PeerNamespace: netlink.NsFd(podNS)}
	if err := host.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth pair %s (node) / %s (pod): %w", hostName, ifName, err)
	}
	return nil
}

// setupHostVeth makes the node end a port of the bridge and brings it up.
func setupHostVeth(h *netlink.Handle, name string, br *netlink.Bridge, hairpin bool) (netlink.Link, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", name, err)
	}
	if err := h.LinkSetMaster(l, br); err != nil {
		return nil, fmt.Errorf("attach %s to %s: %w", name, br.Name, err)
	}
	// Hairpin lets a pod reach itself through a Service VIP that DNATs back
	// to it; it is a bridge-port attribute, so it is set after LinkSetMaster.
	if err := h.LinkSetHairpin(l, hairpin); err != nil {
		return nil, fmt.Errorf("set hairpin mode on %s: %w", name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	return h.LinkByName(name) // refreshed: up, with its master
}

type route struct {
	dst netip.Prefix
	gw  netip.Addr
}

// setupPod brings the pod end up, then gives it its addresses and routes:
// up first, because a route via the gateway needs the connected route that
// an address on an up link brings.
func setupPod(h *netlink.Handle, ifName string, addrs []netip.Prefix, routes []route) (netlink.Link, error) {
	l, err := h.LinkByName(ifName)
	if err != nil {
		return nil, fmt.Errorf("find %s in the pod: %w", ifName, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %s up in the pod: %w", ifName, err)
	}
	for _, a := range addrs {
		if err := h.AddrAdd(l, newAddr(a)); err != nil {
			return nil, fmt.Errorf("add %s to %s in the pod: %w", a, ifName, err)
		}
	}
	for _, r := range routes {
		nr := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(r.dst), Gw: r.gw.AsSlice()}
		if err := h.RouteAdd(nr); err != nil {
			return nil, fmt.Errorf("add route %s via %s in the pod: %w", r.dst, r.gw, err)
		}
	}
	return h.LinkByName(ifName)
}

// deleteVeth removes a veth by name; a missing link, or one that is not a
// veth (so not ours), is left alone without error.
func deleteVeth(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if _, ok := errors.AsType[netlink.LinkNotFoundError](err); ok {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	if _, ok := l.(*netlink.Veth); !ok {
		return nil
	}
	if err := h.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// newAddr builds a netlink address. IPv6 addresses skip duplicate address
// detection: IPAM already guarantees uniqueness, and a tentative address
// would make the gateway route and the pod's first connections fail for
// about a second.
func newAddr(p netip.Prefix) *netlink.Addr {
	a := &netlink.Addr{IPNet: ipNet(p)}
	if p.Addr().Is6() {
		a.Flags = syscall.IFA_F_NODAD
	}
	return a
}

// retryDump repeats a netlink dump that the kernel interrupted because the
// table changed under it: with many pods starting at once on a node, the
// node's tables change all the time.
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var err error
	for range 10 {
		var out []T
		if out, err = dump(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, err
}

// The netlink library speaks net.IP; loom speaks netip. These convert at
// the boundary.

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), ok
}

func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

func familyOf(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// hasRoute reports whether routes contain dst via gw. The kernel reports a
// default route with a nil or 0/0 destination depending on version.
func hasRoute(routes []netlink.Route, want route) bool {
	return slices.ContainsFunc(routes, func(r netlink.Route) bool {
		dst, ok := prefixOf(r.Dst)
		if !ok {
			dst = netip.PrefixFrom(unspecified(want.gw), 0)
		}
		return dst == want.dst && addrOf(r.Gw) == want.gw
	})
}
