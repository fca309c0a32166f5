package reconcile

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metric names. Every reconciler exports the same families, told apart by
// the constant label "object" (route, neigh, fdb, link).
const (
	metricSyncs        = "loom_reconcile_syncs_total"
	metricErrors       = "loom_reconcile_errors_total"
	metricChanges      = "loom_reconcile_changes_total"
	metricOwned        = "loom_reconcile_owned"
	metricConflicts    = "loom_reconcile_conflicts"
	metricLastDuration = "loom_reconcile_last_duration_seconds"
	metricLastFullSync = "loom_reconcile_last_full_sync_timestamp_seconds"
)

// Collector returns a prometheus.Collector that reads Stats at each scrape.
// Register it on the agent's registry (never the global one).
func (r *Reconciler[K, V]) Collector() prometheus.Collector {
	l := prometheus.Labels{"object": r.name}
	return &collector{
		stats: r.Stats,
		syncs: prometheus.NewDesc(metricSyncs,
			"Syncs of kernel objects against the desired state, by scope (full or partial).", []string{"scope"}, l),
		errors: prometheus.NewDesc(metricErrors,
			"Syncs that failed; each forces a full sync next.", nil, l),
		changes: prometheus.NewDesc(metricChanges,
			"Kernel objects changed by syncs, by operation (create, update, delete).", []string{"op"}, l),
		owned: prometheus.NewDesc(metricOwned,
			"Kernel objects loom owns after the last sync.", nil, l),
		conflicts: prometheus.NewDesc(metricConflicts,
			"Keys loom wants that are held by objects loom does not own.", nil, l),
		lastDuration: prometheus.NewDesc(metricLastDuration,
			"Duration of the last sync.", nil, l),
		lastFullSync: prometheus.NewDesc(metricLastFullSync,
			"Unix time of the end of the last successful full sync (0: none yet).", nil, l),
	}
}

type collector struct {
	stats                                                                func() Stats
	syncs, errors, changes, owned, conflicts, lastDuration, lastFullSync *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.syncs, c.errors, c.changes, c.owned, c.conflicts, c.lastDuration, c.lastFullSync} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v)
	}
	counter(c.syncs, s.FullSyncs, "full")
	counter(c.syncs, s.PartialSyncs, "partial")
	counter(c.errors, s.Errors)
	counter(c.changes, s.Created, "create")
	counter(c.changes, s.Updated, "update")
	counter(c.changes, s.Deleted, "delete")
	gauge(c.owned, float64(s.Owned))
	gauge(c.conflicts, float64(s.Conflicts))
	gauge(c.lastDuration, s.LastDuration.Seconds())
	last := 0.0
	if !s.LastFullSync.IsZero() {
		last = float64(s.LastFullSync.UnixNano()) / 1e9
	}
	gauge(c.lastFullSync, last)
}
