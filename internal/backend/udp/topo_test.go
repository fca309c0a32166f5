package udp

// The kernel tests' topology, all in namespaces made by testnet; the test
// process's own namespace is never touched:
//
//	                       rt: br0 (02:00:5e:00:01:00, no address)
//	               ┌──────────────┴──────────────┐
//	               v1                            v2           (ports, in rt)
//	               │                             │
//	          n1 eth0 198.18.0.11/24        n2 eth0 198.18.0.12/24
//	          n1 flannel0 (udp Network)     n2 flannel0 (udp Network)
//	          n1 vethp1 10.244.1.1/24       n2 vethp2 10.244.2.1/24
//	                 fc00:0:0:1::1/64              fc00:0:0:2::1/64
//	               │                             │
//	          p1 eth0 10.244.1.10/24        p2 eth0 10.244.2.10/24
//	                 fc00:0:0:1::10/64             fc00:0:0:2::10/64
//
// The pod network is 10.244.0.0/16 and fc00::/48 (subnets /24 and /64);
// node nN leases 10.244.N.0/24 and fc00:0:0:N::/64 (see node in
// peers_test.go). The underlay is IPv4 only; IPv6 pod traffic rides on it.
// Pod links get the Network's MTU, as loom-cni would set it.

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/vishvananda/netlink"
)

type testNode struct {
	ns   ns.NetNS
	h    *netlink.Handle
	eth0 netlink.Link
	port netlink.Link // eth0's peer, in rt
	pod  ns.NetNS
	hp   *netlink.Handle
	nw   *Network
	logs *nstest.LogBuffer
	reg  *prometheus.Registry
	stop func()
}

type testTopo struct {
	rt    ns.NetNS
	hrt   *netlink.Handle
	nodes []*testNode
}

func netConfig(t testing.TB) netconf.Config {
	t.Helper()
	c, err := netconf.Parse([]byte(`{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00::/48", "IPv6SubnetLen": 64, "Backend": {"Type": "udp"}}`))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// topoOptions vary the topology.
type topoOptions struct {
	noOffload    bool // run the Networks without offloads
	noUDPOffload bool // without UDP GSO and GRO only
	resync       time.Duration
}

// newTopo builds the underlay, two nodes with one pod each, and runs a udp
// Network on each node, peered with the other.
func newTopo(t testing.TB, o topoOptions) *testTopo {
	t.Helper()
	if o.resync == 0 {
		o.resync = time.Second
	}
	rt, hrt := nstest.NewNode(t, "rt")
	topo := &testTopo{rt: rt, hrt: hrt}
	var ports []netlink.Link
	for i := 1; i <= 2; i++ {
		d := fmt.Sprint(i)
		n, h := nstest.NewNode(t, "n"+d)
		eth0, port := nstest.Veth(t, n, h, "eth0", rt, hrt, "v"+d)
		nstest.Addr(t, h, eth0, "198.18.0.1"+d+"/24")
		nstest.Sysctl(t, n, "net/ipv4/ip_forward", "1")
		nstest.Sysctl(t, n, "net/ipv6/conf/all/forwarding", "1")
		ports = append(ports, port)
		topo.nodes = append(topo.nodes, &testNode{ns: n, h: h, eth0: eth0, port: port})
	}
	nstest.Bridge(t, hrt, "br0", "02:00:5e:00:01:00", ports...)

	for i, tn := range topo.nodes {
		d := fmt.Sprint(i + 1)
		tn.logs = &nstest.LogBuffer{}
		tn.reg = prometheus.NewRegistry()
		nw, err := New(Config{
			Backend:      []byte(`{"Type":"udp","Port":8285}`),
			Network:      netConfig(t),
			ExtLinkIndex: tn.eth0.Attrs().Index,
			ExtMTU:       tn.eth0.Attrs().MTU,
			PublicIP:     node(i + 1).Attrs.PublicIP,
			NetNSPath:    tn.ns.Path(),
			Resync:       o.resync,
			Logger:       slog.New(slog.NewTextHandler(tn.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Metrics:      tn.reg,
			noOffload:    o.noOffload,
			noUDPOffload: o.noUDPOffload,
			workers:      2,
		})
		if err != nil {
			t.Fatal(err)
		}
		tn.nw = nw
		logs := tn.logs
		t.Cleanup(func() {
			if t.Failed() || testing.Verbose() {
				t.Logf("logs of the Network in n%s:\n%s", d, logs)
			}
		})

		// The pod, on a veth with the Network's MTU.
		pod, hp := nstest.NewNode(t, "p"+d)
		host, eth0 := nstest.Veth(t, tn.ns, tn.h, "vethp"+d, pod, hp, "eth0")
		for _, l := range []struct {
			h *netlink.Handle
			l netlink.Link
		}{{tn.h, host}, {hp, eth0}} {
			if err := l.h.LinkSetMTU(l.l, nw.MTU()); err != nil {
				t.Fatal(err)
			}
		}
		nstest.Addr(t, tn.h, host, "10.244."+d+".1/24", "fc00:0:0:"+d+"::1/64")
		nstest.Addr(t, hp, eth0, "10.244."+d+".10/24", "fc00:0:0:"+d+"::10/64")
		nstest.Route(t, hp, "0.0.0.0/0", "10.244."+d+".1", eth0, 0)
		nstest.Route(t, hp, "::/0", "fc00:0:0:"+d+"::1", eth0, 0)
		tn.pod, tn.hp = pod, hp

		nw.SetLocal(node(i + 1))
		nw.Handle(added(node(1), node(2)))
		tn.stop = runNetwork(t, nw)
	}
	for i, tn := range topo.nodes {
		nstest.Eventually(t, 10*time.Second, fmt.Sprintf("Network ready on n%d", i+1), tn.nw.Ready)
	}
	return topo
}

func added(ls ...lease.Lease) []lease.Event {
	var evs []lease.Event
	for _, l := range ls {
		evs = append(evs, lease.Event{Type: lease.Added, Lease: &l})
	}
	return evs
}

// runNetwork runs nw until the returned stop is called or the test ends;
// stop checks that Run returned nil.
func runNetwork(t testing.TB, nw *Network) (stop func()) {
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
