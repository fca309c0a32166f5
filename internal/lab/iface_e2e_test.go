package lab

// The Vagrant trap, end to end: every node has a second, "NAT" interface
// with the same address (198.19.2.15/24, inside the lab's underlay plan).
// Address plan as in lab_e2e_test.go.

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestVagrantNATInterface(t *testing.T) {
	l := upLab(t, Options{Name: "tvag", Nodes: 2, Pods: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// Without -iface the agent takes the interface of the default route
	// (the real underlay), not the shared NAT address.
	for _, n := range l.Nodes {
		if err := addStubLink(n.NS, "nat0", vagrantNAT); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgentWith("n1", "--iface", ""); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	want := `loom_underlay_info{chosen_by="default route",iface="eth0",public_ip="198.18.0.11",public_ipv6=""} 1`
	if m := httpGet(t, l, "n1", "/metrics"); !strings.Contains(m, want) {
		t.Fatalf("n1 without -iface: /metrics lacks %s", want)
	}
	mustCheck(t, l, l.Matrix())

	// The misconfiguration: both agents pinned to the NAT interface. The
	// first takes the address; the second is refused with an error naming
	// both nodes and the fix, instead of two nodes silently sharing one IP.
	if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgentWith("n1", "--iface", "nat0"); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitReady(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	if err := l.StopAgent("n2", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgentWith("n2", "--iface", "nat0"); err != nil {
		t.Fatal(err)
	}
	for l.recordedAlive("agent-n2") {
		if ctx.Err() != nil {
			t.Fatal("n2's agent was not refused while n1 holds the same public IP")
		}
		time.Sleep(100 * time.Millisecond)
	}
	data, err := os.ReadFile(filepath.Join(l.NodeDir("n2"), "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	msg := lastLines(data, 3)
	for _, want := range []string{"public IP " + vagrantNAT.Addr().String() + " is already used by node n1", "node n2 cannot share it", "-iface="} {
		if !strings.Contains(msg, want) {
			t.Errorf("n2's refusal does not say %q:\n%s", want, msg)
		}
	}

	// The fix the error names: -iface with the real underlay.
	if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"n1", "n2"} {
		if err := l.StartAgentWith(n, "--iface", "eth0"); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"n1", "n2"} {
		if err := l.WaitReady(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	mustCheck(t, l, l.Matrix())
}

// A host hardened with strict reverse-path filtering: the agent keeps the
// overlay device loose, and pods keep talking across nodes.
func TestStrictRPFilterLoosenedOnOverlay(t *testing.T) {
	l := upLab(t, Options{Name: "trpf", Nodes: 2, Pods: 1, Backend: "vxlan"})
	for _, n := range []string{"n1", "n2"} {
		inNS(t, l, n, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.flannel/1.rp_filter=1")
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := strings.TrimSpace(inNS(t, l, "n1", "cat", "/proc/sys/net/ipv4/conf/flannel.1/rp_filter"))
		if got == "2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("flannel.1 rp_filter is %s one resync after it was made strict, want 2", got)
		}
		time.Sleep(200 * time.Millisecond)
	}
	eventually(t, l, "strict rp_filter", l.Matrix())
}
