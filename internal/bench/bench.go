// Package bench is `loom bench`: it builds its own lab for each backend,
// measures throughput, latency, convergence, control-plane scale, pod set-up
// and agent cost there, next to baselines measured in the same run, and
// tears the lab down again.
//
// Design notes.
//
// Honest figures on a shared machine: this machine has two cores and other
// work runs on it, so absolute figures drift from run to run; only a ratio
// to a baseline measured in the same lab, minutes apart, means much. Every
// measurement therefore names its baseline (Measurement.Baseline) where one
// exists, each is repeated (Config.Runs) with the runs of a measurement and
// of its baseline interleaved, so drift hits both alike, and the report
// gives median, minimum and maximum. Before each group of measurements the
// machine's idle CPU share is measured over about a second (/proc/stat); if
// it is low the group waits (up to a minute, not at all with Quick) for the
// machine to calm down, and the share is reported with the group.
//
// The lab is the one `loom lab up` builds (package lab): 3 nodes, one pod
// each, the real store, agents and loom-cni, in namespaces loom-<name>-*.
// The bench adds only namespaces of its own under the same prefix (the bare
// veth pair, the pods of the pod set-up runs), so lab.Down removes
// everything, and it always runs, also when a measurement fails or the run
// is interrupted.
//
//	loom-<name>-n1-p1 ── n1 ══ overlay ══ n2 ── loom-<name>-n2-p1     pod→pod
//	                     n1 ── underlay ── n2                         baseline
//	loom-<name>-va ══ bare veth ══ loom-<name>-vb                     baseline
//
// Measurements, per backend lab unless said otherwise:
//
//   - throughput: iperf3 TCP, 1 and 4 streams, pod→pod across nodes; the
//     same between the nodes on the underlay and over a bare veth pair.
//   - latency: TCP_RR and TCP_CRR style rates (rr.go), pod→pod and underlay.
//   - convergence (converge.go): a node joining with no data path state
//     until the first reply from a remote pod; a lease written to the store
//     until every node routes it (and removed until none does).
//   - control-plane scale, vxlan lab only (scale.go): N synthetic leases,
//     an agent's cold start until all N are programmed, its memory, a
//     restart with N peers, and 10% of the leases changing.
//   - pod set-up, first lab only (podsetup.go): loom-cni ADD and DEL next to
//     the bridge + host-local chain flannel's CNI plugin delegates to.
//   - agent cost (agentcost.go): an agent's RSS and CPU time, idle and
//     while leases churn.
package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/loomnet/loom/internal/lab"
)

// Backends is every backend the bench knows, in the order `--backend all`
// runs them.
func Backends() []string { return []string{"vxlan", "udp", "host-gw"} }

// Groups is every group of measurements, by the name Config.Groups takes,
// in the order they run in a lab.
func Groups() []string {
	return []string{"cost", "throughput", "latency", "convergence", "podsetup", "scale"}
}

// DefaultLabName is the name of the lab the bench builds.
const DefaultLabName = "bench"

// Config says what to measure and how thoroughly.
type Config struct {
	// Backends to measure, each in a lab of its own; default all.
	Backends []string
	// Quick makes every measurement short and single: for CI, which checks
	// that the bench works, not how fast anything is.
	Quick bool
	// Runs repeats each measurement; 0 means 3 (Quick: 1).
	Runs int
	// Groups names the groups of measurements to run (see Groups); empty
	// means all. Measuring the control plane alone ("convergence",
	// "scale") leaves out the throughput runs, which only an idle machine
	// measures well.
	Groups []string
	// ScalePeers overrides the synthetic peer counts of the scale group
	// (default 100, 1000 and 5000; Quick: 100).
	ScalePeers []int
	// LabName names the lab(s) built; default DefaultLabName.
	LabName string
	// BinDir holds loom and loom-cni; default the running executable's
	// directory (lab.Options.BinDir).
	BinDir string
	// Command is recorded in the report.
	Command string
	// Logger gets progress; nil means slog.Default().
	Logger *slog.Logger
}

