package hostgw

// Kernel tests. Everything lives in namespaces made by testnet; the test
// process's own namespace is never touched. Topology (underlay):
//
//	                  rt: br0 (02:00:5e:00:01:00, no address)
//	          ┌────────────┼────────────┐
//	          v1           v2           v3            (ports, in rt)
//	          │            │            │
//	     n1 eth0      n2 eth0      n3 eth0
//	  198.18.0.11  198.18.0.12  198.18.0.13   /24
//	2001:db8::11 2001:db8::12 2001:db8::13    /64 (nodad)
//
// Node nN leases 10.244.N.0/24 and fc00:0:0:N::/64 (see node in
// plan_test.go). Peers with no namespace: n4 (198.18.0.14, on-link but
// nobody answers) and "far" (198.19.5.5, not on-link). For the end-to-end
// test each node also gets a pod namespace pN:
//
//	pN eth0 10.244.N.10/24 fc00:0:0:N::10/64 ── nN vethpN 10.244.N.1/24 fc00:0:0:N::1/64

import (
	"bufio"
	"context"
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
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

type testNode struct {
	ns   ns.NetNS
	h    *netlink.Handle
	eth0 netlink.Link
}

// underlay builds the bridged underlay with nodes n1..nN.
func underlay(t *testing.T, count int) []testNode {
	t.Helper()
	rt, hrt := nstest.NewNode(t, "rt")
	var ports []netlink.Link
	nodes := make([]testNode, count)
	for i := range nodes {
		d := fmt.Sprint(i + 1)
		n, h := nstest.NewNode(t, "n"+d)
		eth0, port := nstest.Veth(t, n, h, "eth0", rt, hrt, "v"+d)
		nstest.Addr(t, h, eth0, "198.18.0.1"+d+"/24", "2001:db8::1"+d+"/64")
		nodes[i] = testNode{ns: n, h: h, eth0: eth0}
		ports = append(ports, port)
	}
	nstest.Bridge(t, hrt, "br0", "02:00:5e:00:01:00", ports...)
	return nodes
}

// stubNode is a lone node whose eth0 holds n1's underlay addresses.
func stubNode(t *testing.T) testNode {
	t.Helper()
	n, h := nstest.NewNode(t, "n1")
	eth0 := nstest.Stub(t, h, "eth0")
	nstest.Addr(t, h, eth0, "198.18.0.11/24", "2001:db8::11/64")
	return testNode{ns: n, h: h, eth0: eth0}
}

func added(ls ...lease.Lease) []lease.Event {
	var evs []lease.Event
	for _, l := range ls {
		evs = append(evs, lease.Event{Type: lease.Added, Lease: &l})
	}
	return evs
}

// newNetwork makes a Network in n's namespace, logging to logs and, when
// reg is set, exporting metrics to it.
func newNetwork(t *testing.T, n testNode, resync time.Duration, logs *nstest.LogBuffer, reg *prometheus.Registry) *Network {
	t.Helper()
	cfg := Config{
		ExtLink:   "eth0",
		NetNSPath: n.ns.Path(),
		Resync:    resync,
		Logger:    slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if reg != nil {
		cfg.Metrics = reg
	}
	nw, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || testing.Verbose() {
			t.Logf("logs of the Network in %s:\n%s", n.ns.Path(), logs)
		}
	})
	return nw
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

// routeCheck describes what a test expects at one destination.
type routeCheck struct {
	dst   string
	gw    string // "" : no route at dst
	proto netlink.RouteProtocol
}

func checkRoutes(t *testing.T, n testNode, checks ...routeCheck) {
	t.Helper()
	have := nstest.Routes(t, n.h)
	for _, c := range checks {
		got, ok := have[netip.MustParsePrefix(c.dst)]
		switch {
		case c.gw == "" && ok:
			t.Errorf("route to %s: %+v, want none", c.dst, got)
		case c.gw == "":
		case !ok:
			t.Errorf("no route to %s, want via %s proto %d", c.dst, c.gw, c.proto)
		case got.Gw != netip.MustParseAddr(c.gw) || got.Proto != c.proto || got.Link != n.eth0.Attrs().Index:
			t.Errorf("route to %s: %+v, want via %s dev eth0 proto %d", c.dst, got, c.gw, c.proto)
		}
	}
}

func hasRoute(t *testing.T, n testNode, dst string) bool {
	r, ok := nstest.Routes(t, n.h)[netip.MustParsePrefix(dst)]
	return ok && r.Proto == routes.Protocol
}

func delRoute(t *testing.T, n testNode, dst string) {
	t.Helper()
	p := netip.MustParsePrefix(dst)
	if err := n.h.RouteDel(&netlink.Route{Dst: nstest.IPNet(p), Protocol: routes.Protocol}); err != nil {
		t.Fatalf("delete route to %s by hand: %v", dst, err)
	}
}

func TestHostGW(t *testing.T) {
	nstest.NoLeaks(t)
	nodes := underlay(t, 3)
	n1 := nodes[0]
	const resync = time.Second
	// Margin for "within one resync": scheduling on a loaded 2-core box.
	const withinResync = resync + 3*time.Second

	// State found at start: a foreign route, a stale loom route (its peer
	// left while the agent was down), and a foreign route on n4's subnet.
	nstest.Route(t, n1.h, "10.244.200.0/24", "198.18.0.12", n1.eth0, unix.RTPROT_STATIC)
	nstest.Route(t, n1.h, "10.244.9.0/24", "198.18.0.13", n1.eth0, routes.Protocol)
	nstest.Route(t, n1.h, "10.244.4.0/24", "198.18.0.13", n1.eth0, unix.RTPROT_STATIC)

	far := v4only(node(5))
	far.Attrs.NodeName = "far"
	far.Attrs.PublicIP = netip.MustParseAddr("198.19.5.5")
	vx := v4only(node(6))
	vx.Attrs.BackendType = "vxlan"

	logs := &nstest.LogBuffer{}
	reg := prometheus.NewRegistry()
	nw := newNetwork(t, n1, resync, logs, reg)
	nw.SetLocal(node(1))
	nw.Handle(added(node(2), node(3), v4only(node(4)), far, vx, node(1)))
	stop := run(t, nw)
	nstest.Eventually(t, 10*time.Second, "Network ready", nw.Ready)

	foreign := []routeCheck{
		{dst: "10.244.200.0/24", gw: "198.18.0.12", proto: unix.RTPROT_STATIC},
		{dst: "10.244.4.0/24", gw: "198.18.0.13", proto: unix.RTPROT_STATIC}, // conflict: left alone
	}
	checkRoutes(t, n1, append(foreign,
		routeCheck{dst: "10.244.2.0/24", gw: "198.18.0.12", proto: routes.Protocol},
		routeCheck{dst: "10.244.3.0/24", gw: "198.18.0.13", proto: routes.Protocol},
		routeCheck{dst: "fc00:0:0:2::/64", gw: "2001:db8::12", proto: routes.Protocol},
		routeCheck{dst: "fc00:0:0:3::/64", gw: "2001:db8::13", proto: routes.Protocol},
		routeCheck{dst: "10.244.9.0/24"},   // stale: removed
		routeCheck{dst: "10.244.5.0/24"},   // far: not on-link
		routeCheck{dst: "10.244.6.0/24"},   // vxlan peer: skipped
		routeCheck{dst: "fc00:0:0:1::/64"}, // ourselves
	)...)

	for _, want := range [][]string{
		{"level=ERROR", "node=far", "public_ip=198.19.5.5", "not on-link", "vxlan"},
		{"level=WARN", "node=n6", "peer_backend=vxlan"},
		{"level=ERROR", "10.244.4.0/24", "does not own"},
	} {
		if len(logs.Lines(want...)) == 0 {
			t.Errorf("no log line with all of %q", want)
		}
	}

	t.Run("deleted route returns within one resync", func(t *testing.T) {
		delRoute(t, n1, "10.244.2.0/24")
		delRoute(t, n1, "fc00:0:0:3::/64")
		nstest.Eventually(t, withinResync, "deleted routes back", func() bool {
			return hasRoute(t, n1, "10.244.2.0/24") && hasRoute(t, n1, "fc00:0:0:3::/64")
		})
		checkRoutes(t, n1, foreign...)
	})

	t.Run("removed peer loses its routes", func(t *testing.T) {
		nw.Handle([]lease.Event{{Type: lease.Removed, Lease: new(node(3))}})
		nstest.Eventually(t, withinResync, "n3's routes gone", func() bool {
			return !hasRoute(t, n1, "10.244.3.0/24") && !hasRoute(t, n1, "fc00:0:0:3::/64")
		})
		checkRoutes(t, n1, append(foreign,
			routeCheck{dst: "10.244.2.0/24", gw: "198.18.0.12", proto: routes.Protocol})...)
	})

	t.Run("metrics", func(t *testing.T) {
		got := gather(t, reg)
		if got["loom_reconcile_syncs_total"] < 1 || got["loom_reconcile_changes_total"] < 6 ||
			got["loom_reconcile_conflicts"] != 1 || got["loom_hostgw_peers_unroutable"] != 1 {
			t.Errorf("metrics %v: want syncs, at least 6 changes, 1 conflict, 1 unroutable peer", got)
		}
	})

	t.Run("shutdown leaves routes in place", func(t *testing.T) {
		stop()
		checkRoutes(t, n1, routeCheck{dst: "10.244.2.0/24", gw: "198.18.0.12", proto: routes.Protocol},
			routeCheck{dst: "fc00:0:0:2::/64", gw: "2001:db8::12", proto: routes.Protocol})
	})
}

// gather sums each metric family's samples.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := make(map[string]float64)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			got[mf.GetName()] += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return got
}

