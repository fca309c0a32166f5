package udp

// Kernel tests: see topo_test.go for the topology and address plan.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
)

// Pod to pod over TCP, both ways and both families, through the two udp
// Networks: the server sees the client pod's own address (no NAT), and a
// bulk transfer arrives intact (it crosses the offload paths: TSO frames
// cut into segments, segments merged again).
func TestUDPEndToEnd(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    topoOptions
	}{
		{name: "offloads", o: topoOptions{}},
		{name: "no offloads", o: topoOptions{noOffload: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nstest.NoLeaks(t)
			topo := newTopo(t, tc.o)
			p1, p2 := topo.nodes[0].pod, topo.nodes[1].pod
			for _, c := range []struct {
				from, to       ns.NetNS
				client, server string
			}{
				{from: p1, to: p2, client: "10.244.1.10", server: "10.244.2.10"},
				{from: p2, to: p1, client: "10.244.2.10", server: "10.244.1.10"},
				{from: p1, to: p2, client: "fc00:0:0:1::10", server: "fc00:0:0:2::10"},
				{from: p2, to: p1, client: "fc00:0:0:2::10", server: "fc00:0:0:1::10"},
			} {
				t.Run(c.client+"->"+c.server, func(t *testing.T) {
					seen := echoPeer(t, c.from, c.to, c.server, 4<<20)
					if seen != c.client {
						t.Errorf("server saw the connection from %s, want the client pod's %s", seen, c.client)
					}
				})
			}
			for i, tn := range topo.nodes {
				s := tn.nw.Stats()
				t.Logf("n%d: %+v", i+1, s)
				if s.TxPackets == 0 || s.RxPackets == 0 || s.Peers != 1 {
					t.Errorf("n%d: stats %+v: want traffic both ways and one peer", i+1, s)
				}
				for reason, v := range s.Dropped {
					if v != 0 && reason != "link_local" {
						t.Errorf("n%d dropped %d packets (%s)", i+1, v, reason)
					}
				}
				if tc.o.noOffload && (s.Offloads != Offloads{}) {
					t.Errorf("n%d: offloads %+v with offloads off", i+1, s.Offloads)
				}
				m := gather(t, tn.reg)
				offloads := 3.0
				if tc.o.noOffload {
					offloads = 0
				}
				// Read after Stats: late packets (ACKs) may add to it.
				if m["loom_udp_packets_total"] < float64(s.TxPackets+s.RxPackets) || m["loom_udp_peers"] != 1 ||
					m["loom_udp_offload"] != offloads || m["loom_reconcile_owned"] != 2 {
					t.Errorf("n%d: metrics %v", i+1, m)
				}
			}
		})
	}
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

// echoPeer listens on server:0 inside serverNS, connects from clientNS,
// sends bulk bytes of a known pattern that the server checks, and returns
// the client address the server saw, as the server reported it back.
func echoPeer(t *testing.T, clientNS, serverNS ns.NetNS, server string, bulk int) string {
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
	if err := ln.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
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
		c.SetDeadline(time.Now().Add(20 * time.Second))
		buf := make([]byte, bulk)
		if _, err := io.ReadFull(c, buf); err != nil {
			served <- fmt.Errorf("read the bulk data: %w", err)
			return
		}
		for i, b := range buf {
			if b != pattern(i) {
				served <- fmt.Errorf("bulk data corrupted at byte %d: %#x, want %#x", i, b, pattern(i))
				return
			}
		}
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
	if err := conn.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, bulk)
	for i := range buf {
		buf[i] = pattern(i)
	}
	if _, err := conn.Write(buf); err != nil {
		t.Fatalf("send the bulk data: %v", err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("read the server's answer: %v (server: %v)", err, <-served)
	}
	if err := <-served; err != nil {
		t.Fatalf("server: %v", err)
	}
	return strings.TrimSpace(line)
}

// pattern is the bulk data: not periodic in any segment size, so a segment
// moved, lost or duplicated shows.
func pattern(i int) byte { return byte(i*7 + i>>11) }

