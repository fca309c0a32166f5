package reach

import (
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// One outage as an operator sees it: -1 before any check, lost once (one
// log line, not one per failed check), back with the outage's length, and
// the last contact time on /metrics.
func TestOutage(t *testing.T) {
	var s State
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(s.Gauges("test")...)
	gauge := func(name string) float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				return mf.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatalf("no %s", name)
		return 0
	}
	if got := gauge("loom_store_reachable"); got != -1 {
		t.Errorf("reachable before any check = %v, want -1", got)
	}
	if ok, err := s.Reachable(); ok || err != nil {
		t.Errorf("Reachable before any check = %v, %v; want false, nil", ok, err)
	}

	t0 := time.Unix(1000, 0)
	if lost, back := s.Set(t0, nil); lost || back != 0 {
		t.Errorf("first success: lost %v back %v", lost, back)
	}
	if got := gauge("loom_store_last_contact_timestamp_seconds"); got != 1000 {
		t.Errorf("last contact = %v, want 1000", got)
	}
	down := errors.New("connection refused")
	if lost, _ := s.Set(t0.Add(time.Second), down); !lost {
		t.Error("first failure not reported as lost")
	}
	if lost, _ := s.Set(t0.Add(2*time.Second), down); lost {
		t.Error("second failure reported as lost again")
	}
	if ok, err := s.Reachable(); ok || !errors.Is(err, down) {
		t.Errorf("Reachable during the outage = %v, %v; want false, %v", ok, err, down)
	}
	if got := gauge("loom_store_reachable"); got != 0 {
		t.Errorf("reachable during the outage = %v, want 0", got)
	}
	if _, back := s.Set(t0.Add(5*time.Second), nil); back != 4*time.Second {
		t.Errorf("outage length = %v, want 4s", back)
	}
	if ok, err := s.Reachable(); !ok || err != nil {
		t.Errorf("Reachable after the outage = %v, %v; want true, nil", ok, err)
	}
	if mfs, err := reg.Gather(); err != nil || len(mfs) != 2 {
		t.Errorf("%d metric families (%v), want 2", len(mfs), err)
	}
}
