package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
)

// Control-plane scale (vxlan lab): N synthetic peers written straight to
// the store, and one agent, n1's, doing the work. Every agent is stopped
// first and only n1's is started again, so the machine's two cores are not
// shared with two more agents programming the same N peers; the network
// config is switched to /29 node subnets (scaleNetConf). Per run:
//
//  1. Cold start: with n1's agent stopped, the N leases are written (one
//     etcd lease holds them all) and flannel.1 is deleted (and with it every
//     neighbour, FDB entry and route through it); then the clock starts and
//     the agent is started. Done when flannel.1 carries loom's route to each
//     of the N subnets (routes come last, after the neighbours and FDB
//     entries) and a neighbour and an FDB entry for each, polled through
//     netlink. One second later the agent's VmRSS is read (and VmHWM, its
//     peak).
//  2. Restart: the agent is stopped and started again with everything in
//     place; the figure is the time to its /readyz (which turns 200 after
//     the first full sync with every listed peer), and the churn is what
//     its reconcilers changed by then (loom_reconcile_changes_total for
//     routes, neighbours and FDB entries: it should be 0).
//  3. Update: every 10th lease gets a new VtepMAC and PublicIP, written in
//     transactions of 100. The figure is the time from the first write until
//     every changed peer's neighbour and FDB entry show the new MAC and
//     address and its old FDB entry is gone (waiting at most 3 s for that
//     once the new ones are there); the old FDB entries still present then
//     are reported as stale.
//  4. The etcd lease is revoked, which deletes all N keys, and the bench
//     waits until the agent has removed all N routes.
//
// The PublicIPs are addresses nothing uses, and no packet is ever sent to
// these peers.

const vxlanDev = "flannel.1"

func scaleSpec(n int, what string) spec {
	name := fmt.Sprintf("scale/%d-peers/%s", n, what)
	switch what {
	case "cold-start-programmed":
		return spec{name: name, unit: "ms", better: lowerIsBetter, note: "agent start until every peer's route, neighbour and FDB entry is in the kernel"}
	case "agent-rss":
		return spec{name: name, unit: "MiB", better: lowerIsBetter, note: "VmRSS 1 s after all peers were programmed"}
	case "agent-rss-peak":
		return spec{name: name, unit: "MiB", better: lowerIsBetter, note: "VmHWM after all peers were programmed"}
	case "restart-ready":
		return spec{name: name, unit: "ms", better: lowerIsBetter, note: "agent restart with every peer programmed until /readyz"}
	case "restart-churn":
		return spec{name: name, unit: "objects", better: lowerIsBetter, note: "routes, neighbours and FDB entries changed by the restart"}
	case "update-10pct-reflected":
		return spec{name: name, unit: "ms", better: lowerIsBetter, note: "10% of the leases get a new VtepMAC and PublicIP until the kernel shows all of it"}
	case "update-10pct-stale-fdb":
		return spec{name: name, unit: "entries", better: lowerIsBetter, note: "old FDB entries of updated peers left behind"}
	}
	return spec{name: name}
}

// scaleNetConf is the network config of the scale phase: the lab's
// 10.244.0.0/16, split into /29s. flannel's default /24 gives a /16 only
// 256 node subnets; 5,000 nodes need /29s (8,192 of them). What an agent
// does per peer (one route, neighbour and FDB entry) does not depend on the
// length.
const scaleNetConf = `{"Network": "10.244.0.0/16", "SubnetLen": 29, "Backend": {"Type": "vxlan"}}`

func (b *bencher) scale(ctx context.Context, c *cluster, idle float64) error {
	if c.backend != netconf.BackendVXLAN {
		return nil
	}
	l := c.lab
	for _, n := range l.Nodes {
		if err := l.StopAgent(n.Name, syscall.SIGTERM); err != nil {
			return err
		}
	}
	// n1's agent takes the new config at its next start (and with it a /29
	// of its own); n2's and n3's stay stopped.
	if _, err := c.etcd.Put(ctx, storePrefix+"/config", scaleNetConf); err != nil {
		return fmt.Errorf("write the scale network config: %w", err)
	}
	var errs []error
	for _, n := range b.d.scale {
		for run := range b.cfg.Runs {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err := b.scaleRun(ctx, c, idle, n); err != nil {
				errs = append(errs, fmt.Errorf("%d peers, run %d: %w", n, run+1, err))
				break
			}
		}
	}
	return errors.Join(errs...)
}

