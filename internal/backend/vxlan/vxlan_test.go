package vxlan

// Kernel tests. Everything lives in namespaces made by testnet; the test
// process's own namespace is never touched. Topology (underlay):
//
//	                rt: br0 198.18.0.1/24 2001:db8::1/64   br1 198.19.0.1/24 2001:db8:1::1/64
//	                    (02:00:5e:00:01:00)                (02:00:5e:00:01:01)   forwarding on
//	          ┌────────────┼────────────┐                      │ (routed underlay only)
//	          v1           v2           v3 ────────────────────┘
//	          │            │            │
//	     n1 eth0      n2 eth0      n3 eth0
//	  198.18.0.11  198.18.0.12  198.18.0.13   /24   (routed: n3 is 198.19.0.13)
//	2001:db8::11 2001:db8::12 2001:db8::13    /64   (routed: n3 is 2001:db8:1::13)
//	  default routes via rt
//
// Node nN leases 10.244.N.0/24 and fc00:0:0:N::/64, runs a Network in its
// namespace, and has forwarding on. Pods are namespaces behind a veth:
//
//	pN eth0 10.244.N.10/24 fc00:0:0:N::10/64 ── nN vethpN 10.244.N.1/24 fc00:0:0:N::1/64

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/loomnet/loom/internal/backend/links"
	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// within is the time a repair may take when events drive it: the settle
// delays of three reconcilers in a row, on a loaded 2-core machine.
const within = 10 * time.Second

type testNode struct {
	i        int
	name     string
	ns       ns.NetNS
	h        *netlink.Handle
	eth0     netlink.Link
	v4, v6   netip.Addr // underlay addresses
	pod      ns.NetNS
	stateDir string
}

// topology builds the underlay with count nodes, each with a pod. routed
// puts n3 in the second underlay subnet, behind the router.
func topology(t *testing.T, count int, routed bool) []*testNode {
	t.Helper()
	rt, hrt := nstest.NewNode(t, "rt")
	nstest.Sysctl(t, rt, "net/ipv4/ip_forward", "1")
	nstest.Sysctl(t, rt, "net/ipv6/conf/all/forwarding", "1")
	var ports [2][]netlink.Link
	nodes := make([]*testNode, count)
	for i := range nodes {
		d := fmt.Sprint(i + 1)
		seg := 0
		v4, v6, gw4, gw6 := "198.18.0.1"+d, "2001:db8::1"+d, "198.18.0.1", "2001:db8::1"
		if routed && i == 2 {
			seg = 1
			v4, v6, gw4, gw6 = "198.19.0.1"+d, "2001:db8:1::1"+d, "198.19.0.1", "2001:db8:1::1"
		}
		n, h := nstest.NewNode(t, "n"+d)
		eth0, port := nstest.Veth(t, n, h, "eth0", rt, hrt, "v"+d)
		nstest.Addr(t, h, eth0, v4+"/24", v6+"/64")
		nstest.Route(t, h, "0.0.0.0/0", gw4, eth0, 0)
		nstest.Route(t, h, "::/0", gw6, eth0, 0)
		ports[seg] = append(ports[seg], port)
		nstest.Sysctl(t, n, "net/ipv4/ip_forward", "1")
		nstest.Sysctl(t, n, "net/ipv6/conf/all/forwarding", "1")

		pod, hp := nstest.NewNode(t, "p"+d)
		host, peth := nstest.Veth(t, n, h, "vethp"+d, pod, hp, "eth0")
		nstest.Addr(t, h, host, "10.244."+d+".1/24", "fc00:0:0:"+d+"::1/64")
		nstest.Addr(t, hp, peth, "10.244."+d+".10/24", "fc00:0:0:"+d+"::10/64")
		nstest.Route(t, hp, "0.0.0.0/0", "10.244."+d+".1", peth, 0)
		nstest.Route(t, hp, "::/0", "fc00:0:0:"+d+"::1", peth, 0)

		nodes[i] = &testNode{i: i + 1, name: "n" + d, ns: n, h: h, eth0: eth0,
			v4: netip.MustParseAddr(v4), v6: netip.MustParseAddr(v6), pod: pod, stateDir: t.TempDir()}
	}
	br0 := nstest.Bridge(t, hrt, "br0", "02:00:5e:00:01:00", ports[0]...)
	nstest.Addr(t, hrt, br0, "198.18.0.1/24", "2001:db8::1/64")
	if routed {
		br1 := nstest.Bridge(t, hrt, "br1", "02:00:5e:00:01:01", ports[1]...)
		nstest.Addr(t, hrt, br1, "198.19.0.1/24", "2001:db8:1::1/64")
	}
	return nodes
}

// families of a test Network.
type fams struct{ v4, v6 bool }

var dual = fams{v4: true, v6: true}

