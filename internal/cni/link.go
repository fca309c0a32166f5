package cni

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Kernel objects loom-cni owns on a node:
//
//	node netns:  bridge cni0 (fixed MAC, gateway addresses, up)
//	             veth<8 hex> per pod interface, a port of cni0, hairpin on
//	pod netns:   CNI_IFNAME, the other end of that veth, with the pod's
//	             addresses and its default route (or a route to the pod
//	             network) via the gateway
//
// Both namespaces are reached through netlink sockets bound to them, so no
// code runs inside the pod's namespace.
//
// Pod set-up time is what the plugin is measured by (a node starting many
// pods runs one ADD per pod, all contending for the kernel's rtnl lock), so
// an ADD makes as few netlink round trips as the kernel allows: the veth
// pair is created in one request, attached to the bridge and up at the
// node end, with its MTU and MACs, the pod end already in the pod's netns;
// nothing ADD chose itself is read back; the bridge is only changed when
// it is not as wanted. An IPv4 ADD on a node whose bridge exists costs
// nine round trips: four in the node (find the bridge, list its addresses,
// create the pair, set hairpin) and five in the pod (check that CNI_IFNAME
// is free, find it after creation, set it up, add the address, add the
// route), where it cost eighteen before.

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
	l, err := h.LinkByName(name)
	if _, ok := errors.AsType[netlink.LinkNotFoundError](err); ok {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		// An MTU given at creation is not "set by the user" for the bridge
		// driver: the bridge keeps following its ports' smallest MTU, so a
		// later FLANNEL_MTU change takes effect as pods are re-created.
		attrs.MTU = mtu
		attrs.HardwareAddr = bridgeMAC(fams)
		attrs.Flags = net.FlagUp
		if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil && !errors.Is(err, syscall.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		l, err = h.LinkByName(name)
	}
	if err != nil {
		return nil, fmt.Errorf("find bridge %s: %w", name, err)
	}
	br, ok := l.(*netlink.Bridge)
	if !ok {
		return nil, fmt.Errorf("%s exists and is a %s, not a bridge: delete it or set bridge in the CNI config", name, l.Type())
	}
	if br.Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(br); err != nil {
			return nil, fmt.Errorf("set bridge %s up: %w", name, err)
		}
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

// vethPair is one pod interface's veth pair as ADD creates it.
type vethPair struct {
	hostName, podName string
	hostMAC, podMAC   net.HardwareAddr
	mtu               int
	bridge            int // ifindex of the bridge the node end joins
	podNS             int // fd of the pod's netns, where the pod end is made
}

// createVeth creates the pair in one request: the node end a port of the
// bridge and up, the pod end directly in the pod's netns, both with the MTU
// and MAC given. So no half-made pair (outside the pod, detached) can be
// left behind, and the one request replaces the library's create, look-up,
// attach and set-up round trips (the library attaches with a second
// request, after looking the new link up), hence the raw request. The pod
// end cannot be brought up in the same request: the kernel configures the
// peer before it links the two ends, and opening a veth without its peer
// fails (ENOTCONN).
func createVeth(s *nl.SocketHandle, v vethPair) error {
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_CREATE|unix.NLM_F_EXCL|unix.NLM_F_ACK)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: s}
	host := nl.NewIfInfomsg(unix.AF_UNSPEC)
	host.Flags, host.Change = unix.IFF_UP, unix.IFF_UP
	req.AddData(host)
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(v.hostName)))
	req.AddData(nl.NewRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(v.mtu))))
	req.AddData(nl.NewRtAttr(unix.IFLA_ADDRESS, v.hostMAC))
	req.AddData(nl.NewRtAttr(unix.IFLA_MASTER, nl.Uint32Attr(uint32(v.bridge))))
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("veth"))
	peer := info.AddRtAttr(nl.IFLA_INFO_DATA, nil).AddRtAttr(nl.VETH_INFO_PEER, nil)
	nl.NewIfInfomsgChild(peer, unix.AF_UNSPEC)
	peer.AddRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(v.podName))
	peer.AddRtAttr(unix.IFLA_MTU, nl.Uint32Attr(uint32(v.mtu)))
	peer.AddRtAttr(unix.IFLA_ADDRESS, v.podMAC)
	peer.AddRtAttr(unix.IFLA_NET_NS_FD, nl.Uint32Attr(uint32(v.podNS)))
	req.AddData(info)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("create veth pair %s (node) / %s (pod): %w", v.hostName, v.podName, err)
	}
	return nil
}

// setHairpin turns on hairpin mode of a bridge port, which lets a pod reach
// itself through a Service VIP that DNATs back to it. The port is named,
// not indexed (RTM_NEWLINK with bridge port data, as `ip link set NAME
// type bridge_slave hairpin on` sends), so its index need not be looked up.
func setHairpin(s *nl.SocketHandle, port string) error {
	req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: s}
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(port)))
	info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
	info.AddRtAttr(nl.IFLA_INFO_SLAVE_KIND, nl.NonZeroTerminated("bridge"))
	info.AddRtAttr(nl.IFLA_INFO_SLAVE_DATA, nil).AddRtAttr(nl.IFLA_BRPORT_MODE, []byte{1})
	req.AddData(info)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("set hairpin mode on %s: %w", port, err)
	}
	return nil
}

// newMAC returns a random unicast, locally administered MAC, what the
// kernel would pick for a veth end. ADD picks it so that it need not read
// the link back to report it; an assigned MAC is also one that udev's
// MACAddressPolicy leaves alone. math/rand/v2's generator is seeded from
// the kernel's randomness when the process starts, which is all a MAC
// needs; crypto/rand would cost its package initialisation on every ADD.
func newMAC() net.HardwareAddr {
	mac := binary.BigEndian.AppendUint64(nil, rand.Uint64())[:6]
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}

type route struct {
	dst netip.Prefix
	gw  netip.Addr
}

// setupPod brings the pod end up, then gives it its addresses and routes,
// and returns it: up first, because a route via the gateway needs the
// connected route that an address on an up link brings.
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
	return l, nil
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