// With a resync period far longer than the test, only netlink events can
// bring routes back or add the route of a peer that became on-link.
func TestHostGWEventsActBeforeResync(t *testing.T) {
	nstest.NoLeaks(t)
	n1 := stubNode(t)
	logs := &nstest.LogBuffer{}
	nw := newNetwork(t, n1, time.Hour, logs, nil)
	far := v4only(node(5))
	far.Attrs.PublicIP = netip.MustParseAddr("198.19.5.5")
	nw.SetLocal(node(1))
	nw.Handle(added(node(2), far))
	run(t, nw)
	nstest.Eventually(t, 10*time.Second, "Network ready", nw.Ready)
	before := nw.Stats()

	delRoute(t, n1, "10.244.2.0/24")
	delRoute(t, n1, "fc00:0:0:2::/64")
	nstest.Eventually(t, 10*time.Second, "routes back through the event path", func() bool {
		return hasRoute(t, n1, "10.244.2.0/24") && hasRoute(t, n1, "fc00:0:0:2::/64")
	})
	if s := nw.Stats(); s.PartialSyncs == before.PartialSyncs {
		t.Errorf("stats %+v: the routes came back without a partial sync", s)
	}

	// far becomes on-link when eth0 gains an address in its subnet: the
	// connected-route event asks for a full sync.
	nstest.Addr(t, n1.h, n1.eth0, "198.19.5.11/24")
	nstest.Eventually(t, 10*time.Second, "route to far once on-link", func() bool { return hasRoute(t, n1, "10.244.5.0/24") })
	if len(logs.Lines("peer problem gone", "10.244.5.0/24")) == 0 {
		t.Error("the resolved problem was not logged")
	}
}