// Deleting flannel0 by hand: the Network re-creates it, with its address,
// MTU and route, and traffic flows again.
func TestUDPDeviceRecreated(t *testing.T) {
	nstest.NoLeaks(t)
	topo := newTopo(t, topoOptions{})
	n1 := topo.nodes[0]
	if seen := echoPeer(t, n1.pod, topo.nodes[1].pod, "10.244.2.10", 1<<16); seen != "10.244.1.10" {
		t.Fatalf("before: server saw %s", seen)
	}
	link, err := n1.h.LinkByName(DeviceName)
	if err != nil {
		t.Fatal(err)
	}
	if err := n1.h.LinkDel(link); err != nil {
		t.Fatalf("delete %s by hand: %v", DeviceName, err)
	}
	nstest.Eventually(t, 10*time.Second, DeviceName+" re-created with its address and route", func() bool {
		l, err := n1.h.LinkByName(DeviceName)
		if err != nil || l.Attrs().Index == link.Attrs().Index || l.Attrs().MTU != n1.nw.MTU() || l.Attrs().Flags&net.FlagUp == 0 {
			return false
		}
		addrs, err := n1.h.AddrList(l, netlink.FAMILY_V4)
		if err != nil || len(addrs) != 1 || addrs[0].IPNet.String() != "10.244.1.0/32" {
			return false
		}
		r, ok := nstest.Routes(t, n1.h)[netip.MustParsePrefix("10.244.0.0/16")]
		return ok && r.Link == l.Attrs().Index && r.Proto == routes.Protocol
	})
	if s := n1.nw.Stats(); s.Recreated != 1 {
		t.Errorf("Recreated = %d, want 1", s.Recreated)
	}
	for _, c := range []struct{ from, to, client, server string }{
		{client: "10.244.1.10", server: "10.244.2.10"},
		{client: "fc00:0:0:1::10", server: "fc00:0:0:2::10"},
	} {
		if seen := echoPeer(t, n1.pod, topo.nodes[1].pod, c.server, 1<<16); seen != c.client {
			t.Errorf("after: server saw %s, want %s", seen, c.client)
		}
	}
	if len(n1.logs.Lines("was deleted; re-creating")) == 0 {
		t.Error("the re-creation was not logged")
	}
}

// With a resync period far longer than the test, netlink events alone
// restore flannel0's MTU, address, state and route after someone changes
// them by hand.
func TestUDPDeviceRestored(t *testing.T) {
	nstest.NoLeaks(t)
	topo := newTopo(t, topoOptions{resync: time.Hour})
	n1 := topo.nodes[0]
	link := func() netlink.Link {
		l, err := n1.h.LinkByName(DeviceName)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	hasAddr := func() bool {
		addrs, err := n1.h.AddrList(link(), netlink.FAMILY_V4)
		return err == nil && len(addrs) == 1 && addrs[0].IPNet.String() == "10.244.1.0/32"
	}
	hasRoute := func() bool {
		r, ok := nstest.Routes(t, n1.h)[netip.MustParsePrefix("10.244.0.0/16")]
		return ok && r.Proto == routes.Protocol && r.Link == link().Attrs().Index
	}
	for _, tc := range []struct {
		name     string
		break_   func() error
		restored func() bool
	}{
		{"MTU", func() error { return n1.h.LinkSetMTU(link(), 1300) }, func() bool { return link().Attrs().MTU == n1.nw.MTU() }},
		{"address", func() error {
			return n1.h.AddrDel(link(), &netlink.Addr{IPNet: nstest.IPNet(netip.MustParsePrefix("10.244.1.0/32"))})
		}, hasAddr},
		{"foreign address removed", func() error {
			return n1.h.AddrAdd(link(), &netlink.Addr{IPNet: nstest.IPNet(netip.MustParsePrefix("10.244.77.1/32"))})
		}, hasAddr},
		{"down", func() error { return n1.h.LinkSetDown(link()) }, func() bool { return link().Attrs().Flags&net.FlagUp != 0 && hasRoute() }},
		{"route", func() error {
			return n1.h.RouteDel(&netlink.Route{Dst: nstest.IPNet(netip.MustParsePrefix("10.244.0.0/16")), Protocol: routes.Protocol})
		}, hasRoute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.break_(); err != nil {
				t.Fatalf("break by hand: %v", err)
			}
			nstest.Eventually(t, 5*time.Second, tc.name+" restored", tc.restored)
		})
	}
	if seen := echoPeer(t, n1.pod, topo.nodes[1].pod, "10.244.2.10", 1<<16); seen != "10.244.1.10" {
		t.Errorf("after: server saw %s", seen)
	}
}

// When the kernel refuses a GSO send, the datagrams go one by one and
// traffic flows. The refusal provoked here is a path MTU below the
// datagrams' size (a route to n2 with MTU 1400: EMSGSIZE, where a single
// datagram is fragmented). The other refusal, EIO from an underlay device
// without TX checksum offload, is what kernels before 6.11 answer; newer
// ones checksum in software, so it cannot be provoked on them (the
// answer to both is the same resend; EIO also turns GSO off for good).
func TestUDPGSOFallback(t *testing.T) {
	nstest.NoLeaks(t)
	topo := newTopo(t, topoOptions{})
	n1 := topo.nodes[0]
	if !n1.nw.Stats().Offloads.GSO {
		t.Skip("the kernel has no UDP GSO: nothing to fall back from")
	}
	err := n1.h.RouteAdd(&netlink.Route{Dst: nstest.IPNet(netip.MustParsePrefix("198.18.0.12/32")), LinkIndex: n1.eth0.Attrs().Index, MTU: 1400})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ client, server string }{
		{client: "10.244.1.10", server: "10.244.2.10"},
		{client: "fc00:0:0:1::10", server: "fc00:0:0:2::10"},
	} {
		if seen := echoPeer(t, n1.pod, topo.nodes[1].pod, c.server, 4<<20); seen != c.client {
			t.Errorf("server saw %s, want %s", seen, c.client)
		}
	}
	if got := len(n1.logs.Lines("level=WARN", "resending datagram by datagram")); got < 1 || got > n1.nw.workers {
		t.Errorf("%d notices of the resend, want one per socket at most", got)
	}
	if s := n1.nw.Stats(); s.Dropped["send_error"] != 0 || !s.Offloads.GSO {
		t.Errorf("stats %+v: want no send errors, GSO still on", s)
	}
}