// newNetwork makes a Network for n, as the agent would.
func (n *testNode) newNetwork(t *testing.T, f fams, backend string, resync time.Duration, logs *nstest.LogBuffer, reg prometheus.Registerer) *Network {
	t.Helper()
	cfg := Config{
		Backend:      json.RawMessage(backend),
		ExtLinkIndex: n.eth0.Attrs().Index,
		ExtMTU:       n.eth0.Attrs().MTU,
		NodeName:     n.name,
		StateDir:     n.stateDir,
		NetNSPath:    n.ns.Path(),
		Resync:       resync,
		Logger:       slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Metrics:      reg,
	}
	if f.v4 {
		cfg.PublicIP = n.v4
	}
	if f.v6 {
		cfg.PublicIPv6 = n.v6
	}
	nw, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || testing.Verbose() {
			t.Logf("logs of the Network of %s:\n%s", n.name, logs)
		}
	})
	return nw
}

// lease is n's lease as its agent writes it, with nw's backend data.
func (n *testNode) lease(f fams, nw *Network) lease.Lease {
	d := fmt.Sprint(n.i)
	l := lease.Lease{Attrs: lease.Attrs{BackendType: Type, NodeName: n.name}, Expiration: time.Now().Add(time.Hour)}
	if f.v4 {
		l.Subnet = netip.MustParsePrefix("10.244." + d + ".0/24")
		l.Attrs.PublicIP = n.v4
		l.Attrs.BackendData = nw.BackendData()
	}
	if f.v6 {
		l.IPv6Subnet = netip.MustParsePrefix("fc00:0:0:" + d + "::/64")
		v6 := n.v6
		l.Attrs.PublicIPv6 = &v6
		l.Attrs.BackendV6Data = nw.BackendV6Data()
	}
	return l
}

func added(ls ...lease.Lease) []lease.Event {
	var evs []lease.Event
	for _, l := range ls {
		evs = append(evs, lease.Event{Type: lease.Added, Lease: &l})
	}
	return evs
}

// run runs nw until the returned stop is called or the test ends; stop
// checks that Run returned nil.
func run(t *testing.T, nw *Network) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- nw.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("Run did not return after its context ended")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// cluster starts a Network on every node, each told every lease (its own
// included, as the registry's list is), and waits until all are ready.
func cluster(t *testing.T, nodes []*testNode, f fams, backend string, resync time.Duration) ([]*Network, []lease.Lease, []func()) {
	t.Helper()
	nws := make([]*Network, len(nodes))
	ls := make([]lease.Lease, len(nodes))
	stops := make([]func(), len(nodes))
	for i, n := range nodes {
		nws[i] = n.newNetwork(t, f, backend, resync, &nstest.LogBuffer{}, prometheus.NewRegistry())
		ls[i] = n.lease(f, nws[i])
	}
	for i, nw := range nws {
		nw.SetLocal(ls[i])
		nw.Handle(added(ls...))
		stops[i] = run(t, nw)
	}
	for i, nw := range nws {
		nstest.Eventually(t, within, nodes[i].name+"'s Network ready", nw.Ready)
	}
	return nws, ls, stops
}

// stats returns the counters of the four reconcilers.
func (n *Network) stats() map[string]reconcile.Stats {
	return map[string]reconcile.Stats{"link": n.link.Stats(), "neigh": n.neigh.Stats(), "fdb": n.fdb.Stats(), "route": n.route.Stats()}
}

// vxlanLink reads a VXLAN device from the kernel.
func vxlanLink(t *testing.T, h *netlink.Handle, name string) (*netlink.Vxlan, bool) {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		return nil, false
	}
	vx, ok := l.(*netlink.Vxlan)
	if !ok {
		t.Fatalf("%s is a %s, want vxlan", name, l.Type())
	}
	return vx, true
}