// IPv4 routes flushed by a link going down vanish without an event; the
// periodic resync must bring them back.
func TestHostGWLinkFlap(t *testing.T) {
	nstest.NoLeaks(t)
	n1 := stubNode(t)
	// IPv6 addresses are flushed when their link goes down unless
	// keep_addr_on_down is set (then host-gw rightly finds the IPv6 peer
	// not on-link until someone re-adds the address).
	nstest.Sysctl(t, n1.ns, "net/ipv6/conf/eth0/keep_addr_on_down", "1")
	nw := newNetwork(t, n1, time.Second, &nstest.LogBuffer{}, nil)
	nw.SetLocal(node(1))
	nw.Handle(added(node(2)))
	run(t, nw)
	nstest.Eventually(t, 10*time.Second, "Network ready", nw.Ready)

	if err := n1.h.LinkSetDown(n1.eth0); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "kernel flushed the route", func() bool { return !hasRoute(t, n1, "10.244.2.0/24") })
	if err := n1.h.LinkSetUp(n1.eth0); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "route back after the link came up", func() bool {
		return hasRoute(t, n1, "10.244.2.0/24") && hasRoute(t, n1, "fc00:0:0:2::/64")
	})
}

// Two nodes, each with a pod behind it and its own Network: a TCP
// connection from pod 1 to pod 2 works over IPv4 and IPv6, and pod 2 sees
// pod 1's own address (routed, not NATed).
func TestHostGWEndToEnd(t *testing.T) {
	nstest.NoLeaks(t)
	nodes := underlay(t, 2)
	pods := make([]ns.NetNS, len(nodes))
	for i, n := range nodes {
		d := fmt.Sprint(i + 1)
		// A fresh namespace does not forward; an agent turns it on.
		nstest.Sysctl(t, n.ns, "net/ipv4/ip_forward", "1")
		nstest.Sysctl(t, n.ns, "net/ipv6/conf/all/forwarding", "1")
		pod, hp := nstest.NewNode(t, "p"+d)
		host, eth0 := nstest.Veth(t, n.ns, n.h, "vethp"+d, pod, hp, "eth0")
		nstest.Addr(t, n.h, host, "10.244."+d+".1/24", "fc00:0:0:"+d+"::1/64")
		nstest.Addr(t, hp, eth0, "10.244."+d+".10/24", "fc00:0:0:"+d+"::10/64")
		nstest.Route(t, hp, "0.0.0.0/0", "10.244."+d+".1", eth0, 0)
		nstest.Route(t, hp, "::/0", "fc00:0:0:"+d+"::1", eth0, 0)
		pods[i] = pod

		nw := newNetwork(t, n, time.Second, &nstest.LogBuffer{}, nil)
		nw.SetLocal(node(i + 1))
		nw.Handle(added(node(1), node(2)))
		run(t, nw)
		nstest.Eventually(t, 10*time.Second, "Network ready on n"+d, nw.Ready)
	}

	for _, tc := range []struct{ client, server string }{
		{client: "10.244.1.10", server: "10.244.2.10"},
		{client: "fc00:0:0:1::10", server: "fc00:0:0:2::10"},
	} {
		t.Run(tc.server, func(t *testing.T) {
			seen := echoPeer(t, pods[0], pods[1], tc.server)
			if seen != tc.client {
				t.Errorf("server saw the connection from %s, want pod 1's %s", seen, tc.client)
			}
		})
	}
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
