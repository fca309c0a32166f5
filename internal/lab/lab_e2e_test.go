package lab

// End-to-end tests: real embedded etcd, real agents, real kernel routes and
// real CNI calls, in lab namespaces (underlay 198.18.0.0/24, pods
// 10.244.0.0/16, "internet" 203.0.113.0/24). Nothing is added to the root
// namespace; TestLabDownLeavesNothing checks that too.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/subnetenv"
	"github.com/loomnet/loom/internal/testnet"
)

var binDir string

func TestMain(m *testing.M) {
	os.Exit(testnet.MainWithBinaries(m, func(dir string) { binDir = dir }))
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// upLab brings a lab up for one test and takes it down (asserting nothing
// is left) when the test ends. Agent logs are attached on failure.
func upLab(t *testing.T, o Options) *Lab {
	t.Helper()
	testnet.RequireRoot(t)
	o.BinDir = binDir
	timeout := 3 * time.Minute
	if o.Datastore == "kube" {
		timeout = 5 * time.Minute // and a Kubernetes control plane to start
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_ = Down(o.Name) // a previous crashed run of this test
	l, err := Up(ctx, o, testLog(t))
	t.Cleanup(func() {
		if t.Failed() && l != nil {
			for _, n := range l.Nodes {
				if data, err := os.ReadFile(filepath.Join(l.NodeDir(n.Name), "agent.log")); err == nil {
					t.Logf("agent log of %s:\n%s", n.Name, lastLines(data, 40))
				}
			}
		}
		if err := Down(o.Name); err != nil {
			t.Errorf("lab down: %v", err)
		}
		if left, err := Leftovers(o.Name); err != nil || len(left) > 0 {
			t.Errorf("lab down left %v (%v)", left, err)
		}
	})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	return l
}

func mustCheck(t *testing.T, l *Lab, rows []Row) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	got, err := l.Check(ctx, rows)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if !PrintMatrix(&buf, got) {
		t.Fatalf("connectivity matrix not as expected:\n%s", buf.String())
	}
}

func subnets(t *testing.T, l *Lab) map[string]netip.Prefix {
	t.Helper()
	out := map[string]netip.Prefix{}
	for _, n := range l.Nodes {
		env, err := subnetenv.Read(l.SubnetFile(n.Name))
		if err != nil {
			t.Fatal(err)
		}
		out[n.Name] = env.Subnet.Masked()
	}
	return out
}

// etcdClient talks to the lab's store from inside the router namespace
// (over TLS with --store cluster).
func etcdClient(t *testing.T, l *Lab) *clientv3.Client {
	t.Helper()
	c, err := l.etcd()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func rootLinks(t *testing.T) []string {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	sort.Strings(names)
	return names
}

// The main promise: 3 nodes x 2 pods on host-gw, every row of the
// matrix green, pod source addresses preserved across nodes; and `down`
// leaves no namespace, link, process or file behind, even after kill -9 of
// every lab process.
func TestLabUpCheckDown(t *testing.T) {
	before := rootLinks(t)
	l := upLab(t, Options{Name: "te2e", Nodes: 3, Pods: 2})
	rows := l.Matrix()
	if len(rows) < 20 {
		t.Fatalf("matrix has %d rows, want every kind for 3 nodes", len(rows))
	}
	mustCheck(t, l, rows)

	// The agent says which interface it chose and why, and that it turned
	// forwarding on, on /metrics.
	metrics := httpGet(t, l, "n1", "/metrics")
	for _, want := range []string{
		`loom_underlay_info{chosen_by="-iface eth0",iface="eth0",public_ip="198.18.0.11",public_ipv6=""} 1`,
		`loom_sysctl_value{key="net/ipv4/ip_forward"} 1`,
		`loom_lease_held 1`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("n1's /metrics lacks %s", want)
		}
	}

	seen := map[netip.Prefix]string{}
	for node, s := range subnets(t, l) {
		if other, dup := seen[s]; dup {
			t.Fatalf("nodes %s and %s share subnet %s", node, other, s)
		}
		seen[s] = node
	}

	// A crash of everything: kill -9 every lab process, then down.
	names, _ := netns.List(NSPrefix + l.Opts.Name + "-")
	pids, _ := pidsIn(names)
	if len(pids) < 4 {
		t.Fatalf("found %d lab processes, want the store and 3 agents", len(pids))
	}
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	if err := Down(l.Opts.Name); err != nil {
		t.Fatal(err)
	}
	if left, _ := Leftovers(l.Opts.Name); len(left) > 0 {
		t.Fatalf("down after kill -9 left %v", left)
	}
	if after := rootLinks(t); strings.Join(after, ",") != strings.Join(before, ",") {
		t.Fatalf("root namespace links changed: before %v, after %v", before, after)
	}
}

// rowsFor keeps the matrix rows that involve member.
func rowsFor(rows []Row, member string) []Row {
	var out []Row
	for _, r := range rows {
		if strings.HasPrefix(r.From, member) || strings.HasPrefix(r.To, member) {
			out = append(out, r)
		}
	}
	return out
}

// An agent restart keeps the node's subnet, and its pods keep working while
// the agent is down.
func TestAgentRestartKeepsSubnetAndPods(t *testing.T) {
	l := upLab(t, Options{Name: "trst", Nodes: 2, Pods: 1})
	before := subnets(t, l)
	if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	mustCheck(t, l, rowsFor(l.Matrix(), "n1"))
	if err := l.StartAgent("n1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := l.WaitReady(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	if after := subnets(t, l); after["n1"] != before["n1"] {
		t.Fatalf("n1 subnet changed across restart: %s -> %s", before["n1"], after["n1"])
	}
	mustCheck(t, l, l.Matrix())
}

// Deleting every lease from etcd (etcdctl del --prefix) and restarting the
// agents gives each node back the subnet it had.
func TestLeasesDeletedNodesReclaimSubnets(t *testing.T) {
	l := upLab(t, Options{Name: "tdel", Nodes: 3, Pods: 1})
	before := subnets(t, l)
	c := etcdClient(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, n := range l.Nodes {
		if err := l.StopAgent(n.Name, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := c.Delete(ctx, "/coreos.com/network/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Deleted != 3 {
		t.Fatalf("deleted %d leases, want 3", resp.Deleted)
	}
	for _, n := range l.Nodes {
		if err := l.StartAgent(n.Name); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range l.Nodes {
		if err := l.WaitReady(ctx, n.Name); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	after := subnets(t, l)
	for node, s := range before {
		if after[node] != s {
			t.Errorf("%s: subnet %s before the leases were deleted, %s after", node, s, after[node])
		}
	}
	got, err := c.Get(ctx, "/coreos.com/network/subnets/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if got.Count != 3 {
		t.Fatalf("registry holds %d leases after restart, want 3", got.Count)
	}
	mustCheck(t, l, l.Matrix())
}

// A route someone deletes by hand comes back within one resync (5 s).
func TestDeletedRouteComesBack(t *testing.T) {
	l := upLab(t, Options{Name: "troute", Nodes: 2, Pods: 1, Backend: "host-gw"})
	s := subnets(t, l)
	n1, _ := l.Node("n1")
	h, err := openHandle(n1.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	dst := s["n2"]
	find := func() *netlink.Route {
		routes, err := h.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range routes {
			if r.Dst != nil && r.Dst.String() == dst.String() {
				return &r
			}
		}
		return nil
	}
	r := find()
	if r == nil {
		t.Fatalf("n1 has no route to n2's subnet %s", dst)
	}
	n2, _ := l.Node("n2")
	if r.Gw.String() != n2.Underlay.Addr().String() {
		t.Fatalf("route to %s goes via %s, want n2's address %s", dst, r.Gw, n2.Underlay.Addr())
	}
	if err := h.RouteDel(r); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5*time.Second + 3*time.Second) // one resync plus slack for a busy machine
	for find() == nil {
		if time.Now().After(deadline) {
			t.Fatalf("route to %s not restored within one resync", dst)
		}
		time.Sleep(100 * time.Millisecond)
	}
	mustCheck(t, l, rowsFor(l.Matrix(), "n1-p1"))
}

// A second node claiming a live node's public IP refuses to start, naming
// both nodes and the -iface fix.
func TestDuplicatePublicIPRefused(t *testing.T) {
	l := upLab(t, Options{Name: "tdup", Nodes: 2, Pods: 0})
	n1, _ := l.Node("n1")
	n2, _ := l.Node("n2")
	dir := t.TempDir()
	args := []string{"netns", "exec", n2.NS, filepath.Join(binDir, "loom"), "agent",
		"--node-name", "intruder",
		"--etcd-endpoints", l.StoreEndpoint(),
		"--iface", "eth0",
		"--public-ip", n1.Underlay.Addr().String(),
		"--subnet-file", filepath.Join(dir, "subnet.env"),
		"--state-dir", dir,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err == nil {
		t.Fatalf("agent with n1's public IP started:\n%s", out)
	}
	if ctx.Err() != nil {
		t.Fatalf("agent with n1's public IP did not exit: %s", out)
	}
	msg := string(out)
	for _, want := range []string{n1.Underlay.Addr().String(), "n1", "intruder", "-iface"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error does not mention %q:\n%s", want, msg)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "subnet.env")); err == nil {
		t.Error("refused agent wrote a subnet.env")
	}
}

// With nodes on two underlay subnets, host-gw routes between the nodes that
// share a segment, installs no route to the others, and says why in the
// agent log, naming the peer and the fix.
func TestRoutedUnderlayHostGWNotOnLink(t *testing.T) {
	l := upLab(t, Options{Name: "trtd", Nodes: 3, Pods: 1, Underlay: "routed", Backend: "host-gw"})
	rows := l.Matrix()
	refused := 0
	for _, r := range rows {
		if r.WantFail {
			refused++
		}
	}
	if refused == 0 {
		t.Fatal("routed host-gw matrix has no row for the other segment")
	}
	mustCheck(t, l, rows)
	data, err := os.ReadFile(filepath.Join(l.NodeDir("n1"), "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	n2, _ := l.Node("n2")
	log := string(data)
	for _, want := range []string{"not on-link", "node=n2", n2.Underlay.Addr().String(), "use the vxlan backend"} {
		if !strings.Contains(log, want) {
			t.Errorf("n1's agent log does not mention %q:\n%s", want, lastLines(data, 20))
		}
	}
}

// httpGet fetches a path from a node agent's health server.
func httpGet(t *testing.T, l *Lab, node, path string) string {
	t.Helper()
	n, err := l.Node(node)
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{DialContext: netns.Dialer{NS: n.NS}.DialContext}, Timeout: 5 * time.Second}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d%s", healthzPort, path))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}
