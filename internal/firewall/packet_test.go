package firewall

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/probe"
)

// packetTopo is the smallest network that shows what the rules do to real
// packets:
//
//	pod ns                  node ns (forwarding on, loom's rules)             internet ns
//	eth0 10.244.1.2/24 ---- pod0  10.244.1.1/24   fd00:244:0:1::1/64
//	     fd00:244:0:1::2/64
//	rpod ns ("remote" pod, another node's subnet, routed by this node)
//	eth0 10.244.2.2/24 ---- rpod0 10.244.2.1/24   fd00:244:0:2::1/64
//	     fd00:244:0:2::2/64
//	                        eth0  198.18.0.11/24  2001:db8:18::11/64 ----  eth0 198.18.0.1/24, 2001:db8:18::1/64
//	                        default via 198.18.0.1, 2001:db8:18::1          lo   203.0.113.10, 2001:db8:113::10
//
// The internet namespace has no route to the pod network: a pod's packet
// reaches it only if the node masquerades it.
type packetTopo struct {
	pod, rpod, node, inet *testNS
}

func newPacketTopo(t *testing.T) *packetTopo {
	t.Helper()
	tp := &packetTopo{
		pod:  newTestNS(t, "fw-pod"),
		rpod: newTestNS(t, "fw-rpod"),
		node: newTestNS(t, "fw-node"),
		inet: newTestNS(t, "fw-inet"),
	}
	veth(t, tp.node, "pod0", tp.pod, "eth0")
	veth(t, tp.node, "rpod0", tp.rpod, "eth0")
	veth(t, tp.node, "eth0", tp.inet, "eth0")
	tp.node.addr(t, "pod0", "10.244.1.1/24", "fd00:244:0:1::1/64")
	tp.node.addr(t, "rpod0", "10.244.2.1/24", "fd00:244:0:2::1/64")
	tp.node.addr(t, "eth0", "198.18.0.11/24", "2001:db8:18::11/64")
	tp.pod.addr(t, "eth0", "10.244.1.2/24", "fd00:244:0:1::2/64")
	tp.rpod.addr(t, "eth0", "10.244.2.2/24", "fd00:244:0:2::2/64")
	tp.inet.addr(t, "eth0", "198.18.0.1/24", "2001:db8:18::1/64")
	tp.inet.addr(t, "lo", "203.0.113.10/32", "2001:db8:113::10/128")
	tp.pod.route(t, "", "10.244.1.1")
	tp.pod.route(t, "", "fd00:244:0:1::1")
	tp.rpod.route(t, "", "10.244.2.1")
	tp.rpod.route(t, "", "fd00:244:0:2::1")
	tp.node.route(t, "", "198.18.0.1")
	tp.node.route(t, "", "2001:db8:18::1")
	// A fresh namespace does not forward (DESIGN §5); the agent sets these.
	tp.node.sysctl(t, "net/ipv4/ip_forward", "1")
	tp.node.sysctl(t, "net/ipv6/conf/all/forwarding", "1")
	return tp
}

// serve starts loom's TCP probe on addr inside x until the test ends.
func serve(t *testing.T, x *testNS, addr string) netip.AddrPort {
	t.Helper()
	ln, err := netns.Listen(x.name, "tcp", net.JoinHostPort(addr, "0"))
	if err != nil {
		t.Fatalf("listen on %s in %s: %v", addr, x.name, err)
	}
	done := make(chan error, 1)
	go func() { done <- probe.ServeTCP(ln) }()
	t.Cleanup(func() {
		ln.Close()
		if err := <-done; err != nil {
			t.Errorf("probe server: %v", err)
		}
	})
	return netip.MustParseAddrPort(ln.Addr().String())
}

