package lab

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"

	"github.com/loomnet/loom/internal/netns"
)

// handle is a netlink socket bound to one lab namespace, so links and
// addresses can be made there without moving any thread.
type handle struct {
	*netlink.Handle
	ns vnetns.NsHandle
}

func openHandle(name string) (*handle, error) {
	nsh, err := vnetns.GetFromName(name)
	if err != nil {
		return nil, fmt.Errorf("open namespace %s: %w", name, err)
	}
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		nsh.Close()
		return nil, fmt.Errorf("netlink in namespace %s: %w", name, err)
	}
	return &handle{Handle: h, ns: nsh}, nil
}

func (h *handle) Close() {
	h.Handle.Close()
	h.ns.Close()
}

func (h *handle) addAddr(link string, p netip.Prefix) error {
	l, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find %s: %w", link, err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if err := h.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s: %w", p, link, err)
	}
	return nil
}

func (h *handle) up(link string) error {
	l, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find %s: %w", link, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", link, err)
	}
	return nil
}

func (h *handle) defaultRoute(link string, via netip.Addr) error {
	l, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find %s: %w", link, err)
	}
	if err := h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: via.AsSlice()}); err != nil {
		return fmt.Errorf("default route via %s: %w", via, err)
	}
	return nil
}

func (h *handle) route(dst netip.Prefix, via netip.Addr) error {
	r := &netlink.Route{
		Dst: &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())},
		Gw:  via.AsSlice(),
	}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("route %s via %s: %w", dst, via, err)
	}
	return nil
}

// bridgeMAC is fixed per bridge: a Linux bridge with an automatic MAC takes
// the lowest port MAC and changes it as ports join, which leaves peers with
// stale ARP entries and stalls traffic for up to ~50 s.
func bridgeMAC(i int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0x6c, 0x6d, 0x00, 0x00, byte(i + 1)} // 02:6c:6d = "lm", locally administered
}

// nodeMAC is node's fixed eth0 MAC, derived from its underlay address: a
// real NIC keeps its MAC across a reboot, so peers' ARP entries for the
// node stay right when RebootNode rebuilds its namespace.
func nodeMAC(underlay netip.Addr) net.HardwareAddr {
	a := underlay.As4()
	return net.HardwareAddr{0x02, 0x6c, 0x6d, 0x01, a[2], a[3]}
}

// veth creates a veth pair with one end (local) in h's namespace and the
// other (peer) moved into the namespace peerNS; peerMAC nil means a random
// MAC.
func (h *handle) veth(local, peer string, peerNS string, master int, peerMAC net.HardwareAddr) error {
	pns, err := vnetns.GetFromName(peerNS)
	if err != nil {
		return fmt.Errorf("open namespace %s: %w", peerNS, err)
	}
	defer pns.Close()
	attrs := netlink.NewLinkAttrs()
	attrs.Name = local
	attrs.MasterIndex = master
	v := &netlink.Veth{LinkAttrs: attrs, PeerName: peer, PeerNamespace: netlink.NsFd(pns), PeerHardwareAddr: peerMAC}
	if err := h.LinkAdd(v); err != nil {
		return fmt.Errorf("veth %s <-> %s in %s: %w", local, peer, peerNS, err)
	}
	return nil
}

// buildTopology makes the router, the "internet" and every node namespace,
// wires them and addresses them. On error the caller tears the lab down.
func (l *Lab) buildTopology() error {
	rt, ext := l.RouterNS(), l.ExtNS()
	for _, name := range []string{rt, ext} {
		if err := netns.Create(name); err != nil {
			return err
		}
	}
	r, err := openHandle(rt)
	if err != nil {
		return err
	}
	defer r.Close()

	bridges := 1
	if l.Opts.Underlay == "routed" {
		bridges = 2
	}
	for i := range bridges {
		name := "br" + strconv.Itoa(i)
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.HardwareAddr = bridgeMAC(i)
		if err := r.LinkAdd(&netlink.Bridge{LinkAttrs: attrs}); err != nil {
			return fmt.Errorf("create %s in %s: %w", name, rt, err)
		}
		if err := r.addAddr(name, bridgeAddr(i)); err != nil {
			return err
		}
		if err := r.up(name); err != nil {
			return err
		}
	}
	if err := netns.WriteSysctl(rt, "net/ipv4/ip_forward", "1"); err != nil {
		return fmt.Errorf("enable forwarding in %s: %w", rt, err)
	}

	// The "internet": one host behind the router that knows the underlay
	// but has no route to any pod network, like a real upstream.
	if err := r.veth("ext0", "eth0", ext, 0, nil); err != nil {
		return err
	}
	if err := r.addAddr("ext0", extRouter); err != nil {
		return err
	}
	if err := r.up("ext0"); err != nil {
		return err
	}
	e, err := openHandle(ext)
	if err != nil {
		return err
	}
	defer e.Close()
	if err := e.addAddr("eth0", extHost); err != nil {
		return err
	}
	if err := e.up("eth0"); err != nil {
		return err
	}
	if err := e.route(netip.MustParsePrefix("198.18.0.0/15"), extRouter.Addr()); err != nil {
		return err
	}

	l.Nodes = nil
	for i := 1; i <= l.Opts.Nodes; i++ {
		name := nodeName(i)
		addr, br := nodeAddr(i, l.Opts.Underlay == "routed")
		n := Node{Name: name, NS: l.ns(name), Underlay: addr, Gateway: bridgeAddr(br).Addr()}
		if err := l.buildNode(r, n, br); err != nil {
			return err
		}
		l.Nodes = append(l.Nodes, n)
	}
	return nil
}

func (l *Lab) buildNode(r *handle, n Node, bridge int) error {
	if err := netns.Create(n.NS); err != nil {
		return err
	}
	br, err := r.LinkByName("br" + strconv.Itoa(bridge))
	if err != nil {
		return fmt.Errorf("find br%d: %w", bridge, err)
	}
	if err := r.veth(n.Name, "eth0", n.NS, br.Attrs().Index, nodeMAC(n.Underlay.Addr())); err != nil {
		return err
	}
	if err := r.up(n.Name); err != nil {
		return err
	}
	h, err := openHandle(n.NS)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := h.addAddr("eth0", n.Underlay); err != nil {
		return err
	}
	if err := h.up("eth0"); err != nil {
		return err
	}
	return h.defaultRoute("eth0", n.Gateway)
}
