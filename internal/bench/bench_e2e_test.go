package bench

// End-to-end test of the bench engine: a --quick run over every backend in
// real labs (underlay 198.18.0.0/24, pods 10.244.0.0/16, the bare veth pair
// 198.19.255.0/30, synthetic peers in 10.244.0.0/16 with public IPs in
// 198.19.0.0/16 and 198.18.0.100-249), all in namespaces loom-btest-*.
// It asserts that the run completes, that the report is well-formed and
// self-consistent, and that the labs are gone afterwards. It asserts
// nothing about speed: on a shared two-core machine that would be noise.

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/lab"
	"github.com/loomnet/loom/internal/testnet"
)

var binDir string

func TestMain(m *testing.M) {
	os.Exit(testnet.MainWithBinaries(m, func(dir string) { binDir = dir }))
}

// requireTools skips (fails under CI=true) when a Debian package the bench
// needs is missing; scripts/deps.sh installs them.
func requireTools(t *testing.T) {
	t.Helper()
	var missing []string
	if _, err := exec.LookPath("iperf3"); err != nil {
		missing = append(missing, "iperf3")
	}
	if _, err := os.Stat(filepath.Join(bridgePluginDir, "bridge")); err != nil {
		missing = append(missing, "containernetworking-plugins")
	}
	if len(missing) == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("missing %v: scripts/deps.sh installs them", missing)
	}
	t.Skipf("missing %v (scripts/deps.sh installs them)", missing)
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func TestQuickRunReport(t *testing.T) {
	testnet.RequireRoot(t)
	requireTools(t)
	const name = "btest"
	_ = lab.Down(name) // a crashed earlier run
	t.Cleanup(func() {
		if left, err := lab.Leftovers(name); err != nil || len(left) > 0 {
			t.Errorf("the bench left %v (%v)", left, err)
			_ = lab.Down(name)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	rep, err := Run(ctx, Config{
		Quick:   true,
		LabName: name,
		BinDir:  binDir,
		Logger:  slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	t.Logf("quick run over %v took %v", Backends(), time.Since(start).Round(time.Second))
	if rep == nil {
		t.Fatalf("no report: %v", err)
	}
	var table bytes.Buffer
	if werr := rep.WriteTable(&table); werr != nil {
		t.Fatal(werr)
	}
	t.Logf("report:\n%s", table.String())
	if err != nil {
		t.Fatalf("run failed: %v", err)
	}

	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	checkReportJSON(t, js.Bytes())

	// Every kind of measurement is there, for every backend.
	have := map[string]bool{}
	for _, m := range rep.Measurements {
		have[m.Backend+" "+m.Name] = true
	}
	for _, b := range Backends() {
		for _, n := range []string{
			"throughput/tcp-1stream/pod-pod", "throughput/tcp-4stream/pod-pod", "throughput/tcp-1stream/underlay",
			"throughput/tcp-1stream/veth", "latency/tcp-rr/pod-pod", "latency/tcp-crr/underlay",
			"converge/new-node/first-remote-pod-reply", "converge/lease-added/on-all-nodes",
			"converge/lease-removed/on-all-nodes", "agent/idle/rss", "agent/churn/cpu",
		} {
			if !have[b+" "+n] {
				t.Errorf("no %s for %s", n, b)
			}
		}
	}
	first := Backends()[0]
	for _, n := range []string{"pod-setup/cni-add/loom-cni", "pod-setup/cni-del-p99/bridge+host-local",
		"scale/100-peers/cold-start-programmed", "scale/100-peers/update-10pct-stale-fdb"} {
		if !have[first+" "+n] {
			t.Errorf("no %s for %s", n, first)
		}
	}
}

// checkReportJSON decodes the report as a consumer would and checks it:
// the machine block, and for every measurement its fields, runs ≥ 1, a
// baseline that exists in the same lab, and ratio = median / the
// baseline's median.
func checkReportJSON(t *testing.T, data []byte) {
	t.Helper()
	var r struct {
		Machine      map[string]any `json:"machine"`
		Measurements []struct {
			Name     string   `json:"name"`
			Backend  string   `json:"backend"`
			Unit     string   `json:"unit"`
			Median   *float64 `json:"median"`
			Min      *float64 `json:"min"`
			Max      *float64 `json:"max"`
			Runs     int      `json:"runs"`
			Baseline *string  `json:"baseline"`
			Ratio    *float64 `json:"ratio"`
		} `json:"measurements"`
	}
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatalf("report is not valid JSON: %v", err)
	}
	for _, k := range []string{"cores", "kernel", "go_version", "idle_share"} {
		if _, ok := r.Machine[k]; !ok {
			t.Errorf("machine lacks %q", k)
		}
	}
	if len(r.Measurements) == 0 {
		t.Fatal("no measurements")
	}
	type key struct{ name, backend string }
	median := map[key]float64{}
	for _, m := range r.Measurements {
		k := key{m.Name, m.Backend}
		if _, dup := median[k]; dup {
			t.Errorf("measurement %s (%s) appears twice", m.Name, m.Backend)
		}
		if m.Median == nil || m.Min == nil || m.Max == nil || m.Baseline == nil {
			t.Fatalf("measurement %s (%s) lacks median, min, max or baseline", m.Name, m.Backend)
		}
		median[k] = *m.Median
		if m.Name == "" || m.Backend == "" || m.Unit == "" {
			t.Errorf("measurement %+v has no name, backend or unit", m)
		}
		if m.Runs < 1 {
			t.Errorf("%s (%s): runs %d", m.Name, m.Backend, m.Runs)
		}
		if !(*m.Min <= *m.Median && *m.Median <= *m.Max) {
			t.Errorf("%s (%s): min %v, median %v, max %v out of order", m.Name, m.Backend, *m.Min, *m.Median, *m.Max)
		}
	}
	for _, m := range r.Measurements {
		if *m.Baseline == "" {
			if m.Ratio != nil {
				t.Errorf("%s (%s) has ratio %v but no baseline", m.Name, m.Backend, *m.Ratio)
			}
			continue
		}
		b, ok := median[key{*m.Baseline, m.Backend}]
		if !ok {
			t.Errorf("%s (%s): baseline %q is not in the report", m.Name, m.Backend, *m.Baseline)
			continue
		}
		if b == 0 {
			continue // no ratio to a zero baseline
		}
		if m.Ratio == nil {
			t.Errorf("%s (%s): baseline %q but no ratio", m.Name, m.Backend, *m.Baseline)
			continue
		}
		if want := *m.Median / b; math.Abs(*m.Ratio-want) > 1e-9*math.Abs(want) {
			t.Errorf("%s (%s): ratio %v, want median %v / baseline median %v = %v", m.Name, m.Backend, *m.Ratio, *m.Median, b, want)
		}
	}
}