// synthSet is what N synthetic vxlan peers put on a node: one route per
// subnet, one neighbour per gateway (the subnet's first address), one FDB
// entry per VtepMAC.
type synthSet struct {
	subnets map[netip.Prefix]bool
	gws     map[netip.Addr]bool
	macs    map[string]bool
}

func newSynthSet(leases []lease.Lease) synthSet {
	s := synthSet{subnets: map[netip.Prefix]bool{}, gws: map[netip.Addr]bool{}, macs: map[string]bool{}}
	for _, l := range leases {
		s.subnets[l.Subnet] = true
		s.gws[l.Subnet.Addr()] = true
		s.macs[vtepMAC(l)] = true
	}
	return s
}

// routes counts the set's subnets that dev routes (loom's routes only).
func (s synthSet) routes(h *netlink.Handle, dev string) (int, error) {
	link, err := h.LinkByName(dev)
	if err != nil {
		if errors.As(err, new(netlink.LinkNotFoundError)) {
			return 0, nil
		}
		return 0, fmt.Errorf("find %s: %w", dev, err)
	}
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: link.Attrs().Index, Protocol: routes.Protocol},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return 0, fmt.Errorf("list routes via %s: %w", dev, err)
	}
	n := 0
	for _, r := range rs {
		if r.Dst == nil {
			continue
		}
		a, ok := netip.AddrFromSlice(r.Dst.IP)
		ones, _ := r.Dst.Mask.Size()
		if ok && s.subnets[netip.PrefixFrom(a.Unmap(), ones)] {
			n++
		}
	}
	return n, nil
}

// programmed reports whether st holds a neighbour and an FDB entry for
// every member of the set.
func (s synthSet) programmed(st vxlanState) bool {
	n, f := 0, 0
	for ip := range st.neighs {
		if s.gws[ip] {
			n++
		}
	}
	for mac := range st.fdb {
		if s.macs[mac] {
			f++
		}
	}
	return n == len(s.gws) && f == len(s.macs)
}