// checkDevice compares a device with flannel's shape, field by field.
func checkDevice(t *testing.T, n *testNode, name string, local netip.Addr, mac net.HardwareAddr, mtu int, addr string) {
	t.Helper()
	vx, ok := vxlanLink(t, n.h, name)
	if !ok {
		t.Fatalf("%s: no device %s", n.name, name)
	}
	gotLocal, _ := netip.AddrFromSlice(vx.SrcAddr)
	for _, c := range []struct {
		field     string
		got, want any
	}{
		{"type", vx.Type(), "vxlan"},
		{"id (VNI)", vx.VxlanId, 1},
		{"dstport", vx.Port, 8472},
		{"local", gotLocal.Unmap(), local},
		{"dev", vx.VtepDevIndex, n.eth0.Attrs().Index},
		{"learning", vx.Learning, false},
		{"gbp", vx.GBP, false},
		{"l2miss", vx.L2miss, false},
		{"l3miss", vx.L3miss, false},
		{"address (VtepMAC)", vx.HardwareAddr.String(), mac.String()},
		{"mtu", vx.MTU, mtu},
		{"up", vx.Flags&net.FlagUp != 0, true},
	} {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("%s %s: %s %v, want %v", n.name, name, c.field, c.got, c.want)
		}
	}
	addrs, err := n.h.AddrList(vx, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	var global []string
	for _, a := range addrs {
		if !a.IP.IsLinkLocalUnicast() {
			global = append(global, a.IPNet.String())
		}
	}
	if fmt.Sprint(global) != fmt.Sprint([]string{addr}) {
		t.Errorf("%s %s: addresses %v, want [%s]", n.name, name, global, addr)
	}
	// Offload stays on unless this kernel has the VXLAN checksum bug.
	want := !hasChecksumBug(kernelRelease())
	on, err := links.ReadFeature(n.ns.Path(), name, links.FeatureTxChecksum)
	if err != nil || on != want {
		t.Errorf("%s %s: %s on=%v (%v), want %v on kernel %s", n.name, name, links.FeatureTxChecksum, on, err, want, kernelRelease())
	}
}

// kernelNeigh finds the entry for ip on dev.
func kernelNeigh(t *testing.T, h *netlink.Handle, dev string, ip netip.Addr) (netlink.Neigh, bool) {
	t.Helper()
	l, err := h.LinkByName(dev)
	if err != nil {
		return netlink.Neigh{}, false
	}
	family := netlink.FAMILY_V4
	if ip.Is6() {
		family = netlink.FAMILY_V6
	}
	ns, err := h.NeighList(l.Attrs().Index, family)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if a, _ := netip.AddrFromSlice(n.IP); a.Unmap() == ip {
			return n, true
		}
	}
	return netlink.Neigh{}, false
}

// kernelFDB finds the entry for mac on dev.
func kernelFDB(t *testing.T, h *netlink.Handle, dev string, mac net.HardwareAddr) (netlink.Neigh, bool) {
	t.Helper()
	l, err := h.LinkByName(dev)
	if err != nil {
		return netlink.Neigh{}, false
	}
	ns, err := h.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if bytes.Equal(n.HardwareAddr, mac) {
			return n, true
		}
	}
	return netlink.Neigh{}, false
}

// kernelRoute finds the main table's route to dst.
func kernelRoute(t *testing.T, h *netlink.Handle, dst netip.Prefix) (netlink.Route, bool) {
	t.Helper()
	family := netlink.FAMILY_V4
	if dst.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	rs, err := h.RouteList(nil, family)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if r.Dst != nil && r.Dst.String() == dst.String() {
			return r, true
		}
	}
	return netlink.Route{}, false
}

// peerState describes what a node must hold for one peer subnet.
type peerState struct {
	dev    string // the node's VXLAN device
	subnet netip.Prefix
	public netip.Addr
	mac    net.HardwareAddr // the peer's VtepMAC
}

// overlayState returns the problems with n's entries for p reached
// through VXLAN: "" when neighbour, FDB entry and route have flannel's shape.
func overlayState(t *testing.T, n *testNode, p peerState) string {
	t.Helper()
	var bad []string
	gw := p.subnet.Addr()
	if e, ok := kernelNeigh(t, n.h, p.dev, gw); !ok || e.State != netlink.NUD_PERMANENT || !bytes.Equal(e.HardwareAddr, p.mac) {
		bad = append(bad, fmt.Sprintf("neighbour %s: %+v, want lladdr %s permanent", gw, e, p.mac))
	}
	if e, ok := kernelFDB(t, n.h, p.dev, p.mac); !ok || e.State != netlink.NUD_PERMANENT || e.Flags&netlink.NTF_SELF == 0 || !e.IP.Equal(p.public.AsSlice()) {
		bad = append(bad, fmt.Sprintf("fdb %s: %+v, want dst %s self permanent", p.mac, e, p.public))
	}
	l, err := n.h.LinkByName(p.dev)
	r, ok := kernelRoute(t, n.h, p.subnet)
	if err != nil || !ok || !r.Gw.Equal(gw.AsSlice()) || r.LinkIndex != l.Attrs().Index || r.Flags&int(netlink.FLAG_ONLINK) == 0 || r.Protocol != routes.Protocol {
		bad = append(bad, fmt.Sprintf("route %s: %+v, want via %s dev %s onlink proto %d", p.subnet, r, gw, p.dev, routes.Protocol))
	}
	return strings.Join(bad, "; ")
}

