// Package reach tracks whether a store (etcd, or the Kubernetes API server
// in Kubernetes mode) answered its last reachability check, and exports
// that as loom_store_reachable and loom_store_last_contact_timestamp_seconds
// under the same names in both modes, so one dashboard and `loom doctor`
// read either.
package reach

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// State is what the last checks found. The zero value is ready to use:
// nothing checked yet.
type State struct {
	mu      sync.Mutex // guards the fields below
	known   bool       // at least one check done
	ok      bool
	last    time.Time // last successful check
	lostAt  time.Time // when ok last turned false
	lastErr error     // of the last failed check, nil after a success
}

// Set records a check and returns what changed: lost is true on the first
// failure after a success (or at the start), back is the length of the
// outage that just ended (0 if none ended). Callers log each once.
func (s *State) Set(now time.Time, err error) (lost bool, back time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	wasKnown, wasOK := s.known, s.ok
	s.known = true
	if err == nil {
		s.ok, s.last, s.lastErr = true, now, nil
		if wasKnown && !wasOK {
			back = now.Sub(s.lostAt)
		}
		return false, back
	}
	s.ok, s.lastErr = false, err
	if !wasKnown || wasOK {
		s.lostAt = now
		return true, 0
	}
	return false, 0
}

// Reachable reports whether the last check succeeded, and the error of the
// last failed one (nil before any check and after a success).
func (s *State) Reachable() (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ok, s.lastErr
}

// Gauges are the two gauges read from s; what names the store and how it
// is checked, for their help texts.
func (s *State) Gauges(what string) []prometheus.Collector {
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "loom_store_reachable",
			Help: "1 while the store (" + what + ") answers, 0 while it does not; -1 before the first check. The data path does not depend on it.",
		}, func() float64 {
			s.mu.Lock()
			defer s.mu.Unlock()
			switch {
			case !s.known:
				return -1
			case s.ok:
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "loom_store_last_contact_timestamp_seconds",
			Help: "Unix time of the last successful check of the store (" + what + "); 0 before the first.",
		}, func() float64 {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.last.IsZero() {
				return 0
			}
			return float64(s.last.UnixNano()) / 1e9
		}),
	}
}
