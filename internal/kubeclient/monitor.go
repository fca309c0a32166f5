package kubeclient

// Metrics carry the etcd registry's names where they mean the same, so one
// dashboard and `loom doctor` read both modes: in Kubernetes mode the store
// is the API server.

import (
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// reachability is what the monitor last found.
type reachability struct {
	mu     sync.Mutex // guards the fields below
	known  bool       // at least one check done
	ok     bool
	last   time.Time // last successful check
	lostAt time.Time // when ok last turned false
}

func (s *reachability) get() (ok, known bool, last time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ok, s.known, s.last
}

// set records a check and says whether it lost the apiserver (the first
// failure after a success, or at the start) or how long an outage that
// just ended lasted.
func (s *reachability) set(now time.Time, err error) (lost bool, back time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	wasKnown, wasOK := s.known, s.ok
	s.known = true
	if err == nil {
		s.ok, s.last = true, now
		if wasKnown && !wasOK {
			back = now.Sub(s.lostAt)
		}
		return false, back
	}
	s.ok = false
	if !wasKnown || wasOK {
		s.lostAt = now
		return true, 0
	}
	return false, 0
}

func (c *Client) registerMetrics(reg prometheus.Registerer) error {
	for _, col := range []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "loom_store_reachable",
			Help: "1 while the store (here the Kubernetes API server, its /readyz) answers, 0 while it does not; -1 before the first check. The data path does not depend on it.",
		}, func() float64 {
			ok, known, _ := c.reach.get()
			switch {
			case !known:
				return -1
			case ok:
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "loom_store_last_contact_timestamp_seconds",
			Help: "Unix time of the last successful check of the store (here the Kubernetes API server); 0 before the first.",
		}, func() float64 {
			_, _, last := c.reach.get()
			if last.IsZero() {
				return 0
			}
			return float64(last.UnixNano()) / 1e9
		}),
	} {
		if err := reg.Register(col); err != nil {
			return fmt.Errorf("register Kubernetes client metrics: %w", err)
		}
	}
	return nil
}

// monitor checks the apiserver every MonitorEvery until Close, and logs
// each change once: a lost apiserver touches neither the data path nor the
// node's subnet (informers keep their caches and re-list when it is back).
func (c *Client) monitor() {
	t := time.NewTicker(c.cfg.MonitorEvery)
	defer t.Stop()
	for {
		err := c.readyz(c.ctx)
		if c.ctx.Err() != nil {
			return
		}
		lost, back := c.reach.set(time.Now(), err)
		switch {
		case lost:
			c.log.Warn("Kubernetes API server unreachable: keeping the data path and the subnet as they are, retrying", "server", c.server, "err", err)
		case back > 0:
			c.log.Info("Kubernetes API server reachable again", "server", c.server, "after", back.Round(time.Second))
		}
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
	}
}
