package firewall

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names.
const (
	metricSyncs        = "loom_firewall_syncs_total"
	metricChanges      = "loom_firewall_changes_total"
	metricLastDuration = "loom_firewall_last_sync_duration_seconds"
	metricLastSuccess  = "loom_firewall_last_success_timestamp_seconds"
	metricMode         = "loom_firewall_mode"
)

type metrics struct {
	syncs        *prometheus.CounterVec // by result: ok, error
	changes      *prometheus.CounterVec // by backend and family: writes to the kernel
	lastDuration prometheus.Gauge
	lastSuccess  prometheus.Gauge
	mode         *prometheus.GaugeVec
}

func newMetrics() *metrics {
	return &metrics{
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricSyncs,
			Help: "Firewall syncs (read the kernel, compare, write the difference), by result.",
		}, []string{"result"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricChanges,
			Help: "Syncs that had to write loom's rules (first install, new addresses, or rules changed behind loom's back), by backend and family.",
		}, []string{"backend", "family"}),
		lastDuration: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricLastDuration,
			Help: "Duration of the last firewall sync.",
		}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricLastSuccess,
			Help: "Unix time of the end of the last successful firewall sync (0: none yet).",
		}),
		mode: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: metricMode,
			Help: "The firewall backend in use (1 for the active one).",
		}, []string{"mode"}),
	}
}

func (m *metrics) register(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	var errs []error
	for _, c := range []prometheus.Collector{m.syncs, m.changes, m.lastDuration, m.lastSuccess, m.mode} {
		errs = append(errs, reg.Register(c))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("register firewall metrics: %w", err)
	}
	return nil
}
