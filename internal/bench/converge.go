package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/netns"
)

// Convergence, two ways:
//
// New node → first reply from a remote pod. The lab cannot add a node to a
// running cluster, so the last node (n3) is made new again: its agent is
// stopped, everything loom put in its namespace is removed (firewall rules
// by `loom agent -cleanup`, loom's routes, the flannel devices and with them
// every neighbour and FDB entry), and its lease is deleted from the store.
// The bench waits until every other node has withdrawn its route (udp: its
// peer table entry) to n3, so nobody knows the node any more. Then the
// clock starts, n3's agent is started, and n3 dials a TCP listener in n1's
// pod every few milliseconds (each attempt a new connection with a 10 ms
// timeout; a failed attempt is retried at once). The figure is the time
// to the first accepted connection: the agent's start-up, its lease claim
// (n3 keeps its subnet.env, so it claims the same subnet, as a rebooted
// node does), its data path, and the other nodes learning the new lease
// and programming the way back. The resolution is about 10 ms.
//
// Lease change → route on the other nodes. A synthetic lease (a /24 that no
// node holds, an on-link PublicIP for host-gw) is written to the store and
// every node's routing table is polled every 2 ms until all of them route
// that subnet; then the lease is deleted and the polling waits until none
// does. The udp backend programs no route per peer (one route for the
// whole network goes to its TUN device), so there the figure is until every
// agent's peer table (loom_udp_peers on /metrics) holds, then drops, the
// peer.

// convergePort is the TCP listener in the remote pod.
const convergePort = 7791

func newNodeSpec() spec {
	return spec{name: "converge/new-node/first-remote-pod-reply", unit: "ms", better: lowerIsBetter,
		note: "agent start on a node unknown to the cluster until n3 connects to a pod on n1"}
}

func leaseSpec(added bool, backend string) spec {
	what := "route"
	if backend == netconf.BackendUDP {
		what = "peer-table entry"
	}
	if added {
		return spec{name: "converge/lease-added/on-all-nodes", unit: "ms", better: lowerIsBetter,
			note: "lease written to the store until every node has its " + what}
	}
	return spec{name: "converge/lease-removed/on-all-nodes", unit: "ms", better: lowerIsBetter,
		note: "lease deleted from the store until no node has its " + what}
}

