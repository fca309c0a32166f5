package registry

// Store reachability and lease metrics.
//
// A store that goes away must not touch the data path: routes, neighbours
// and FDB entries stay as they are, the held lease is kept (its etcd lease
// runs for the TTL, 24 h by default, and keep-alive resumes when the store
// is back), and every call is retried with backoff. What an operator needs
// then is to know it: the monitor reads the store's revision every
// Config.MonitorEvery, sets loom_store_reachable, and logs each change once
// (Warn when the store is lost, Info with the outage's length when it is
// back) instead of one line per failed call.

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/lease"
)

// Reasons a peer lease is skipped, the reason label of
// loom_leases_skipped_total.
const (
	SkipUndecodable    = "undecodable"     // key or value does not decode
	SkipOutsideNetwork = "outside-network" // subnet not inside Network (or a disabled family)
	SkipOverlap        = "overlap"         // subnet overlaps a lease already accepted
	SkipBadSubnet      = "bad-subnet"      // inside Network, but not a SubnetLen subnet in SubnetMin..SubnetMax
	SkipBadPublicIP    = "bad-public-ip"   // no public IP, or 0.0.0.0, loopback, multicast, inside the pod network
)

// metrics are the registry's collectors. They exist whether or not
// Config.Metrics is set, so code never checks for nil.
type metrics struct {
	reach      []prometheus.Collector // loom_store_reachable, loom_store_last_contact_timestamp_seconds
	expiresIn  prometheus.GaugeFunc
	reacquired *prometheus.CounterVec
	skipped    *prometheus.CounterVec
}

func (r *Registry) newMetrics() *metrics {
	m := &metrics{
		reach: r.reach.Gauges("etcd, a read of its revision every 5 s by default"),
		expiresIn: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "loom_lease_expires_in_seconds",
			Help: "Seconds until the held subnet lease's etcd lease runs out unless renewed (keep-alive renews it at a third of the TTL); +Inf for a reservation; 0 while no lease is held.",
		}, func() float64 {
			l, ok := r.heldLease()
			switch {
			case !ok:
				return 0
			case l.Reserved():
				return math.Inf(1)
			}
			return max(time.Until(l.Expiration).Seconds(), 0)
		}),
		reacquired: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loom_lease_reacquired_total",
			Help: "Subnet leases taken again after the held one was lost (deleted, revoked, expired, store data lost), by whether the subnet stayed the same.",
		}, []string{"subnet"}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "loom_leases_skipped_total",
			Help: "Peer leases ignored as unusable or hostile (never programmed into the kernel), by reason; counted each time one is read.",
		}, []string{"reason"}),
	}
	for _, v := range []string{"same", "changed"} {
		m.reacquired.WithLabelValues(v)
	}
	for _, v := range []string{SkipUndecodable, SkipOutsideNetwork, SkipOverlap, SkipBadSubnet, SkipBadPublicIP} {
		m.skipped.WithLabelValues(v)
	}
	return m
}

func (m *metrics) collectors() []prometheus.Collector {
	return append(m.reach, m.expiresIn, m.reacquired, m.skipped)
}

// register adds the collectors to reg.
func (m *metrics) register(reg prometheus.Registerer) error {
	for _, c := range m.collectors() {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register registry metrics: %w", err)
		}
	}
	return nil
}

// Reachable reports whether the last reachability check of the store
// succeeded, and the error of the last failed one.
func (r *Registry) Reachable() (bool, error) { return r.reach.Reachable() }

// monitor checks the store every r.monitorEvery until ctx is done.
func (r *Registry) monitor(ctx context.Context) {
	t := time.NewTicker(r.monitorEvery)
	defer t.Stop()
	for {
		r.checkReachable(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (r *Registry) checkReachable(ctx context.Context) {
	// r.cli, not r.kv: a test counting the requests of List must not see
	// the monitor's.
	rctx, cancel := r.bounded(ctx)
	_, err := r.cli.Get(rctx, r.configKey, clientv3.WithCountOnly())
	cancel()
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		err = r.explain(ctx, err)
	}
	lost, back := r.reach.Set(time.Now(), err)
	switch {
	case lost:
		r.log.Warn("store unreachable: keeping the data path and the subnet lease as they are, retrying with backoff",
			"endpoints", strings.Join(r.cfg.Endpoints, ","), "err", err)
	case back > 0:
		r.log.Info("store reachable again", "endpoints", strings.Join(r.cfg.Endpoints, ","), "after", back.Round(time.Second))
	}
}

// setHeld records the lease Keep holds, for loom_lease_expires_in_seconds.
func (r *Registry) setHeld(h *Held) {
	r.heldMu.Lock()
	defer r.heldMu.Unlock()
	r.held = h
}

func (r *Registry) heldLease() (lease.Lease, bool) {
	r.heldMu.Lock()
	h := r.held
	r.heldMu.Unlock()
	if h == nil {
		return lease.Lease{}, false
	}
	select {
	case <-h.Done():
		return lease.Lease{}, false
	default:
	}
	return h.Lease(), true
}