func (b *bencher) scaleRun(ctx context.Context, c *cluster, idle float64, n int) error {
	l := c.lab
	node := l.Nodes[0]

	taken, err := c.takenSubnets(ctx)
	if err != nil {
		return err
	}
	subs, err := freeSubnets(n, 29, taken)
	if err != nil {
		return err
	}
	leases := make([]lease.Lease, n)
	for i := range leases {
		leases[i] = synthLease(netconf.BackendVXLAN, i, 0, subs[i])
	}
	set := newSynthSet(leases)
	h, err := openHandle(node.NS)
	if err != nil {
		return err
	}
	defer h.Close()

	// 1. Cold start.
	if err := l.StopAgent(node.Name, syscall.SIGTERM); err != nil {
		return err
	}
	id, err := c.grant(ctx)
	if err != nil {
		return err
	}
	revoked := false
	defer func() {
		if !revoked {
			_ = c.revoke(context.WithoutCancel(ctx), id)
		}
	}()
	wstart := time.Now()
	if err := c.putLeases(ctx, leases, id); err != nil {
		return err
	}
	b.log.Info("scale: wrote synthetic leases", "peers", n, "took", time.Since(wstart).Round(time.Millisecond))
	if link, err := h.LinkByName(vxlanDev); err == nil {
		if err := h.LinkDel(link); err != nil {
			return fmt.Errorf("delete %s in %s: %w", vxlanDev, node.Name, err)
		}
	}
	start := time.Now()
	if err := l.StartAgent(node.Name); err != nil {
		return err
	}
	interval := 10 * time.Millisecond
	if n >= 1000 {
		interval = 20 * time.Millisecond // a dump of thousands of routes is not free
	}
	err = poll(ctx, 3*time.Minute, interval, func() (bool, error) {
		r, err := set.routes(h, vxlanDev)
		if err != nil || r < n {
			return false, err
		}
		st, err := readVXLAN(h, vxlanDev)
		return err == nil && set.programmed(st), err
	})
	if err != nil {
		return fmt.Errorf("cold start: %w", err)
	}
	cold := time.Since(start)
	b.rec.add(scaleSpec(n, "cold-start-programmed"), c.backend, idle, ms(cold))
	if err := sleep(ctx, time.Second); err != nil {
		return err
	}
	pid, err := agentPID(node.NS)
	if err != nil {
		return err
	}
	ps, err := readProc(pid)
	if err != nil {
		return err
	}
	b.rec.add(scaleSpec(n, "agent-rss"), c.backend, idle, float64(ps.rssKiB)/1024)
	b.rec.add(scaleSpec(n, "agent-rss-peak"), c.backend, idle, float64(ps.hwmKiB)/1024)

	// 2. Restart with everything in place.
	if err := c.waitReady(ctx, node.Name, time.Minute); err != nil {
		return err
	}
	if err := l.StopAgent(node.Name, syscall.SIGTERM); err != nil {
		return err
	}
	start = time.Now()
	if err := l.StartAgent(node.Name); err != nil {
		return err
	}
	if err := c.waitReady(ctx, node.Name, time.Minute); err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	restart := time.Since(start)
	if err := sleep(ctx, 500*time.Millisecond); err != nil { // let a late route sync show in the counters
		return err
	}
	churn, err := c.reconcileChanges(ctx, node.Name)
	if err != nil {
		return err
	}
	b.rec.add(scaleSpec(n, "restart-ready"), c.backend, idle, ms(restart))
	b.rec.add(scaleSpec(n, "restart-churn"), c.backend, idle, churn)

	// 3. Update 10% of the leases.
	var updated, old []lease.Lease
	for i := 0; i < n; i += 10 {
		old = append(old, leases[i])
		updated = append(updated, synthLease(netconf.BackendVXLAN, i, 1, subs[i]))
	}
	start = time.Now()
	if err := c.putLeases(ctx, updated, id); err != nil {
		return err
	}
	var newThere time.Duration
	var stale int
	err = poll(ctx, 3*time.Minute, interval, func() (bool, error) {
		st, err := readVXLAN(h, vxlanDev)
		if err != nil {
			return false, err
		}
		missing, left := updateState(st, old, updated)
		if missing > 0 {
			return false, nil
		}
		if newThere == 0 {
			newThere = time.Since(start)
		}
		stale = left
		return left == 0 || time.Since(start) > newThere+3*time.Second, nil
	})
	if err != nil {
		return fmt.Errorf("update: %w", err)
	}
	reflected := time.Since(start)
	if stale > 0 {
		reflected = newThere
	}
	b.rec.add(scaleSpec(n, "update-10pct-reflected"), c.backend, idle, ms(reflected))
	b.rec.add(scaleSpec(n, "update-10pct-stale-fdb"), c.backend, idle, float64(stale))
	b.log.Info("scale", "peers", n, "cold-start", cold.Round(time.Millisecond), "rss-MiB", ps.rssKiB/1024,
		"restart", restart.Round(time.Millisecond), "churn", churn, "update", reflected.Round(time.Millisecond), "stale", stale)

	// 4. Remove them all.
	start = time.Now()
	revoked = true
	if err := c.revoke(ctx, id); err != nil {
		return err
	}
	err = poll(ctx, 3*time.Minute, interval, func() (bool, error) {
		r, err := set.routes(h, vxlanDev)
		return r == 0, err
	})
	if err != nil {
		return fmt.Errorf("removing the synthetic peers: %w", err)
	}
	b.log.Info("scale: synthetic peers removed", "peers", n, "took", time.Since(start).Round(time.Millisecond))
	return nil
}

// updateState compares the kernel with an update of old to updated (same
// order, same subnets): how many updated peers do not show their new
// neighbour and FDB entry yet, and how many old FDB entries are still there.
func updateState(st vxlanState, old, updated []lease.Lease) (missing, stale int) {
	for i, u := range updated {
		mac := vtepMAC(u)
		if st.fdb[mac] != u.Attrs.PublicIP || st.neighs[u.Subnet.Addr()] != mac {
			missing++
		}
		if _, ok := st.fdb[vtepMAC(old[i])]; ok {
			stale++
		}
	}
	return missing, stale
}

// reconcileChanges sums what node's route, neighbour and FDB reconcilers
// created, updated and deleted since the agent started.
func (c *cluster) reconcileChanges(ctx context.Context, node string) (float64, error) {
	m, err := c.metrics(ctx, node)
	if err != nil {
		return 0, err
	}
	var sum float64
	found := false
	for k, v := range m {
		if !strings.HasPrefix(k, "loom_reconcile_changes_total{") {
			continue
		}
		for _, obj := range []string{`object="route"`, `object="neigh"`, `object="fdb"`} {
			if strings.Contains(k, obj) {
				sum += v
				found = true
			}
		}
	}
	if !found {
		return 0, fmt.Errorf("%s exports no loom_reconcile_changes_total for routes, neighbours or FDB entries", node)
	}
	return sum, nil
}
