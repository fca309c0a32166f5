package doctor

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestSplitFlags(t *testing.T) {
	for _, tc := range []struct {
		args        []string
		mine, agent string
	}{
		{args: []string{"--json", "--iface", "eth0", "--node", "n1"}, mine: "--json --node n1", agent: "--iface eth0"},
		{args: []string{"-node=n2", "-node-name", "n1", "--json=false"}, mine: "-node=n2 --json=false", agent: "-node-name n1"},
		{args: []string{"--cni-conf-dir", "/x", "--ip-masq", "--timeout", "1s"}, mine: "--cni-conf-dir /x --timeout 1s", agent: "--ip-masq"},
		{args: nil},
	} {
		fs := newDoctorFlagSet(&doctorFlags{}, nil)
		mine, agent := splitFlags(fs, tc.args)
		if strings.Join(mine, " ") != tc.mine || strings.Join(agent, " ") != tc.agent {
			t.Errorf("%q: doctor %q agent %q, want %q and %q", tc.args, mine, agent, tc.mine, tc.agent)
		}
	}
}

func TestExitCode(t *testing.T) {
	for _, tc := range []struct {
		statuses []Status
		want     int
	}{
		{statuses: []Status{OK, Skip}, want: 0},
		{statuses: []Status{OK, Warn, Skip}, want: 1},
		{statuses: []Status{Warn, Fail, OK}, want: 2},
	} {
		var rs []Result
		for _, s := range tc.statuses {
			rs = append(rs, Result{Status: s})
		}
		if got := ExitCode(rs); got != tc.want {
			t.Errorf("%v: exit %d, want %d", tc.statuses, got, tc.want)
		}
	}
}

// The JSON report decodes into the same results; the text report shows
// status, check, evidence and fix.
func TestReport(t *testing.T) {
	f := healthyFacts(t)
	f.Kernel.Sysctls[sysctlIPForward] = "0"
	r := NewReport(f, Run(f), 12*time.Millisecond)
	if r.ExitCode != 2 || r.Counts["FAIL"] != 1 || r.Counts["SKIP"] != len(KubeOnlyChecks()) || r.Counts["OK"] != len(checks())-1-len(KubeOnlyChecks()) {
		t.Fatalf("report %+v", r.Counts)
	}
	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	res, _ := back.Result(CheckIPForward)
	if back.ExitCode != 2 || res.Status != Fail || !strings.Contains(js.String(), `"status": "FAIL"`) {
		t.Fatalf("decoded %+v from\n%s", res, js.String())
	}
	var text bytes.Buffer
	if err := r.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"FAIL  ip-forward", "| net.ipv4.ip_forward = 0", "fix:", "sysctl -w net.ipv4.ip_forward=1", "failures found (exit 2)"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text report lacks %q:\n%s", want, text.String())
		}
	}
}

// Every check has a name that is printed, and Names lists them in order.
func TestNames(t *testing.T) {
	names := Names()
	seen := map[string]bool{}
	for _, n := range names {
		if n == "" || seen[n] {
			t.Fatalf("bad or duplicate check name %q in %v", n, names)
		}
		seen[n] = true
	}
	if len(names) != 18 {
		t.Fatalf("%d checks: %v", len(names), names)
	}
}
