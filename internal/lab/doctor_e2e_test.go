package lab

// End-to-end tests of `loom doctor` against the lab: a healthy lab is all
// OK, each `loom lab break` scenario is reported by exactly the check that
// names it, `heal` brings back an all-OK report and a green matrix, and a
// doctor run changes nothing. Address plan: underlay 198.18.0.0/24 (the
// vagrant-nat scenario adds 198.19.2.15/24 on every node), pods
// 10.244.0.0/16 (cidr-mismatch writes 10.224.0.0/16 into the store's
// config), internet 203.0.113.0/24. Only lab namespaces are touched.

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/doctor"
	"github.com/loomnet/loom/internal/testnet"
)

// runDoctor runs doctor on node and fails the test if it cannot.
func runDoctor(t testing.TB, l *Lab, node string) doctor.Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := l.Doctor(ctx, node)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// render prints a report compactly for failure messages.
func render(r doctor.Report) string {
	var b strings.Builder
	for _, res := range r.Results {
		fmt.Fprintf(&b, "  %-4s %-16s %s\n", res.Status, res.Check, res.Summary)
		if res.Status >= doctor.Warn {
			for _, e := range res.Evidence {
				fmt.Fprintf(&b, "         | %s\n", e)
			}
			if res.Fix != "" {
				fmt.Fprintf(&b, "         fix: %s\n", res.Fix)
			}
		}
	}
	return b.String()
}

// expectReport checks that exactly the checks in want report their status
// and every other check is OK or SKIP (SKIP only where allowed).
func expectReport(t *testing.T, r doctor.Report, want map[string]doctor.Status, allowSkip bool) {
	t.Helper()
	var bad []string
	for _, res := range r.Results {
		w, named := want[res.Check]
		switch {
		case named && res.Status != w:
			bad = append(bad, fmt.Sprintf("%s is %s, want %s", res.Check, res.Status, w))
		case !named && res.Status == doctor.Skip && slices.Contains(doctor.KubeOnlyChecks(), res.Check):
			// Kubernetes checks have nothing to read in an etcd lab.
		case !named && res.Status == doctor.Skip && !allowSkip:
			bad = append(bad, fmt.Sprintf("%s is SKIP on a healthy node", res.Check))
		case !named && res.Status > doctor.OK:
			bad = append(bad, fmt.Sprintf("%s is %s, want OK", res.Check, res.Status))
		}
	}
	for check := range want {
		if _, found := r.Result(check); !found {
			bad = append(bad, "no result for "+check)
		}
	}
	if len(bad) > 0 {
		t.Fatalf("doctor on %s: %s\n%s", r.Node, strings.Join(bad, "; "), render(r))
	}
	wantCode := 0
	for _, s := range want {
		wantCode = max(wantCode, map[doctor.Status]int{doctor.Warn: 1, doctor.Fail: 2}[s])
	}
	if r.ExitCode != wantCode {
		t.Fatalf("doctor on %s exited %d, want %d", r.Node, r.ExitCode, wantCode)
	}
}

func requireHealthy(t *testing.T, l *Lab, nodes ...string) {
	t.Helper()
	for _, n := range nodes {
		expectReport(t, runDoctor(t, l, n), nil, false)
	}
}

