package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/loomnet/loom/internal/lease"
)

// Agent cost: n1's agent's resident memory (VmRSS) and CPU time (user +
// system, from /proc/PID/stat) per minute of wall time, over a window of
// its life, first idle (the lab converged, nothing changing), then while
// leases churn: 20 synthetic peers, one of which gets a new PublicIP (and,
// with vxlan, a new VtepMAC) every 50 ms, so 20 lease updates a second, each
// one a watch event, a peer update and a partial sync on every agent.

// churnPeers and churnEvery shape the churn.
const (
	churnPeers = 20
	churnEvery = 50 * time.Millisecond
)

func agentSpec(churn bool, what string) spec {
	state := "idle"
	if churn {
		state = "churn"
	}
	switch what {
	case "cpu":
		return spec{name: "agent/" + state + "/cpu", unit: "cpu-s/min", better: lowerIsBetter,
			note: "CPU seconds the agent used per minute"}
	default:
		return spec{name: "agent/" + state + "/rss", unit: "MiB", better: lowerIsBetter, note: "VmRSS at the end of the window"}
	}
}

func (b *bencher) agentCost(ctx context.Context, c *cluster, idle float64) error {
	node := c.lab.Nodes[0]
	// The lab has just converged: let the start-up work finish.
	if err := sleep(ctx, b.d.idleWindow/4); err != nil {
		return err
	}
	for range b.cfg.Runs {
		cpu, rss, err := b.costWindow(ctx, node.NS, nil)
		if err != nil {
			return fmt.Errorf("idle: %w", err)
		}
		b.rec.add(agentSpec(false, "cpu"), c.backend, idle, cpu)
		b.rec.add(agentSpec(false, "rss"), c.backend, idle, rss)
		b.log.Info("agent cost", "backend", c.backend, "state", "idle", "cpu-s/min", fmt.Sprintf("%.3f", cpu), "rss-MiB", fmt.Sprintf("%.1f", rss))
	}

	taken, err := c.takenSubnets(ctx)
	if err != nil {
		return err
	}
	subs, err := freeSubnets(churnPeers, 24, taken)
	if err != nil {
		return err
	}
	peers := make([]lease.Lease, churnPeers)
	for i := range peers {
		peers[i] = synthLease(c.backend, i, 0, subs[i])
	}
	id, err := c.grant(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = c.revoke(context.WithoutCancel(ctx), id) }()
	if err := c.putLeases(ctx, peers, id); err != nil {
		return err
	}
	if err := sleep(ctx, time.Second); err != nil { // let the agents program them
		return err
	}
	gen := make([]int, churnPeers)
	k := 0
	churn := func() error {
		i := k % churnPeers
		k++
		gen[i] ^= 1
		return c.putLeases(ctx, []lease.Lease{synthLease(c.backend, i, gen[i], subs[i])}, id)
	}
	for range b.cfg.Runs {
		cpu, rss, err := b.costWindow(ctx, node.NS, churn)
		if err != nil {
			return fmt.Errorf("churn: %w", err)
		}
		b.rec.add(agentSpec(true, "cpu"), c.backend, idle, cpu)
		b.rec.add(agentSpec(true, "rss"), c.backend, idle, rss)
		b.log.Info("agent cost", "backend", c.backend, "state", "churn", "updates", k, "cpu-s/min", fmt.Sprintf("%.3f", cpu), "rss-MiB", fmt.Sprintf("%.1f", rss))
	}
	return nil
}

// costWindow watches the agent in ns for one window, calling step every
// churnEvery when it is set, and returns CPU seconds per minute and the
// final RSS in MiB.
func (b *bencher) costWindow(ctx context.Context, ns string, step func() error) (cpuPerMin, rssMiB float64, err error) {
	pid, err := agentPID(ns)
	if err != nil {
		return 0, 0, err
	}
	p0, err := readProc(pid)
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	end := start.Add(b.d.idleWindow)
	for time.Now().Before(end) {
		if step == nil {
			if err := sleep(ctx, time.Until(end)); err != nil {
				return 0, 0, err
			}
			continue
		}
		if err := step(); err != nil {
			return 0, 0, err
		}
		if err := sleep(ctx, churnEvery); err != nil {
			return 0, 0, err
		}
	}
	p1, err := readProc(pid)
	if err != nil {
		return 0, 0, err
	}
	wall := time.Since(start)
	return (p1.cpu - p0.cpu).Seconds() / wall.Minutes(), float64(p1.rssKiB) / 1024, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
