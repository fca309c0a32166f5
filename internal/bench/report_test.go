package bench

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
)

// Unit tests of the statistics, the ratios and the report's encodings: no
// root, no lab.

func TestStats(t *testing.T) {
	for _, tc := range []struct {
		name                string
		samples             []float64
		median, lo, hi, p99 float64
	}{
		{name: "one", samples: []float64{7}, median: 7, lo: 7, hi: 7, p99: 7},
		{name: "odd count, unsorted", samples: []float64{3, 1, 2}, median: 2, lo: 1, hi: 3, p99: 3},
		{name: "even count takes the mean of the middle two", samples: []float64{4, 1, 3, 2}, median: 2.5, lo: 1, hi: 4, p99: 4},
		{name: "negative and repeated", samples: []float64{-1, 5, 5, 5, -3}, median: 5, lo: -3, hi: 5, p99: 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := append([]float64(nil), tc.samples...)
			median, lo, hi := stats(tc.samples)
			if median != tc.median || lo != tc.lo || hi != tc.hi {
				t.Errorf("stats(%v) = %v, %v, %v; want %v, %v, %v", tc.samples, median, lo, hi, tc.median, tc.lo, tc.hi)
			}
			if p := percentile(tc.samples, 99); p != tc.p99 {
				t.Errorf("percentile(%v, 99) = %v, want %v", tc.samples, p, tc.p99)
			}
			for i := range in {
				if in[i] != tc.samples[i] {
					t.Fatalf("stats reordered its input: %v, was %v", tc.samples, in)
				}
			}
		})
	}
	if m, lo, hi := stats(nil); !math.IsNaN(m) || !math.IsNaN(lo) || !math.IsNaN(hi) {
		t.Errorf("stats(nil) = %v, %v, %v; want NaNs", m, lo, hi)
	}
}

// The 99th percentile of 200 samples (1..200) is the 198th smallest by
// nearest rank; of 20 it is the largest.
func TestPercentileNearestRank(t *testing.T) {
	var s []float64
	for i := 200; i >= 1; i-- {
		s = append(s, float64(i))
	}
	if p := percentile(s, 99); p != 198 {
		t.Errorf("p99 of 1..200 = %v, want 198", p)
	}
	if p := percentile(s, 50); p != 100 {
		t.Errorf("p50 of 1..200 = %v, want 100", p)
	}
	if p := percentile(s[:20], 99); p != 200 {
		t.Errorf("p99 of 181..200 = %v, want 200", p)
	}
}

func TestRecorderRatios(t *testing.T) {
	r := newRecorder()
	pod := spec{name: "tput/pod", unit: "Gbit/s", better: higherIsBetter, baseline: "tput/underlay"}
	under := spec{name: "tput/underlay", unit: "Gbit/s", better: higherIsBetter}
	orphan := spec{name: "tput/orphan", unit: "Gbit/s", better: higherIsBetter, baseline: "tput/never-measured"}
	for _, v := range []float64{8, 6, 7} {
		r.add(pod, "vxlan", 0.9, v)
	}
	for _, v := range []float64{10, 9, 11} {
		r.add(under, "vxlan", 0.8, v)
	}
	// Same names in another lab: ratios never cross labs.
	r.add(pod, "host-gw", 0.9, 9)
	r.add(under, "host-gw", 0.9, 9)
	r.add(orphan, "vxlan", 0.9, 1)
	r.add(under, "udp", 0.9, math.NaN()) // not a number: an error, not a sample

	ms := r.measurements()
	get := func(name, backend string) Measurement {
		for _, m := range ms {
			if m.Name == name && m.Backend == backend {
				return m
			}
		}
		t.Fatalf("no measurement %s (%s) in %+v", name, backend, ms)
		return Measurement{}
	}
	p := get("tput/pod", "vxlan")
	if p.Median != 7 || p.Min != 6 || p.Max != 8 || p.Runs != 3 || p.IdleShare != 0.9 {
		t.Errorf("pod = %+v, want median 7, min 6, max 8, 3 runs, idle 0.9", p)
	}
	if p.Ratio == nil || *p.Ratio != 0.7 {
		t.Errorf("pod ratio = %v, want 7/10 = 0.7", p.Ratio)
	}
	if u := get("tput/underlay", "vxlan"); u.Ratio != nil || u.Baseline != "" {
		t.Errorf("a baseline has ratio %v and baseline %q, want none", u.Ratio, u.Baseline)
	}
	if h := get("tput/pod", "host-gw"); h.Ratio == nil || *h.Ratio != 1 {
		t.Errorf("host-gw pod ratio = %v, want 1 (its own lab's baseline)", h.Ratio)
	}
	o := get("tput/orphan", "vxlan")
	if o.Baseline != "" || o.Ratio != nil || !strings.Contains(o.Note, "tput/never-measured") {
		t.Errorf("orphan = %+v: want no baseline, no ratio and a note naming the missing baseline", o)
	}
	for _, m := range ms {
		if m.Backend == "udp" {
			t.Errorf("a NaN sample became a measurement: %+v", m)
		}
	}
	if errs := r.errors(); len(errs) != 1 || !strings.Contains(errs[0], "not a number") {
		t.Errorf("errors = %q, want one about the NaN sample", errs)
	}
}

func TestReportEncodings(t *testing.T) {
	r := newRecorder()
	r.add(spec{name: "a", unit: "ms", better: lowerIsBetter, baseline: "b"}, "vxlan", 1, 3)
	r.add(spec{name: "b", unit: "ms", better: lowerIsBetter}, "vxlan", 1, 4)
	rep := &Report{Machine: Machine{Cores: 2, Kernel: "6.1", GoVersion: "go1.26", IdleShare: 0.5, Runs: 1},
		Measurements: r.measurements(), Errors: []string{"x (vxlan): broke"}}

	var js bytes.Buffer
	if err := rep.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back struct {
		Machine      map[string]any   `json:"machine"`
		Measurements []map[string]any `json:"measurements"`
	}
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatalf("report JSON does not decode: %v\n%s", err, js.String())
	}
	for _, k := range []string{"cores", "kernel", "go_version", "idle_share"} {
		if _, ok := back.Machine[k]; !ok {
			t.Errorf("machine has no %q: %v", k, back.Machine)
		}
	}
	for _, m := range back.Measurements {
		for _, k := range []string{"name", "backend", "unit", "median", "min", "max", "runs", "baseline", "ratio"} {
			if _, ok := m[k]; !ok {
				t.Errorf("measurement has no %q: %v", k, m)
			}
		}
	}
	if got := back.Measurements[0]["ratio"]; got != 0.75 {
		t.Errorf("ratio in JSON = %v, want 0.75", got)
	}
	if got := back.Measurements[1]["ratio"]; got != nil {
		t.Errorf("baseline's ratio in JSON = %v, want null", got)
	}

	var table bytes.Buffer
	if err := rep.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"2 cores", "0.750", "x (vxlan): broke"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}
}