func (b *bencher) convergence(ctx context.Context, c *cluster, idle float64) error {
	var errs []error
	for run := range b.cfg.Runs {
		d, err := b.newNode(ctx, c)
		if err != nil {
			errs = append(errs, fmt.Errorf("new node: %w", err))
			break // the node may be half-restored; later runs would not mean much
		}
		b.rec.add(newNodeSpec(), c.backend, idle, ms(d))
		b.log.Info("convergence", "backend", c.backend, "test", "new node", "run", run+1, "ms", fmt.Sprintf("%.1f", ms(d)))
	}
	for run := range b.cfg.Runs {
		add, del, err := b.leaseRoute(ctx, c)
		if err != nil {
			errs = append(errs, fmt.Errorf("lease change: %w", err))
			break
		}
		b.rec.add(leaseSpec(true, c.backend), c.backend, idle, ms(add))
		b.rec.add(leaseSpec(false, c.backend), c.backend, idle, ms(del))
		b.log.Info("convergence", "backend", c.backend, "test", "lease change", "run", run+1,
			"added-ms", fmt.Sprintf("%.1f", ms(add)), "removed-ms", fmt.Sprintf("%.1f", ms(del)))
	}
	return errors.Join(errs...)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// newNode runs one "new node" measurement on the lab's last node and
// leaves that node running and the lab converged again.
func (b *bencher) newNode(ctx context.Context, c *cluster) (time.Duration, error) {
	l := c.lab
	node := l.Nodes[len(l.Nodes)-1].Name
	remote, err := pod(l, l.Nodes[0].Name)
	if err != nil {
		return 0, err
	}
	target := netip.AddrPortFrom(remote.IP, convergePort)
	ln, err := netns.Listen(remote.NS, "tcp", target.String())
	if err != nil {
		return 0, fmt.Errorf("listen in %s: %w", remote.Name, err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.Close()
		}
	}()

	sub, err := c.subnet(node)
	if err != nil {
		return 0, err
	}
	if err := l.StopAgent(node, syscall.SIGTERM); err != nil {
		return 0, err
	}
	if err := c.wipeNode(ctx, node); err != nil {
		return 0, err
	}
	if _, err := c.etcd.Delete(ctx, c.key(sub)); err != nil {
		return 0, fmt.Errorf("delete the lease of %s: %w", node, err)
	}
	var others []string
	for _, n := range l.Nodes {
		if n.Name != node {
			others = append(others, n.Name)
		}
	}
	view, err := c.newPeerView(ctx, others)
	if err != nil {
		return 0, err
	}
	defer view.close()
	err = poll(ctx, 30*time.Second, 5*time.Millisecond, func() (bool, error) {
		return view.none(ctx, sub, len(l.Nodes)-2)
	})
	if err != nil {
		return 0, fmt.Errorf("the other nodes did not forget %s's subnet %s: %w", node, sub, err)
	}

	start := time.Now()
	if err := l.StartAgent(node); err != nil {
		return 0, err
	}
	at, err := firstConnect(ctx, c.nodeNS(node), target, time.Minute)
	if err != nil {
		return 0, fmt.Errorf("%s to %s after its agent started: %w", node, target, err)
	}
	// Leave the lab whole for what comes next.
	if err := c.waitReady(ctx, node, time.Minute); err != nil {
		return 0, fmt.Errorf("agent of %s not ready again: %w", node, err)
	}
	if err := l.WaitConverged(ctx); err != nil {
		return 0, err
	}
	return at.Sub(start), nil
}

// wipeNode removes what loom put into node's namespace: its firewall rules,
// its routes (protocol 108) and the flannel devices (flannel.1, flannel0)
// with their neighbours and FDB entries. The agent must be stopped.
func (c *cluster) wipeNode(ctx context.Context, node string) error {
	ns := c.nodeNS(node)
	args := append([]string{"netns", "exec", ns, filepath.Join(c.lab.Opts.BinDir, "loom")}, c.lab.AgentArgs(node)...)
	args = append(args, "--cleanup")
	if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("loom agent -cleanup in %s: %w: %s", node, err, strings.TrimSpace(string(out)))
	}
	h, err := openHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("list links of %s: %w", node, err)
	}
	for _, link := range links {
		if strings.HasPrefix(link.Attrs().Name, "flannel") {
			if err := h.LinkDel(link); err != nil {
				return fmt.Errorf("delete %s in %s: %w", link.Attrs().Name, node, err)
			}
		}
	}
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: routes.Protocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return fmt.Errorf("list loom's routes in %s: %w", node, err)
	}
	for _, r := range rs {
		if err := h.RouteDel(&r); err != nil {
			return fmt.Errorf("delete route %s in %s: %w", r.Dst, node, err)
		}
	}
	return nil
}

// firstConnect dials target from inside namespace ns until a connection is
// accepted, and returns when that happened. Each attempt is a new
// connection (a new SYN, never a retransmission) with a 10 ms timeout; an
// attempt that fails at once (no route yet, an ICMP error) is retried
// after 2 ms.
func firstConnect(ctx context.Context, ns string, target netip.AddrPort, limit time.Duration) (time.Time, error) {
	var at time.Time
	err := netns.Do(ns, func() error {
		deadline := time.Now().Add(limit)
		var last error
		for {
			tried := time.Now()
			actx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
			conn, err := (&net.Dialer{}).DialContext(actx, "tcp", target.String())
			cancel()
			if err == nil {
				at = time.Now()
				conn.Close()
				return nil
			}
			last = err
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("no connection within %v: %w", limit, last)
			}
			if wait := 2*time.Millisecond - time.Since(tried); wait > 0 {
				time.Sleep(wait)
			}
		}
	})
	return at, err
}

