package doctor

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
)

// Report is one doctor run: what it read and what it found.
type Report struct {
	Node       string         `json:"node"`
	ArgsSource string         `json:"argsSource"`
	Took       time.Duration  `json:"tookNanoseconds"`
	Counts     map[string]int `json:"counts"` // by status: OK, WARN, FAIL, SKIP
	ExitCode   int            `json:"exitCode"`
	Results    []Result       `json:"results"`
}

// NewReport wraps results.
func NewReport(f *Facts, results []Result, took time.Duration) Report {
	r := Report{Node: f.Node, ArgsSource: f.ArgsSource, Took: took, Results: results, Counts: map[string]int{}, ExitCode: ExitCode(results)}
	for _, res := range results {
		r.Counts[res.Status.String()]++
	}
	return r
}

// Result returns the result of the named check.
func (r Report) Result(check string) (Result, bool) {
	for _, res := range r.Results {
		if res.Check == check {
			return res, true
		}
	}
	return Result{}, false
}

// WriteJSON writes the report as one JSON document.
func (r Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText writes the report for people: one block per check, the status
// first, then the evidence and the fix.
func (r Report) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "loom doctor: node %s (agent flags from %s), %d checks in %s: %d OK, %d WARN, %d FAIL, %d SKIP\n\n",
		r.Node, r.ArgsSource, len(r.Results), r.Took.Round(time.Millisecond),
		r.Counts["OK"], r.Counts["WARN"], r.Counts["FAIL"], r.Counts["SKIP"])
	// One column for the check names, as wide as the longest.
	col := 16
	for _, res := range r.Results {
		col = max(col, len(res.Check))
	}
	for _, res := range r.Results {
		fmt.Fprintf(&b, "%-4s  %-*s  %s\n", res.Status, col, res.Check, res.Summary)
		for _, e := range res.Evidence {
			fmt.Fprintf(&b, "      %-*s  | %s\n", col, "", e)
		}
		if res.Fix != "" {
			for i, line := range strings.Split(res.Fix, "\n") {
				label := ""
				if i == 0 {
					label = "fix:"
				}
				fmt.Fprintf(&b, "      %-*s  %s\n", col, label, line)
			}
		}
	}
	switch r.ExitCode {
	case 0:
		b.WriteString("\nno problem found\n")
	case 1:
		b.WriteString("\nwarnings only (exit 1)\n")
	default:
		b.WriteString("\nfailures found (exit 2)\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}
