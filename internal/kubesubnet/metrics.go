package kubesubnet

// Metrics carry the etcd registry's names where they mean the same, so one
// dashboard and `loom doctor` read both modes: in Kubernetes mode the store
// is the API server (kubeclient reports whether it answers).

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/loomnet/loom/internal/registry"
)

// skippedCounter is loom_leases_skipped_total, the etcd registry's name and
// reasons, with every reason present from the start.
func skippedCounter() *prometheus.CounterVec {
	v := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "loom_leases_skipped_total",
		Help: "Peer leases (here: peer Nodes) ignored as unusable or hostile (never programmed into the kernel), by reason.",
	}, []string{"reason"})
	for _, r := range []string{registry.SkipUndecodable, registry.SkipOutsideNetwork, registry.SkipOverlap, registry.SkipBadSubnet, registry.SkipBadPublicIP} {
		v.WithLabelValues(r)
	}
	return v
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
