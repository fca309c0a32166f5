package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// Directions of a measurement: which way is an improvement.
const (
	higherIsBetter = "higher"
	lowerIsBetter  = "lower"
)

// Report is what one `loom bench` run measured, in the JSON form issue #8
// fixes: the machine, then one entry per measurement.
type Report struct {
	Machine      Machine       `json:"machine"`
	Measurements []Measurement `json:"measurements"`
	// Errors lists the measurements that failed, each with why. A run with
	// errors still reports everything that worked.
	Errors []string `json:"errors,omitempty"`
}

// Machine describes where the run happened. The figures mean something only
// next to it, and the ratios only inside one run.
type Machine struct {
	Cores     int     `json:"cores"`
	CPU       string  `json:"cpu,omitempty"`
	MemoryMiB int64   `json:"memory_mib,omitempty"`
	Kernel    string  `json:"kernel"`
	GoVersion string  `json:"go_version"`
	Iperf3    string  `json:"iperf3,omitempty"`
	IdleShare float64 `json:"idle_share"` // share of CPU time idle over ~1 s before the run
	// Command is the command line of the run, Quick and Runs its settings.
	Command  string    `json:"command,omitempty"`
	Quick    bool      `json:"quick"`
	Runs     int       `json:"runs"`
	Started  time.Time `json:"started"`
	Duration float64   `json:"duration_seconds"`
}

// Measurement is one figure: the median, minimum and maximum of its runs.
// A measurement is identified by Name and Backend (the backend of the lab
// it was measured in). Baseline names the measurement, in the same lab and
// so with the same Backend, that Ratio divides by: Ratio = Median /
// baseline's Median. Baseline is "" and Ratio null for a measurement that is
// itself a baseline or stands alone (a convergence time, say).
type Measurement struct {
	Name     string   `json:"name"`
	Backend  string   `json:"backend"`
	Unit     string   `json:"unit"`
	Median   float64  `json:"median"`
	Min      float64  `json:"min"`
	Max      float64  `json:"max"`
	Runs     int      `json:"runs"`
	Baseline string   `json:"baseline"`
	Ratio    *float64 `json:"ratio"`
	// Better is "higher" or "lower": which way is an improvement.
	Better string `json:"better"`
	// IdleShare is the machine's idle CPU share measured just before the
	// measurement's group started.
	IdleShare float64 `json:"idle_share"`
	Note      string  `json:"note,omitempty"`
}

// spec is what a measurement is, before it has figures.
type spec struct {
	name     string
	unit     string
	better   string
	baseline string // "" for none
	note     string
}

// stats summarises samples: median (the mean of the middle two for an even
// count), minimum and maximum. It returns NaNs for no samples.
func stats(samples []float64) (median, lo, hi float64) {
	if len(samples) == 0 {
		return math.NaN(), math.NaN(), math.NaN()
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	n := len(s)
	median = s[n/2]
	if n%2 == 0 {
		median = (s[n/2-1] + s[n/2]) / 2
	}
	return median, s[0], s[n-1]
}

// percentile returns the nearest-rank p-th percentile (0 < p ≤ 100) of
// samples: the smallest sample with at least p% of the samples at or below
// it. The 99th percentile of 200 samples is the 198th smallest.
func percentile(samples []float64, p float64) float64 {
	if len(samples) == 0 {
		return math.NaN()
	}
	s := slices.Clone(samples)
	slices.Sort(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	rank = max(1, min(rank, len(s)))
	return s[rank-1]
}

// recorder collects samples as a run goes and turns them into a Report.
// Its methods are safe for concurrent use.
type recorder struct {
	mu     sync.Mutex // guards the fields below
	order  []seriesKey
	series map[seriesKey]*series
	errs   []string
}

type seriesKey struct{ name, backend string }

type series struct {
	spec
	idle    float64
	samples []float64
}

func newRecorder() *recorder {
	return &recorder{series: make(map[seriesKey]*series)}
}

// add records one sample of measurement s in the lab of backend. idle is the
// idle share measured before the group; the first sample's is kept.
func (r *recorder) add(s spec, backend string, idle, v float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if math.IsNaN(v) || math.IsInf(v, 0) {
		r.errs = append(r.errs, fmt.Sprintf("%s (%s): sample %v is not a number", s.name, backend, v))
		return
	}
	k := seriesKey{s.name, backend}
	se, ok := r.series[k]
	if !ok {
		se = &series{spec: s, idle: idle}
		r.series[k] = se
		r.order = append(r.order, k)
	}
	se.samples = append(se.samples, v)
}

// fail records a measurement (or a whole group) that could not be made.
func (r *recorder) fail(what, backend string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, fmt.Sprintf("%s (%s): %v", what, backend, err))
}

// measurements computes every measurement's statistics and ratio. A
// baseline that was not measured (it failed) is dropped from the
// measurements that name it, with a note, so every baseline named in the
// output exists in it.
func (r *recorder) measurements() []Measurement {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Measurement, 0, len(r.order))
	index := make(map[seriesKey]int, len(r.order))
	for _, k := range r.order {
		se := r.series[k]
		med, lo, hi := stats(se.samples)
		index[k] = len(out)
		out = append(out, Measurement{
			Name: se.name, Backend: k.backend, Unit: se.unit,
			Median: med, Min: lo, Max: hi, Runs: len(se.samples),
			Baseline: se.baseline, Better: se.better, IdleShare: se.idle, Note: se.note,
		})
	}
	for i := range out {
		m := &out[i]
		if m.Baseline == "" {
			continue
		}
		j, ok := index[seriesKey{m.Baseline, m.Backend}]
		if !ok {
			m.Note = joinNote(m.Note, "baseline "+m.Baseline+" failed: no ratio")
			m.Baseline = ""
			continue
		}
		if b := out[j].Median; b != 0 && !math.IsNaN(b) {
			ratio := m.Median / b
			m.Ratio = &ratio
		}
	}
	return out
}

func (r *recorder) errors() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.errs)
}

func joinNote(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode the report: %w", err)
	}
	_, err = w.Write(append(data, '\n'))
	return err
}

// WriteTable writes the report for a person: the machine, then one line per
// measurement.
func (r *Report) WriteTable(w io.Writer) error {
	m := r.Machine
	mode := "full"
	if m.Quick {
		mode = "quick"
	}
	fmt.Fprintf(w, "loom bench (%s, %d runs): %d cores %s, %d MiB, kernel %s, %s, iperf3 %s; CPU idle %.0f%% before the run; took %.0fs\n\n",
		mode, m.Runs, m.Cores, m.CPU, m.MemoryMiB, m.Kernel, m.GoVersion, m.Iperf3, 100*m.IdleShare, m.Duration)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "backend\tmeasurement\tunit\tmedian\tmin\tmax\truns\tratio\tbaseline\tidle\t")
	for _, x := range r.Measurements {
		ratio := ""
		if x.Ratio != nil {
			ratio = fmt.Sprintf("%.3f", *x.Ratio)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%.0f%%\t\n", x.Backend, x.Name, x.Unit,
			num(x.Median), num(x.Min), num(x.Max), x.Runs, ratio, x.Baseline, 100*x.IdleShare)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(r.Errors) > 0 {
		fmt.Fprintf(w, "\n%d measurement(s) failed:\n  %s\n", len(r.Errors), strings.Join(r.Errors, "\n  "))
	}
	return nil
}

// num prints a figure with about four significant digits.
func num(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v):
		return "-"
	case a >= 1000 || a == 0:
		return fmt.Sprintf("%.0f", v)
	case a >= 100:
		return fmt.Sprintf("%.1f", v)
	case a >= 10:
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.3f", v)
}
