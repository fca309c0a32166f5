package kubeclient

// Metrics carry the etcd registry's names where they mean the same, so one
// dashboard and `loom doctor` read both modes: in Kubernetes mode the store
// is the API server.

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func (c *Client) registerMetrics(reg prometheus.Registerer) error {
	for _, col := range c.reach.Gauges("here the Kubernetes API server: its /readyz") {
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
		lost, back := c.reach.Set(time.Now(), err)
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