// durations of the measurements, by mode.
type durations struct {
	iperf, iperfOmit time.Duration // per iperf3 run, and its ramp-up
	rr               time.Duration // per TCP_RR / TCP_CRR run
	idleWindow       time.Duration // agent cost window
	idleMeasure      time.Duration // machine idle share measurement
	idleWait         time.Duration // longest wait for an idle machine
	pods             int           // pod set-up samples per plugin
	scale            []int         // synthetic peers
}

func durationsFor(quick bool) durations {
	if quick {
		return durations{iperf: time.Second, rr: time.Second, idleWindow: time.Second,
			idleMeasure: 500 * time.Millisecond, pods: 20, scale: []int{100}}
	}
	return durations{iperf: 5 * time.Second, iperfOmit: time.Second, rr: 3 * time.Second, idleWindow: 10 * time.Second,
		idleMeasure: time.Second, idleWait: time.Minute, pods: 200, scale: []int{100, 1000, 5000}}
}

// idleTarget is the idle share a group waits for: on two cores, at most
// about half a core busy with something else.
const idleTarget = 0.75

// bencher is one run.
type bencher struct {
	cfg Config
	d   durations
	log *slog.Logger
	rec *recorder
}

// Run measures every backend of cfg and returns the report. It returns an
// error when a lab could not be built or a measurement failed; the report
// then still holds everything that was measured, and Report.Errors says
// what was not.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if len(cfg.Backends) == 0 {
		cfg.Backends = Backends()
	}
	for _, b := range cfg.Backends {
		if !slices.Contains(Backends(), b) {
			return nil, fmt.Errorf("backend %q: use one of %v or all", b, Backends())
		}
	}
	if cfg.Runs < 0 {
		return nil, fmt.Errorf("runs %d: use 1 or more", cfg.Runs)
	}
	for _, g := range cfg.Groups {
		if !slices.Contains(Groups(), g) {
			return nil, fmt.Errorf("group %q: use some of %v", g, Groups())
		}
	}
	for _, n := range cfg.ScalePeers {
		if n < 1 || n > 8000 {
			return nil, fmt.Errorf("scale peers %d: use 1 to 8000 (the /29s of the lab's /16)", n)
		}
	}
	if cfg.Runs == 0 {
		cfg.Runs = 3
		if cfg.Quick {
			cfg.Runs = 1
		}
	}
	if cfg.LabName == "" {
		cfg.LabName = DefaultLabName
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	b := &bencher{cfg: cfg, d: durationsFor(cfg.Quick), log: cfg.Logger, rec: newRecorder()}
	if len(cfg.ScalePeers) > 0 {
		b.d.scale = cfg.ScalePeers
	}

	rep := &Report{Machine: machineInfo()}
	rep.Machine.Command, rep.Machine.Quick, rep.Machine.Runs = cfg.Command, cfg.Quick, cfg.Runs
	rep.Machine.Started = time.Now().UTC().Truncate(time.Second)
	idle, err := idleShare(ctx, time.Second)
	if err != nil {
		return nil, err
	}
	rep.Machine.IdleShare = idle
	b.log.Info("machine", "cores", rep.Machine.Cores, "kernel", rep.Machine.Kernel, "idle", fmt.Sprintf("%.0f%%", 100*idle))

	var errs []error
	for i, backend := range cfg.Backends {
		if err := b.runLab(ctx, backend, i == 0); err != nil {
			errs = append(errs, err)
			b.rec.fail("lab", backend, err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	rep.Measurements = b.rec.measurements()
	rep.Errors = b.rec.errors()
	rep.Machine.Duration = time.Since(rep.Machine.Started).Round(time.Second).Seconds()
	if len(rep.Errors) > 0 && len(errs) == 0 {
		errs = append(errs, fmt.Errorf("%d measurement(s) failed", len(rep.Errors)))
	}
	if ctx.Err() != nil {
		errs = append(errs, ctx.Err())
	}
	return rep, errors.Join(errs...)
}

// group is one group of measurements in one lab.
type group struct {
	key  string // as in Groups
	name string
	run  func(ctx context.Context, c *cluster, idle float64) error
}

// runLab builds the lab for backend, runs every group in it and tears it
// down, whatever happens.
func (b *bencher) runLab(ctx context.Context, backend string, first bool) (err error) {
	name := b.cfg.LabName
	// Never tear down a lab the bench did not build.
	if left, _ := lab.Leftovers(name); len(left) > 0 {
		return fmt.Errorf("lab %s already exists (%s): take it down with `loom lab down --name %s`, or give the bench another --name",
			name, strings.Join(left, ", "), name)
	}
	b.log.Info("building the lab", "lab", name, "backend", backend)
	start := time.Now()
	l, err := lab.Up(ctx, lab.Options{Name: name, Nodes: 3, Pods: 1, Backend: backend, BinDir: b.cfg.BinDir}, b.log)
	defer func() {
		if derr := lab.Down(name); derr != nil {
			err = errors.Join(err, fmt.Errorf("tear down lab %s: %w", name, derr))
		}
	}()
	if err != nil {
		return fmt.Errorf("build lab %s with %s: %w", name, backend, err)
	}
	b.log.Info("lab up", "backend", backend, "took", time.Since(start).Round(time.Millisecond))
	c, err := newCluster(l)
	if err != nil {
		return err
	}
	defer c.close()

	groups := []group{
		{"cost", "agent cost", b.agentCost},
		{"throughput", "throughput", b.throughput},
		{"latency", "latency", b.latency},
		{"convergence", "convergence", b.convergence},
	}
	if first {
		groups = append(groups, group{"podsetup", "pod set-up", b.podSetup})
	}
	if backend == "vxlan" {
		// Last: it stops agents and leaves n1 with thousands of peers.
		groups = append(groups, group{"scale", "control-plane scale", b.scale})
	}
	for _, g := range groups {
		if len(b.cfg.Groups) > 0 && !slices.Contains(b.cfg.Groups, g.key) {
			continue
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		idle := b.waitIdle(ctx, g.name, backend)
		b.log.Info("measuring", "group", g.name, "backend", backend, "idle", fmt.Sprintf("%.0f%%", 100*idle))
		if err := g.run(ctx, c, idle); err != nil {
			b.log.Error("measurement failed", "group", g.name, "backend", backend, "err", err)
			b.rec.fail(g.name, backend, err)
		}
	}
	return nil
}

// waitIdle measures the machine's idle share and, while it is below
// idleTarget, waits for it (at most d.idleWait). It returns the last share.
func (b *bencher) waitIdle(ctx context.Context, what, backend string) float64 {
	deadline := time.Now().Add(b.d.idleWait)
	for {
		idle, err := idleShare(ctx, b.d.idleMeasure)
		if err != nil {
			return 0
		}
		if idle >= idleTarget || !time.Now().Before(deadline) {
			if idle < idleTarget {
				b.log.Warn("machine busy; measuring anyway", "group", what, "backend", backend, "idle", fmt.Sprintf("%.0f%%", 100*idle))
			}
			return idle
		}
		b.log.Info("waiting for an idle CPU", "group", what, "idle", fmt.Sprintf("%.0f%%", 100*idle))
	}
}

// pod returns the first pod of node.
// benchPath is one client→server path a data-path measurement runs over.
type benchPath struct {
	path, serverNS, clientNS string
	server                   netip.Addr
}

// crossNodePaths are the paths every data-path measurement compares:
// pod→pod across nodes (n1-p1 → n2-p1) and its baseline, node→node on the
// underlay (n1 → n2).
func crossNodePaths(l *lab.Lab) ([]benchPath, error) {
	p1, err := pod(l, "n1")
	if err != nil {
		return nil, err
	}
	p2, err := pod(l, "n2")
	if err != nil {
		return nil, err
	}
	n1, err := l.Node("n1")
	if err != nil {
		return nil, err
	}
	n2, err := l.Node("n2")
	if err != nil {
		return nil, err
	}
	return []benchPath{
		{"pod-pod", p2.NS, p1.NS, p2.IP},
		{"underlay", n2.NS, n1.NS, n2.Underlay.Addr()},
	}, nil
}

func pod(l *lab.Lab, node string) (lab.Pod, error) {
	n, err := l.Node(node)
	if err != nil {
		return lab.Pod{}, err
	}
	if len(n.Pods) == 0 {
		return lab.Pod{}, fmt.Errorf("node %s has no pod", node)
	}
	return n.Pods[0], nil
}