// peers returns what n must hold for each other node, per family.
func peersOf(n *testNode, nodes []*testNode, f fams) []peerState {
	var ps []peerState
	for _, o := range nodes {
		if o == n {
			continue
		}
		d := fmt.Sprint(o.i)
		if f.v4 {
			ps = append(ps, peerState{dev: "flannel.1", subnet: netip.MustParsePrefix("10.244." + d + ".0/24"), public: o.v4, mac: VtepMAC(o.name, "flannel.1")})
		}
		if f.v6 {
			ps = append(ps, peerState{dev: "flannel-v6.1", subnet: netip.MustParsePrefix("fc00:0:0:" + d + "::/64"), public: o.v6, mac: VtepMAC(o.name, "flannel-v6.1")})
		}
	}
	return ps
}

// converged reports whether n holds flannel's entries for every peer.
func converged(t *testing.T, n *testNode, nodes []*testNode, f fams) func() bool {
	return func() bool {
		for _, p := range peersOf(n, nodes, f) {
			if overlayState(t, n, p) != "" {
				return false
			}
		}
		return true
	}
}

func checkPeers(t *testing.T, n *testNode, nodes []*testNode, f fams) {
	t.Helper()
	for _, p := range peersOf(n, nodes, f) {
		if s := overlayState(t, n, p); s != "" {
			t.Errorf("%s, peer subnet %s: %s", n.name, p.subnet, s)
		}
	}
}

// podPair is a TCP connection to check: from a pod to another pod's address.
type podPair struct{ client, server string }

// checkPods connects from pod 1 to pod 2 over each family, and checks the
// server sees pod 1's own address.
func checkPods(t *testing.T, from, to *testNode, f fams) {
	t.Helper()
	var pairs []podPair
	if f.v4 {
		pairs = append(pairs, podPair{fmt.Sprintf("10.244.%d.10", from.i), fmt.Sprintf("10.244.%d.10", to.i)})
	}
	if f.v6 {
		pairs = append(pairs, podPair{fmt.Sprintf("fc00:0:0:%d::10", from.i), fmt.Sprintf("fc00:0:0:%d::10", to.i)})
	}
	for _, p := range pairs {
		if seen := echoPeer(t, from.pod, to.pod, p.server); seen != p.client {
			t.Errorf("pod %s saw the connection from %s, want pod %s (no NAT between pods)", p.server, seen, p.client)
		}
	}
}

