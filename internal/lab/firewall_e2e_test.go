package lab

// End-to-end tests of the agent's masquerade and forward rules in both
// firewall modes: what pods see (source addresses), self-healing of rules
// removed by hand, Docker's FORWARD DROP, and -ip-masq=false. Address plan
// as in lab_e2e_test.go.

import (
	"bytes"
	"context"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// inNS runs a command inside a lab member's namespace.
func inNS(t *testing.T, l *Lab, member string, args ...string) string {
	t.Helper()
	ns, err := l.NSOf(member)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s in %s: %v\n%s", strings.Join(args, " "), member, err, out)
	}
	return string(out)
}

// eventually re-runs rows until they all come out as expected, or fails
// after one resync (5 s) plus slack for a busy machine.
func eventually(t *testing.T, l *Lab, what string, rows []Row) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		got, err := l.Check(ctx, rows)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if PrintMatrix(&buf, got) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not as expected within one resync:\n%s", what, buf.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func kindRows(rows []Row, kind string) []Row {
	var out []Row
	for _, r := range rows {
		if r.Kind == kind {
			out = append(out, r)
		}
	}
	return out
}

func TestFirewallModes(t *testing.T) {
	for _, mode := range []string{"nftables", "iptables"} {
		t.Run(mode, func(t *testing.T) {
			l := upLab(t, Options{Name: "f" + mode[:3], Nodes: 2, Pods: 1, Backend: "host-gw", Firewall: mode})
			rows := l.Matrix()
			// Pod to internet shows the node's address, pod to pod the
			// pod's: both are rows of the matrix.
			mustCheck(t, l, rows)

			// Someone flushes loom's NAT rules: they are back within one
			// resync and pods reach the internet again.
			if mode == "nftables" {
				inNS(t, l, "n1", "nft", "flush", "chain", "ip", "loom", "nat-postrouting")
				if got := inNS(t, l, "n1", "nft", "list", "chain", "ip", "loom", "nat-postrouting"); strings.Contains(got, "masquerade") {
					t.Fatalf("flush left masquerade rules:\n%s", got)
				}
			} else {
				inNS(t, l, "n1", "iptables", "-t", "nat", "-F", "LOOM-POSTRTG")
				if got := inNS(t, l, "n1", "iptables", "-t", "nat", "-S", "LOOM-POSTRTG"); strings.Contains(got, "MASQUERADE") {
					t.Fatalf("flush left masquerade rules:\n%s", got)
				}
			}
			eventually(t, l, "masquerade rules flushed on n1", rowsFor(kindRows(rows, "pod->internet"), "n1"))

			// Docker sets iptables' FORWARD policy to DROP: cross-node pod
			// traffic must keep flowing in both modes.
			for _, n := range []string{"n1", "n2"} {
				inNS(t, l, n, "iptables", "-P", "FORWARD", "DROP")
			}
			eventually(t, l, "FORWARD policy DROP", kindRows(rows, "pod->pod cross-node"))

			// -ip-masq=false: no NAT rules at all, so a pod cannot reach
			// the internet (which has no route back to pods). Expected.
			if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if err := l.StartAgentWith("n1", "--ip-masq", "false"); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := l.WaitReady(ctx, "n1"); err != nil {
				t.Fatal(err)
			}
			var noMasq []Row
			for _, r := range rowsFor(kindRows(rows, "pod->internet"), "n1") {
				r.Kind, r.WantSeen, r.WantFail = "pod->internet without -ip-masq (must fail)", netip.Addr{}, true
				noMasq = append(noMasq, r)
			}
			eventually(t, l, "-ip-masq=false", noMasq)
			eventually(t, l, "pod to pod with -ip-masq=false", kindRows(rows, "pod->pod cross-node"))

			// `loom agent -cleanup` removes everything loom installed, in
			// both renderings, and leaves other rules alone.
			if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			inNS(t, l, "n1", l.loomBin(), "agent", "--cleanup")
			if got := inNS(t, l, "n1", "nft", "list", "ruleset"); strings.Contains(got, "table ip loom") {
				t.Fatalf("nftables still has loom's table after -cleanup:\n%s", got)
			}
			if got := inNS(t, l, "n1", "iptables-save"); strings.Contains(got, "LOOM-") {
				t.Fatalf("iptables still has loom's chains after -cleanup:\n%s", got)
			}
			if got := inNS(t, l, "n1", "iptables", "-S", "FORWARD"); !strings.Contains(got, "-P FORWARD DROP") {
				t.Fatalf("-cleanup changed the FORWARD policy it does not own:\n%s", got)
			}
		})
	}
}