// healthyWithinResync waits until doctor reports node fully OK, for at
// most one resync (5 s) plus slack, then asserts it.
func healthyWithinResync(t *testing.T, l *Lab, node string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if r := runDoctor(t, l, node); r.ExitCode == 0 {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	requireHealthy(t, l, node)
}

// doctorLab brings up the lab the doctor tests share.
func doctorLab(t *testing.T, name string) *Lab {
	return upLab(t, Options{Name: name, Nodes: 3, Pods: 2, Backend: os.Getenv("LOOM_TEST_BACKEND"), Firewall: os.Getenv("LOOM_TEST_FIREWALL")})
}

// Every scenario, one after the other on one lab: healthy → break → doctor
// names the fault (and the fix says how to repair it) → heal → healthy and
// the matrix green.
func TestDoctorScenarios(t *testing.T) {
	l := doctorLab(t, "tdoc")
	requireHealthy(t, l, "n1", "n2", "n3")
	ctx := context.Background()
	for _, sc := range scenarios() {
		if !sc.fits(l.Opts.Datastore) {
			continue // TestKubeLabFaults runs the Kubernetes scenarios
		}
		t.Run(sc.name, func(t *testing.T) {
			if sc.name == "bridge-nf-off" {
				if _, err := os.Stat("/proc/sys/net/bridge"); err != nil {
					t.Skip("br_netfilter is not loaded on this machine")
				}
			}
			if err := l.Break(ctx, sc.name); err != nil {
				_ = l.Heal(ctx)
				t.Fatal(err)
			}
			r := runDoctor(t, l, sc.node)
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("report after break %s:\n%s", sc.name, render(r))
				}
			})
			expectReport(t, r, sc.expect, true)
			for check := range sc.expect {
				res, _ := r.Result(check)
				if res.Fix == "" || len(res.Evidence) == 0 {
					t.Errorf("%s names no evidence or no fix:\n%s", check, render(r))
				}
			}
			if err := l.Heal(ctx); err != nil {
				t.Fatal(err)
			}
			// Restarted agents learn of peers that re-claimed after
			// their first listing through the watch, and program them
			// within one resync: healthy within that, not at once.
			healthyWithinResync(t, l, sc.node)
			mustCheck(t, l, l.Matrix())
		})
	}
	if _, err := os.Stat(l.breakPath()); err == nil {
		t.Fatal("break.json left behind after heal")
	}
}

