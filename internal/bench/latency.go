package bench

import (
	"context"
	"errors"
	"fmt"
)

func latencySpec(crr bool, path string) spec {
	kind, unit := "tcp-rr", "trans/s"
	if crr {
		kind, unit = "tcp-crr", "conn/s"
	}
	s := spec{name: "latency/" + kind + "/" + path, unit: unit, better: higherIsBetter}
	if path == "pod-pod" {
		s.baseline = "latency/" + kind + "/underlay"
	}
	return s
}

// latency measures TCP_RR and TCP_CRR style rates pod→pod across nodes
// (n1-p1 → n2-p1) and node→node on the underlay, runs interleaved.
func (b *bencher) latency(ctx context.Context, c *cluster, idle float64) error {
	paths, err := crossNodePaths(c.lab)
	if err != nil {
		return err
	}
	failed := map[string]error{}
	for _, crr := range []bool{false, true} {
		for run := range b.cfg.Runs {
			for _, p := range paths {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				s := latencySpec(crr, p.path)
				rate, err := runRR(ctx, rrRun{serverNS: p.serverNS, clientNS: p.clientNS, server: p.server, crr: crr, duration: b.d.rr})
				if err != nil {
					failed[s.name] = err
					continue
				}
				b.rec.add(s, c.backend, idle, rate)
				b.log.Info("latency", "backend", c.backend, "test", s.name, "run", run+1, s.unit, fmt.Sprintf("%.0f", rate))
			}
		}
	}
	var errs []error
	for name, err := range failed {
		errs = append(errs, fmt.Errorf("%s: %w", name, err))
	}
	return errors.Join(errs...)
}