func TestVXLANEndToEnd(t *testing.T) {
	nstest.NoLeaks(t)
	nodes := topology(t, 2, false)
	n1, n2 := nodes[0], nodes[1]
	// A resync period far longer than the test: every repair below is
	// driven by netlink events (and by the device replay).
	nws, ls, stops := cluster(t, nodes, dual, `{"Type":"vxlan"}`, time.Hour)

	t.Run("device shape is flannel's", func(t *testing.T) {
		for _, n := range nodes {
			checkDevice(t, n, "flannel.1", n.v4, VtepMAC(n.name, "flannel.1"), 1450, fmt.Sprintf("10.244.%d.0/32", n.i))
			checkDevice(t, n, "flannel-v6.1", n.v6, VtepMAC(n.name, "flannel-v6.1"), 1430, fmt.Sprintf("fc00:0:0:%d::/128", n.i))
		}
		if m := nws[0].MTU(); m != 1430 {
			t.Errorf("MTU() = %d, want 1430 (dual stack over a 1500 underlay)", m)
		}
	})

	t.Run("neighbour, FDB entry and route per peer", func(t *testing.T) {
		for _, n := range nodes {
			checkPeers(t, n, nodes, dual)
			// Our own subnet is never a peer.
			if r, ok := kernelRoute(t, n.h, ls[n.i-1].Subnet); ok && r.Protocol == routes.Protocol {
				t.Errorf("%s has a loom route to its own subnet: %+v", n.name, r)
			}
		}
	})

	t.Run("pod to pod over the overlay, source preserved", func(t *testing.T) {
		checkPods(t, n1, n2, dual)
		checkPods(t, n2, n1, dual)
	})

	t.Run("deleted flannel.1 comes back with every entry", func(t *testing.T) {
		for _, dev := range []string{"flannel.1", "flannel-v6.1"} {
			l, err := n1.h.LinkByName(dev)
			if err != nil {
				t.Fatal(err)
			}
			if err := n1.h.LinkDel(l); err != nil {
				t.Fatalf("delete %s by hand: %v", dev, err)
			}
			nstest.Eventually(t, within, dev+" re-created with all its entries", func() bool {
				nl, ok := vxlanLink(t, n1.h, dev)
				return ok && nl.Index != l.Attrs().Index && converged(t, n1, nodes, dual)()
			})
		}
		checkDevice(t, n1, "flannel.1", n1.v4, VtepMAC("n1", "flannel.1"), 1450, "10.244.1.0/32")
		checkDevice(t, n1, "flannel-v6.1", n1.v6, VtepMAC("n1", "flannel-v6.1"), 1430, "fc00:0:0:1::/128")
		checkPods(t, n1, n2, dual)
		checkPods(t, n2, n1, dual)
	})

	t.Run("deleted FDB entry and neighbour come back", func(t *testing.T) {
		p := peersOf(n1, nodes, dual)[0]
		l, err := n1.h.LinkByName(p.dev)
		if err != nil {
			t.Fatal(err)
		}
		if err := n1.h.NeighDel(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			HardwareAddr: p.mac, IP: p.public.AsSlice()}); err != nil {
			t.Fatalf("delete the FDB entry by hand: %v", err)
		}
		if err := n1.h.NeighDel(&netlink.Neigh{LinkIndex: l.Attrs().Index, IP: p.subnet.Addr().AsSlice()}); err != nil {
			t.Fatalf("delete the neighbour by hand: %v", err)
		}
		nstest.Eventually(t, within, "FDB entry and neighbour back", converged(t, n1, nodes, dual))
	})

	t.Run("device changed by hand is put back and replayed", func(t *testing.T) {
		l, err := n1.h.LinkByName("flannel.1")
		if err != nil {
			t.Fatal(err)
		}
		// Each of these flushes something: a new MAC the neighbours, going
		// down the neighbours and (silently) the routes.
		if err := n1.h.LinkSetHardwareAddr(l, net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}); err != nil {
			t.Fatal(err)
		}
		if err := n1.h.LinkSetMTU(l, 1400); err != nil {
			t.Fatal(err)
		}
		if err := n1.h.LinkSetDown(l); err != nil {
			t.Fatal(err)
		}
		nstest.Eventually(t, within, "flannel.1 restored with its entries", func() bool {
			vx, ok := vxlanLink(t, n1.h, "flannel.1")
			return ok && vx.Flags&net.FlagUp != 0 && vx.MTU == 1450 && converged(t, n1, nodes, dual)()
		})
		checkDevice(t, n1, "flannel.1", n1.v4, VtepMAC("n1", "flannel.1"), 1450, "10.244.1.0/32")
		checkPods(t, n1, n2, fams{v4: true})
	})

	t.Run("restart keeps the VTEP MAC and peers' entries", func(t *testing.T) {
		before, ok := kernelFDB(t, n2.h, "flannel.1", VtepMAC("n1", "flannel.1"))
		if !ok {
			t.Fatal("n2 has no FDB entry for n1")
		}
		oldData := nws[0].BackendData()
		// Stop n1's Network (the agent exits), start a new one.
		stops[0]()
		logs := &nstest.LogBuffer{}
		nw := n1.newNetwork(t, dual, `{"Type":"vxlan"}`, time.Hour, logs, nil)
		if !bytes.Equal(nw.BackendData(), oldData) {
			t.Errorf("BackendData after restart %s, before %s", nw.BackendData(), oldData)
		}
		nw.SetLocal(ls[0])
		nw.Handle(added(ls...))
		run(t, nw)
		nstest.Eventually(t, within, "the new Network ready", nw.Ready)
		for name, s := range nw.stats() {
			if s.Created+s.Updated+s.Deleted != 0 {
				t.Errorf("the restarted Network changed %s objects: %+v", name, s)
			}
		}
		after, ok := kernelFDB(t, n2.h, "flannel.1", VtepMAC("n1", "flannel.1"))
		if !ok || !after.IP.Equal(before.IP) {
			t.Errorf("n2's FDB entry for n1 was %+v, now %+v", before, after)
		}
		checkDevice(t, n1, "flannel.1", n1.v4, VtepMAC("n1", "flannel.1"), 1450, "10.244.1.0/32")
		checkPods(t, n1, n2, dual)
	})
}

// echoPeer listens on server:0 inside serverNS, connects from clientNS, and
// returns the client address the server saw, as the server reported it back
// over the connection.
func echoPeer(t *testing.T, clientNS, serverNS ns.NetNS, server string) string {
	t.Helper()
	var ln *net.TCPListener
	err := serverNS.Do(func(ns.NetNS) error {
		l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(server), 0)))
		ln = l
		return err
	})
	if err != nil {
		t.Fatalf("listen in the server pod: %v", err)
	}
	defer ln.Close()
	if err := ln.SetDeadline(time.Now().Add(15 * time.Second)); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		_, err = fmt.Fprintf(c, "%s\n", peer)
		served <- err
	}()

	var conn net.Conn
	err = clientNS.Do(func(ns.NetNS) error {
		var err error
		conn, err = (&net.Dialer{Timeout: 10 * time.Second}).Dial("tcp", ln.Addr().String())
		return err
	})
	if err != nil {
		t.Fatalf("connect from the client pod to %s: %v", ln.Addr(), err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("read the server's answer: %v", err)
	}
	if err := <-served; err != nil {
		t.Fatalf("server: %v", err)
	}
	return strings.TrimSpace(line)
}