// The exact text a user sees: `loom lab doctor` through the real command
// line, its exit status, and a fix printed for the fault.
func TestLabDoctorCommand(t *testing.T) {
	l := doctorLab(t, "tdcmd")
	loom := filepath.Join(binDir, "loom")
	run := func(args ...string) (string, int) {
		out, err := exec.Command(loom, append([]string{"lab"}, args...)...).CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	if out, code := run("doctor", "--name", l.Opts.Name, "n1"); code != 0 {
		t.Fatalf("loom lab doctor n1 on a healthy lab exited %d:\n%s", code, out)
	}
	if out, code := run("break", "--name", l.Opts.Name, "ip-forward-off"); code != 0 {
		t.Fatalf("loom lab break exited %d:\n%s", code, out)
	}
	out, code := run("doctor", "--name", l.Opts.Name, "n1")
	if code != 2 {
		t.Fatalf("loom lab doctor n1 after ip-forward-off exited %d, want 2:\n%s", code, out)
	}
	for _, want := range []string{"FAIL  ip-forward", "net.ipv4.ip_forward = 0", "sysctl -w net.ipv4.ip_forward=1"} {
		if !strings.Contains(out, want) {
			t.Errorf("report does not contain %q:\n%s", want, out)
		}
	}
	if out, code := run("break", "--name", l.Opts.Name, "agent-down"); code == 0 {
		t.Fatalf("a second break on a broken lab succeeded:\n%s", out)
	}
	if out, code := run("heal", "--name", l.Opts.Name); code != 0 {
		t.Fatalf("loom lab heal exited %d:\n%s", code, out)
	}
	if out, code := run("doctor", "--name", l.Opts.Name, "n1"); code != 0 {
		t.Fatalf("loom lab doctor n1 after heal exited %d:\n%s", code, out)
	}
}

// snapshot is everything a doctor run must leave as it was.
func snapshot(t *testing.T, l *Lab) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Traffic counters, and what the kernel does on its own on fresh links
	// (IPv6 duplicate address detection, bridge timers), are not state.
	counters := regexp.MustCompile(`\[\d+:\d+\]|counter packets \d+ bytes \d+| tentative`)
	out := map[string]string{}
	cmds := [][]string{
		{"ip", "link", "show"},
		{"ip", "-4", "addr", "show"},
		{"ip", "-6", "addr", "show", "scope", "global"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "rule", "show"},
		{"ip", "neigh", "show", "nud", "permanent"},
		{"bridge", "fdb", "show"},
		{"nft", "list", "ruleset"},
		{"iptables-save"},
		{"sysctl", "net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding"},
	}
	for _, ns := range append([]string{l.RouterNS()}, nodeNames(l)...) {
		for _, c := range cmds {
			s, err := outputIn(ctx, ns, c...)
			if err != nil {
				t.Fatal(err)
			}
			out[ns+": "+strings.Join(c, " ")] = counters.ReplaceAllString(s, "")
		}
	}
	cli, err := l.etcd()
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	resp, err := cli.Get(ctx, registryPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var kvs []string
	for _, kv := range resp.Kvs {
		kvs = append(kvs, fmt.Sprintf("%s=%s (mod %d)", kv.Key, kv.Value, kv.ModRevision))
	}
	out["etcd revision"] = fmt.Sprint(resp.Header.Revision)
	out["etcd keys"] = strings.Join(kvs, "\n")
	var files []string
	_ = filepath.Walk(l.dir(), func(path string, info os.FileInfo, err error) error {
		if err != nil || strings.Contains(path, "/store/") || strings.HasSuffix(path, ".log") {
			return nil
		}
		files = append(files, fmt.Sprintf("%s %v %d %s", path, info.Mode(), info.Size(), info.ModTime().Format(time.RFC3339Nano)))
		return nil
	})
	sort.Strings(files)
	out["files"] = strings.Join(files, "\n")
	return out
}

func nodeNames(l *Lab) []string {
	var out []string
	for _, n := range l.Nodes {
		out = append(out, n.NS)
	}
	return out
}

// Doctor is read-only: routes, links, addresses, rules, permanent
// neighbours, FDB, firewall, sysctls, the registry (keys and revision) and
// the lab's files are the same before and after a run on every node, also
// with faults present. (Peer probes leave what any packet leaves: ARP cache
// and conntrack entries.)
func TestDoctorReadOnly(t *testing.T) {
	l := doctorLab(t, "tdro")
	check := func(t *testing.T) {
		before := snapshot(t, l)
		for _, n := range l.Nodes {
			runDoctor(t, l, n.Name)
		}
		after := snapshot(t, l)
		keys := make([]string, 0, len(before))
		for k := range before {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if before[k] != after[k] {
				t.Errorf("%s changed during doctor runs:\nbefore:\n%s\nafter:\n%s", k, before[k], after[k])
			}
		}
	}
	t.Run("healthy", check)
	ctx := context.Background()
	for _, sc := range []string{"ipam-leak", "cni0-stale"} {
		t.Run(sc, func(t *testing.T) {
			if err := l.Break(ctx, sc); err != nil {
				t.Fatal(err)
			}
			check(t)
			if err := l.Heal(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// BenchmarkDoctorHealthyLab times `loom lab doctor n1` (process start,
// every read, every check) on a healthy 3-node lab. Target: well under 2 s.
func BenchmarkDoctorHealthyLab(b *testing.B) {
	testnet.RequireRoot(b)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	name := "tdbnch"
	_ = Down(name)
	l, err := Up(ctx, Options{Name: name, Nodes: 3, Pods: 2, BinDir: binDir, Backend: os.Getenv("LOOM_TEST_BACKEND")}, slog.New(slog.DiscardHandler))
	b.Cleanup(func() { _ = Down(name) })
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		r, err := l.Doctor(ctx, "n1")
		if err != nil {
			b.Fatal(err)
		}
		if r.ExitCode != 0 {
			b.Fatalf("healthy lab is not healthy:\n%s", render(r))
		}
	}
}