// seen connects from x (from local address from, if set) to to and returns
// the source address the server saw, or the error.
func seen(x *testNS, from string, to netip.AddrPort, timeout time.Duration) (netip.Addr, error) {
	d := netns.Dialer{NS: x.name}
	if from != "" {
		d.D.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	ap, err := probe.TCP(ctx, d, to)
	return ap.Addr(), err
}

// TestKernelPacketMasquerade sends real TCP connections through a node
// with loom's rules, in each mode, and checks the source address each
// server saw.
func TestKernelPacketMasquerade(t *testing.T) {
	const (
		ok      = time.Duration(10 * time.Second) // generous: the first SYN may wait for neighbour discovery
		refused = time.Duration(2 * time.Second)  // a connection that must not work
	)
	variants := []struct {
		name        string
		mode        Mode
		ipMasq      bool
		forward     bool
		forwardDrop bool // iptables' FORWARD policy DROP, as Docker sets it
		// reachable: pod traffic gets through the node at all (false only
		// for the control: DROP without loom's accept).
		reachable bool
	}{
		{name: "nftables", mode: ModeNFTables, ipMasq: true, forward: true, reachable: true},
		{name: "iptables", mode: ModeIPTables, ipMasq: true, forward: true, reachable: true},
		{name: "auto with FORWARD policy DROP", mode: ModeAuto, ipMasq: true, forward: true, forwardDrop: true, reachable: true},
		{name: "iptables with FORWARD policy DROP", mode: ModeIPTables, ipMasq: true, forward: true, forwardDrop: true, reachable: true},
		{name: "nftables ip-masq off", mode: ModeNFTables, forward: true, reachable: true},
		{name: "iptables ip-masq off", mode: ModeIPTables, forward: true, reachable: true},
		{name: "control: FORWARD policy DROP and forward rules off", mode: ModeAuto, ipMasq: true, forwardDrop: true},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			tp := newPacketTopo(t)
			inet4 := serve(t, tp.inet, "203.0.113.10")
			inet6 := serve(t, tp.inet, "2001:db8:113::10")
			rpod4 := serve(t, tp.rpod, "10.244.2.2")
			rpod6 := serve(t, tp.rpod, "fd00:244:0:2::2")
			pod4 := serve(t, tp.pod, "10.244.1.2")
			if v.forwardDrop {
				setForwardPolicy(t, tp.node, "DROP")
			}
			startFirewall(t, tp.node, Config{Mode: v.mode, IPMasq: v.ipMasq, ForwardRules: v.forward}, dualStack())

			type check struct {
				name string
				from *testNS
				src  string // local address to dial from ("" = the kernel's choice)
				to   netip.AddrPort
				want string // source the server must see; "" = the connection must fail
			}
			checks := []check{
				// Host traffic is not forwarded: FORWARD's policy does not matter.
				{name: "host to local pod keeps the source", from: tp.node, src: "198.18.0.11", to: pod4, want: "198.18.0.11"},
			}
			if v.reachable {
				checks = append(checks,
					check{name: "pod to pod keeps the source", from: tp.pod, to: rpod4, want: "10.244.1.2"},
					check{name: "pod to pod keeps the source (IPv6)", from: tp.pod, to: rpod6, want: "fd00:244:0:1::2"})
			} else {
				checks = append(checks, check{name: "pod to pod is dropped", from: tp.pod, to: rpod4})
			}
			switch {
			case !v.reachable:
				checks = append(checks, check{name: "pod to internet is dropped", from: tp.pod, to: inet4})
			case v.ipMasq:
				checks = append(checks,
					check{name: "pod to internet is masqueraded to the node", from: tp.pod, to: inet4, want: "198.18.0.11"},
					check{name: "pod to internet is masqueraded to the node (IPv6)", from: tp.pod, to: inet6, want: "2001:db8:18::11"},
					check{name: "host to remote pod is masqueraded", from: tp.node, src: "198.18.0.11", to: rpod4, want: "10.244.2.1"})
			default:
				checks = append(checks,
					check{name: "pod to internet leaves with the pod source, so no reply comes back", from: tp.pod, to: inet4},
					check{name: "pod to internet leaves with the pod source (IPv6)", from: tp.pod, to: inet6},
					check{name: "host to remote pod keeps the source", from: tp.node, src: "198.18.0.11", to: rpod4, want: "198.18.0.11"})
			}
			for _, c := range checks {
				timeout := ok
				if c.want == "" {
					timeout = refused
				}
				got, err := seen(c.from, c.src, c.to, timeout)
				switch {
				case c.want == "" && err == nil:
					t.Errorf("%s: connected, server saw %s", c.name, got)
				case c.want != "" && err != nil:
					t.Errorf("%s: %v", c.name, err)
				case c.want != "" && got != netip.MustParseAddr(c.want):
					t.Errorf("%s: server saw %s, want %s", c.name, got, c.want)
				}
			}
			if !v.ipMasq && v.reachable {
				// The failure above is the missing route back, not a drop:
				// give the internet a route to the pods and it sees the
				// pod's own address.
				tp.inet.route(t, "10.244.0.0/16", "198.18.0.11")
				tp.inet.route(t, "fd00:244::/56", "2001:db8:18::11")
				for _, c := range []struct {
					to   netip.AddrPort
					want string
				}{{inet4, "10.244.1.2"}, {inet6, "fd00:244:0:1::2"}} {
					got, err := seen(tp.pod, "", c.to, ok)
					if err != nil || got != netip.MustParseAddr(c.want) {
						t.Errorf("ip-masq off, with a route back: server saw %s (%v), want the pod's %s", got, err, c.want)
					}
				}
			}
		})
	}
}