// One node alone (its peers have no namespace): peers of another backend
// are skipped with one warning and a metric, our own lease gets nothing,
// and a new peer's entries appear through a partial sync.
func TestVXLANPeersSkipped(t *testing.T) {
	nstest.NoLeaks(t)
	n1 := topology(t, 1, false)[0]
	logs := &nstest.LogBuffer{}
	reg := prometheus.NewPedanticRegistry()
	nw := n1.newNetwork(t, fams{v4: true}, `{"Type":"vxlan"}`, 200*time.Millisecond, logs, reg)
	own := n1.lease(fams{v4: true}, nw)
	hostgw := v4only(node(5))
	hostgw.Attrs.BackendType = "host-gw"
	nw.SetLocal(own)
	nw.Handle(added(own, v4only(node(2)), hostgw))
	run(t, nw)
	nstest.Eventually(t, within, "Network ready", nw.Ready)
	n2 := peerState{dev: "flannel.1", subnet: netip.MustParsePrefix("10.244.2.0/24"), public: netip.MustParseAddr("198.18.0.12"), mac: VtepMAC("n2", "flannel.1")}
	if s := overlayState(t, n1, n2); s != "" {
		t.Error(s)
	}
	if _, ok := kernelRoute(t, n1.h, hostgw.Subnet); ok {
		t.Error("a route to the host-gw peer")
	}
	if r, ok := kernelRoute(t, n1.h, own.Subnet); ok && r.Protocol == routes.Protocol {
		t.Errorf("a loom route to our own subnet: %+v", r)
	}

	// A new peer: its entries come through the partial syncs Handle asks
	// for (the resync timer is short here, so only the count tells).
	before := nw.stats()
	nw.Handle(added(v4only(node(3))))
	n3 := peerState{dev: "flannel.1", subnet: netip.MustParsePrefix("10.244.3.0/24"), public: netip.MustParseAddr("198.18.0.13"), mac: VtepMAC("n3", "flannel.1")}
	nstest.Eventually(t, within, "n3's entries", func() bool { return overlayState(t, n1, n3) == "" })
	for name, s := range nw.stats() {
		if s.PartialSyncs == before[name].PartialSyncs && name != "link" {
			t.Errorf("%s: no partial sync for the new peer: %+v", name, s)
		}
	}
	// A removed peer loses its entries.
	nw.Handle([]lease.Event{{Type: lease.Removed, Lease: new(v4only(node(2)))}})
	nstest.Eventually(t, within, "n2's entries gone", func() bool {
		_, n := kernelNeigh(t, n1.h, "flannel.1", n2.subnet.Addr())
		_, f := kernelFDB(t, n1.h, "flannel.1", n2.mac)
		_, r := kernelRoute(t, n1.h, n2.subnet)
		return !n && !f && !r
	})

	// Steady state: full syncs keep coming and change nothing (no
	// attribute that the kernel reports differently from how loom asked).
	settled := nw.stats()
	time.Sleep(time.Second) // several full syncs
	for name, s := range nw.stats() {
		b := settled[name]
		if s.Created != b.Created || s.Updated != b.Updated || s.Deleted != b.Deleted || s.Errors != b.Errors {
			t.Errorf("%s changed the kernel in steady state: %+v, before %+v", name, s, b)
		}
		if s.FullSyncs <= b.FullSyncs {
			t.Errorf("%s: no full sync in a second with a 200 ms resync", name)
		}
	}
	if got := logs.Lines("level=WARN", "skipping a peer", `\"host-gw\"`, "node=n5"); len(got) != 1 {
		t.Errorf("%d warnings for the host-gw peer, want exactly 1:\n%s", len(got), strings.Join(got, "\n"))
	}
	got := gather(t, reg)
	for name, want := range map[string]float64{
		`loom_vxlan_peers_skipped{reason="other-backend"}`: 1,
		`loom_vxlan_peers_skipped{reason="unusable"}`:      0,
		`loom_vxlan_peer_subnets{path="vxlan"}`:            1,
		`loom_vxlan_peer_subnets{path="direct"}`:           0,
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v", name, got[name], want)
		}
	}
	for _, object := range []string{"link", "neigh", "fdb", "route"} {
		if got[`loom_reconcile_syncs_total{object="`+object+`",scope="full"}`] < 1 {
			t.Errorf("no full sync counted for object %s: %v", object, got)
		}
	}
}

// gather renders every sample as name{labels} = value.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]float64)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			out[mf.GetName()+"{"+strings.Join(ls, ",")+"}"] = m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return out
}