// leaseRoute writes one synthetic lease and times until every node has it,
// then deletes it and times until no node has it.
func (b *bencher) leaseRoute(ctx context.Context, c *cluster) (added, removed time.Duration, err error) {
	taken, err := c.takenSubnets(ctx)
	if err != nil {
		return 0, 0, err
	}
	subs, err := freeSubnets(1, 24, taken)
	if err != nil {
		return 0, 0, err
	}
	sub := subs[0]
	var nodes []string
	for _, n := range c.lab.Nodes {
		nodes = append(nodes, n.Name)
	}
	view, err := c.newPeerView(ctx, nodes)
	if err != nil {
		return 0, 0, err
	}
	defer view.close()
	peers := len(nodes) - 1
	id, err := c.grant(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer func() { _ = c.revoke(context.WithoutCancel(ctx), id) }()

	start := time.Now()
	if err := c.putLeases(ctx, []lease.Lease{synthLease(c.backend, 0, 0, sub)}, id); err != nil {
		return 0, 0, err
	}
	err = poll(ctx, 30*time.Second, 2*time.Millisecond, func() (bool, error) { return view.all(ctx, sub, peers+1) })
	if err != nil {
		return 0, 0, fmt.Errorf("not every node picked up lease %s: %w", sub, err)
	}
	added = time.Since(start)

	start = time.Now()
	if _, err := c.etcd.Delete(ctx, c.key(sub)); err != nil {
		return 0, 0, fmt.Errorf("delete lease %s: %w", sub, err)
	}
	err = poll(ctx, 30*time.Second, 2*time.Millisecond, func() (bool, error) { return view.none(ctx, sub, peers) })
	if err != nil {
		return 0, 0, fmt.Errorf("not every node dropped lease %s: %w", sub, err)
	}
	return added, time.Since(start), nil
}

// peerView answers "does every node (or none) know this peer?" from the
// kernel's routing tables (vxlan, host-gw) or the agents' peer tables (udp).
type peerView struct {
	c       *cluster
	nodes   []string
	handles []*netlink.Handle // per node; nil for udp
}

func (c *cluster) newPeerView(_ context.Context, nodes []string) (*peerView, error) {
	v := &peerView{c: c, nodes: nodes}
	if c.backend == netconf.BackendUDP {
		return v, nil
	}
	for _, n := range nodes {
		h, err := openHandle(c.nodeNS(n))
		if err != nil {
			v.close()
			return nil, err
		}
		v.handles = append(v.handles, h)
	}
	return v, nil
}

func (v *peerView) close() {
	for _, h := range v.handles {
		h.Close()
	}
}

// all reports whether every node routes sub (udp: has at least peers peers).
func (v *peerView) all(ctx context.Context, sub netip.Prefix, peers int) (bool, error) {
	for i, n := range v.nodes {
		ok, err := v.knows(ctx, i, n, sub, func(count int) bool { return count >= peers })
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

// none reports whether no node routes sub (udp: has at most peers peers).
func (v *peerView) none(ctx context.Context, sub netip.Prefix, peers int) (bool, error) {
	for i, n := range v.nodes {
		ok, err := v.knows(ctx, i, n, sub, func(count int) bool { return count > peers })
		if err != nil || ok {
			return false, err
		}
	}
	return true, nil
}

func (v *peerView) knows(ctx context.Context, i int, node string, sub netip.Prefix, udpKnows func(int) bool) (bool, error) {
	if v.handles == nil {
		count, err := v.c.udpPeers(ctx, node)
		if err != nil {
			return false, err
		}
		return udpKnows(count), nil
	}
	return hasRoute(v.handles[i], sub)
}