// An agent restart: Run returns leaving flannel0, its address and route in
// place; a new Network attaches to the same device, and traffic flows.
func TestUDPRestart(t *testing.T) {
	nstest.NoLeaks(t)
	topo := newTopo(t, topoOptions{})
	n1 := topo.nodes[0]
	before, err := n1.h.LinkByName(DeviceName)
	if err != nil {
		t.Fatal(err)
	}
	n1.stop()
	after, err := n1.h.LinkByName(DeviceName)
	if err != nil || after.Attrs().Index != before.Attrs().Index {
		t.Fatalf("%s gone after Run returned: %v", DeviceName, err)
	}
	if r, ok := nstest.Routes(t, n1.h)[netip.MustParsePrefix("10.244.0.0/16")]; !ok || r.Link != before.Attrs().Index {
		t.Fatalf("route gone after Run returned")
	}

	cfg := n1.nw.cfg
	cfg.Metrics = prometheus.NewRegistry()
	nw, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	nw.SetLocal(node(1))
	nw.Handle(added(node(2)))
	runNetwork(t, nw)
	nstest.Eventually(t, 10*time.Second, "restarted Network ready", nw.Ready)
	if l, err := n1.h.LinkByName(DeviceName); err != nil || l.Attrs().Index != before.Attrs().Index {
		t.Errorf("the restarted Network made another device: %v", err)
	}
	if seen := echoPeer(t, n1.pod, topo.nodes[1].pod, "10.244.2.10", 1<<20); seen != "10.244.1.10" {
		t.Errorf("after the restart: server saw %s", seen)
	}
	if s := nw.Stats(); s.Recreated != 0 || s.TxPackets == 0 {
		t.Errorf("stats after restart %+v", s)
	}
}

// Run fails at once, saying what to do, when the port is taken or a device
// named flannel0 that is not ours exists.
func TestUDPStartErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, n ns.NetNS, h *netlink.Handle)
		want  []string
	}{{
		name: "port taken",
		setup: func(t *testing.T, n ns.NetNS, h *netlink.Handle) {
			err := n.Do(func(ns.NetNS) error {
				c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(198, 18, 0, 11), Port: 8285})
				if err == nil {
					t.Cleanup(func() { c.Close() })
				}
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
		},
		want: []string{"8285", "is taken", "flanneld"},
	}, {
		name:  "public IP not local",
		setup: func(t *testing.T, n ns.NetNS, h *netlink.Handle) {},
		want:  []string{"198.18.0.99 is not an address of this node", "-iface"},
	}, {
		name: "flanneld's flannel0",
		setup: func(t *testing.T, n ns.NetNS, h *netlink.Handle) {
			// A TUN is created in the namespace of the thread that opens
			// /dev/net/tun, whatever netlink handle asks: so inside n.
			err := n.Do(func(ns.NetNS) error {
				return netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: DeviceName}, Mode: netlink.TUNTAP_MODE_TUN,
					Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_ONE_QUEUE})
			})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.LinkByName(DeviceName); err != nil {
				t.Fatalf("the single-queue %s is not in the test's namespace: %v", DeviceName, err)
			}
		},
		want: []string{"not a multi-queue TUN", "ip link del flannel0"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			nstest.NoLeaks(t)
			n, h := nstest.NewNode(t, "n1")
			eth0 := nstest.Stub(t, h, "eth0")
			nstest.Addr(t, h, eth0, "198.18.0.11/24")
			tc.setup(t, n, h)
			ip := netip.MustParseAddr("198.18.0.11")
			if tc.name == "public IP not local" {
				ip = netip.MustParseAddr("198.18.0.99")
			}
			nw, err := New(Config{Network: netConfig(t), PublicIP: ip, ExtMTU: 1500, NetNSPath: n.Path(),
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				t.Fatal(err)
			}
			nw.SetLocal(node(1))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err = nw.Run(ctx)
			if err == nil {
				t.Fatal("Run succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}