// DirectRouting over a routed underlay: n2 shares n1's subnet and gets a
// plain route; n3 is behind the router and gets VXLAN. Both are reachable.
func TestVXLANDirectRouting(t *testing.T) {
	nstest.NoLeaks(t)
	nodes := topology(t, 3, true)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	cluster(t, nodes, dual, `{"Type":"vxlan","DirectRouting":true}`, time.Hour)

	for _, dst := range []struct {
		subnet string
		via    netip.Addr
	}{{"10.244.2.0/24", n2.v4}, {"fc00:0:0:2::/64", n2.v6}} {
		r, ok := kernelRoute(t, n1.h, netip.MustParsePrefix(dst.subnet))
		if !ok || !r.Gw.Equal(dst.via.AsSlice()) || r.LinkIndex != n1.eth0.Attrs().Index || r.Protocol != routes.Protocol || r.Flags&int(netlink.FLAG_ONLINK) != 0 {
			t.Errorf("n1's route to %s: %+v, want via %s dev eth0 proto %d", dst.subnet, r, dst.via, routes.Protocol)
		}
	}
	for _, dev := range []string{"flannel.1", "flannel-v6.1"} {
		if _, ok := kernelFDB(t, n1.h, dev, VtepMAC("n2", dev)); ok {
			t.Errorf("n1 has an FDB entry for the directly routed n2 on %s", dev)
		}
	}
	if _, ok := kernelNeigh(t, n1.h, "flannel.1", netip.MustParseAddr("10.244.2.0")); ok {
		t.Error("n1 has a neighbour entry for the directly routed n2")
	}
	checkPeers(t, n1, []*testNode{n1, n3}, dual) // n3: VXLAN
	checkPeers(t, n3, nodes, dual)               // n3 reaches both through VXLAN

	checkPods(t, n1, n2, dual)
	checkPods(t, n1, n3, dual)
	checkPods(t, n3, n2, dual)
}

// The packets on the wire are flannel's: UDP to 8472 with a VXLAN header
// (I flag, VNI 1) around an Ethernet frame from the sender's VtepMAC to the
// receiver's, around the pods' own IP packet. Captured with a packet socket
// on n2's eth0, inside n2's namespace.
func TestVXLANCapture(t *testing.T) {
	nstest.NoLeaks(t)
	nodes := topology(t, 2, false)
	n1, n2 := nodes[0], nodes[1]
	v4 := fams{v4: true}
	cluster(t, nodes, v4, `{"Type":"vxlan"}`, time.Hour)

	var fd int
	err := n2.ns.Do(func(ns.NetNS) error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		return err
	})
	if err != nil {
		t.Fatalf("packet socket in n2: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: n2.eth0.Attrs().Index}); err != nil {
		t.Fatal(err)
	}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1}); err != nil {
		t.Fatal(err)
	}

	checkPods(t, n1, n2, v4) // the traffic to capture

	want := map[string]frame{ // by direction
		"n1→n2": {outerSrc: n1.v4, outerDst: n2.v4, vni: 1, innerSrcMAC: VtepMAC("n1", "flannel.1").String(), innerDstMAC: VtepMAC("n2", "flannel.1").String(),
			innerSrc: netip.MustParseAddr("10.244.1.10"), innerDst: netip.MustParseAddr("10.244.2.10"), innerProto: unix.IPPROTO_TCP},
		"n2→n1": {outerSrc: n2.v4, outerDst: n1.v4, vni: 1, innerSrcMAC: VtepMAC("n2", "flannel.1").String(), innerDstMAC: VtepMAC("n1", "flannel.1").String(),
			innerSrc: netip.MustParseAddr("10.244.2.10"), innerDst: netip.MustParseAddr("10.244.1.10"), innerProto: unix.IPPROTO_TCP},
	}
	got := map[string]frame{}
	buf := make([]byte, 65536)
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < len(want) && time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			continue // timeout: look again until the deadline
		}
		f, ok := parseVXLAN(buf[:n])
		if !ok {
			continue
		}
		if f.badFlags {
			t.Errorf("a frame to UDP 8472 with VXLAN flags %#x, want 0x08 (I)", f.flags)
		}
		switch f.outerSrc {
		case n1.v4:
			got["n1→n2"] = f
		case n2.v4:
			got["n2→n1"] = f
		}
	}
	for dir, w := range want {
		if g, ok := got[dir]; !ok {
			t.Errorf("%s: no VXLAN frame captured", dir)
		} else if g != w {
			t.Errorf("%s: captured\n %+v\nwant\n %+v", dir, g, w)
		}
	}
}

// frame is what a test checks of a captured VXLAN packet.
type frame struct {
	outerSrc, outerDst       netip.Addr
	vni                      uint32
	flags                    byte
	badFlags                 bool
	innerSrcMAC, innerDstMAC string
	innerSrc, innerDst       netip.Addr
	innerProto               byte
}

// parseVXLAN reads an Ethernet frame; ok is false unless it is IPv4 UDP to
// port 8472 carrying an IPv4 packet in an Ethernet frame.
func parseVXLAN(b []byte) (frame, bool) {
	be := binary.BigEndian
	if len(b) < 14+20 || be.Uint16(b[12:]) != unix.ETH_P_IP {
		return frame{}, false
	}
	ip := b[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] != unix.IPPROTO_UDP || len(ip) < ihl+8+8+14+20 {
		return frame{}, false
	}
	udp := ip[ihl:]
	if be.Uint16(udp[2:]) != 8472 {
		return frame{}, false
	}
	var f frame
	f.outerSrc, _ = netip.AddrFromSlice(ip[12:16])
	f.outerDst, _ = netip.AddrFromSlice(ip[16:20])
	vx := udp[8:16]
	f.flags = vx[0]
	f.badFlags = vx[0] != 0x08
	f.flags = 0 // compared through badFlags
	f.vni = uint32(vx[4])<<16 | uint32(vx[5])<<8 | uint32(vx[6])
	eth := udp[16:]
	f.innerDstMAC = net.HardwareAddr(eth[0:6]).String()
	f.innerSrcMAC = net.HardwareAddr(eth[6:12]).String()
	if be.Uint16(eth[12:]) != unix.ETH_P_IP {
		return frame{}, false
	}
	in := eth[14:]
	f.innerProto = in[9]
	f.innerSrc, _ = netip.AddrFromSlice(in[12:16])
	f.innerDst, _ = netip.AddrFromSlice(in[16:20])
	return f, true
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// An IPv6-only underlay and pod network: flannel-v6.1 alone, MTU 1430, and
// pods talk over it.
func TestVXLANIPv6Underlay(t *testing.T) {
	nstest.NoLeaks(t)
	nodes := topology(t, 2, false)
	v6 := fams{v6: true}
	nws, _, _ := cluster(t, nodes, v6, `{"Type":"vxlan"}`, time.Hour)
	for _, n := range nodes {
		checkDevice(t, n, "flannel-v6.1", n.v6, VtepMAC(n.name, "flannel-v6.1"), 1430, fmt.Sprintf("fc00:0:0:%d::/128", n.i))
		if _, ok := vxlanLink(t, n.h, "flannel.1"); ok {
			t.Errorf("%s has flannel.1 with IPv4 off", n.name)
		}
		checkPeers(t, n, nodes, v6)
	}
	if m := nws[0].MTU(); m != 1430 {
		t.Errorf("MTU() = %d, want 1430 over an IPv6 underlay", m)
	}
	if d := nws[0].BackendData(); d != nil {
		t.Errorf("BackendData with IPv4 off = %s, want nil", d)
	}
	checkPods(t, nodes[0], nodes[1], v6)
}

// After a partition longer than the lease TTL, another node takes this
// node's old subnet and this node a new one. The other node's lease can
// arrive while this node still holds that subnet: it is not programmed
// then (it looks like our own), and must be as soon as this node moves.
func TestVXLANPeerTakesOurOldSubnet(t *testing.T) {
	nstest.NoLeaks(t)
	n1 := topology(t, 1, false)[0]
	nw := n1.newNetwork(t, fams{v4: true}, `{"Type":"vxlan"}`, time.Hour, &nstest.LogBuffer{}, prometheus.NewPedanticRegistry())
	own := n1.lease(fams{v4: true}, nw)
	nw.SetLocal(own)
	run(t, nw)
	nstest.Eventually(t, within, "Network ready", nw.Ready)

	taker := v4only(node(3))
	taker.Subnet = own.Subnet
	nw.Handle(added(taker))
	time.Sleep(200 * time.Millisecond) // the partial sync Handle asked for
	if r, ok := kernelRoute(t, n1.h, own.Subnet); ok && r.Protocol == routes.Protocol {
		t.Fatalf("a loom route to the subnet this node still holds: %+v", r)
	}

	moved := own
	moved.Subnet = netip.MustParsePrefix("10.244.132.0/24")
	nw.SetLocal(moved)
	// Neighbour and FDB entry; the route waits for the old subnet's
	// connected route (cni0's, here the topology's) to go, as the agent's
	// SUBNET CHANGED error tells the operator.
	mac := VtepMAC("n3", "flannel.1")
	nstest.Eventually(t, within, "the taker's neighbour and FDB entries after this node moved", func() bool {
		n, okN := kernelNeigh(t, n1.h, "flannel.1", own.Subnet.Addr())
		f, okF := kernelFDB(t, n1.h, "flannel.1", mac)
		return okN && okF && n.HardwareAddr.String() == mac.String() && f.IP.Equal(taker.Attrs.PublicIP.AsSlice())
	})
}
