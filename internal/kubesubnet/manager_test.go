package kubesubnet

// Fast tests of the manager's logic on client-go's fake clientset. The same
// behaviour against a real kube-apiserver and kube-controller-manager is in
// kubecp_test.go; these exist to run in a second without binaries.
//
// Address plan: as in annotations_test.go.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/registry"
)

// logBuf collects a test's log lines.
type logBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *logBuf) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// eventually polls f every 20 ms until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, f func() bool) {
	t.Helper()
	for end := time.Now().Add(d); !f(); {
		if time.Now().After(end) {
			t.Fatalf("not within %v: %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var testNet = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`

func vxlanRequest(t *testing.T, node, publicIP string) registry.Request {
	return registry.Request{
		NodeName: node,
		Config:   mustConfig(t, testNet),
		Attrs:    lease.Attrs{PublicIP: netip.MustParseAddr(publicIP), BackendType: "vxlan", BackendData: json.RawMessage(vxlanData)},
	}
}

type fakeEnv struct {
	cs   *fake.Clientset
	logs *logBuf
}

// fakeNodes is the manager's NodeAPI on the fake clientset.
type fakeNodes struct{ cs *fake.Clientset }

func (f fakeNodes) Get(ctx context.Context, name string) (*v1.Node, error) {
	return f.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
}

func (f fakeNodes) List(ctx context.Context, opts metav1.ListOptions) (*v1.NodeList, error) {
	return f.cs.CoreV1().Nodes().List(ctx, opts)
}

func (f fakeNodes) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	return f.cs.CoreV1().Nodes().Watch(ctx, opts)
}

func (f fakeNodes) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, subresources ...string) (*v1.Node, error) {
	return f.cs.CoreV1().Nodes().Patch(ctx, name, pt, data, metav1.PatchOptions{}, subresources...)
}

// IsWatchListSemanticsUnSupported keeps the informer's reflector on LIST
// then WATCH: the fake's watch never sends a watch-list stream's bookmark.
func (f fakeNodes) IsWatchListSemanticsUnSupported() bool { return true }

func newFakeEnv(objs ...runtime.Object) *fakeEnv {
	return &fakeEnv{cs: fake.NewClientset(objs...), logs: &logBuf{}}
}

// manager starts a manager for node on a client of its own, as a restarted
// agent would have.
func (e *fakeEnv) manager(t *testing.T, node string, metrics prometheus.Registerer) *Manager {
	t.Helper()
	return e.managerWith(t, node, metrics, func(*Config) {})
}

// managerWith is manager with a Config changed by edit.
func (e *fakeEnv) managerWith(t *testing.T, node string, metrics prometheus.Registerer, edit func(*Config)) *Manager {
	t.Helper()
	// The client's connection is never used (the fake answers every
	// request); it runs the shared informer.
	c, err := NewClient(ClientConfig{REST: &rest.Config{Host: "http://127.0.0.1:1"}, Logger: e.logs.logger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cfg := Config{Client: c, Nodes: fakeNodes{e.cs}, NodeName: node, Network: mustConfig(t, testNet), Logger: e.logs.logger(), Metrics: metrics, WaitLogEvery: 100 * time.Millisecond}
	edit(&cfg)
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// keep runs Keep until the test ends and returns its leases and its error.
func keep(t *testing.T, m *Manager, req registry.Request) (<-chan lease.Lease, <-chan error) {
	ctx, cancel := context.WithCancel(context.Background())
	leases, errc := make(chan lease.Lease, 8), make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		errc <- m.Keep(ctx, req, func(l lease.Lease) { leases <- l })
	}()
	t.Cleanup(func() { cancel(); <-done })
	return leases, errc
}

func (e *fakeEnv) writes() int {
	n := 0
	for _, a := range e.cs.Actions() {
		switch a.GetVerb() {
		case "patch", "update", "create":
			n++
		}
	}
	return n
}

func (e *fakeEnv) node(t *testing.T, name string) *v1.Node {
	t.Helper()
	n, err := e.cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestKeepWritesOnceAndReports(t *testing.T) {
	e := newFakeEnv(node("n1", []string{"10.244.1.0/24"}, nil))
	leases, errc := keep(t, e.manager(t, "n1", nil), vxlanRequest(t, "n1", "198.18.0.11"))
	var l lease.Lease
	select {
	case l = <-leases:
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatalf("no lease; log:\n%s", e.logs)
	}
	if l.Subnet != netip.MustParsePrefix("10.244.1.0/24") || l.Attrs.NodeName != "n1" || l.Attrs.PublicIP != netip.MustParseAddr("198.18.0.11") || l.Reserved() {
		t.Errorf("lease %+v", l)
	}
	n := e.node(t, "n1")
	for k, v := range map[string]string{
		pfx + "kube-subnet-manager": "true", pfx + "backend-type": "vxlan", pfx + "backend-data": vxlanData, pfx + "public-ip": "198.18.0.11",
	} {
		if n.Annotations[k] != v {
			t.Errorf("annotation %s = %q, want %q", k, n.Annotations[k], v)
		}
	}
	if !networkAvailable(n) {
		t.Errorf("conditions %+v, want NetworkUnavailable False", n.Status.Conditions)
	}
	if w := e.writes(); w != 1 {
		t.Errorf("%d writes, want 1 (annotations and condition in one patch)", w)
	}

	// A restart: a new manager finds everything in place and writes nothing.
	before := e.writes()
	leases2, errc2 := keep(t, e.manager(t, "n1", nil), vxlanRequest(t, "n1", "198.18.0.11"))
	select {
	case l2 := <-leases2:
		if !sameLease(l, l2) {
			t.Errorf("after restart lease %+v, want %+v", l2, l)
		}
	case err := <-errc2:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatal("no lease after restart")
	}
	if w := e.writes() - before; w != 0 {
		t.Errorf("restart made %d writes, want none", w)
	}
}

func TestKeepPodCIDROutsideNetwork(t *testing.T) {
	e := newFakeEnv(node("n1", []string{"10.245.1.0/24"}, nil))
	_, errc := keep(t, e.manager(t, "n1", nil), vxlanRequest(t, "n1", "198.18.0.11"))
	select {
	case err := <-errc:
		want := `node n1 has podCIDR 10.245.1.0/24 (from kube-controller-manager --cluster-cidr), which is not inside Network 10.244.0.0/16 of /etc/kube-flannel/net-conf.json: ` +
			`set "Network" to the cluster's pod CIDR (kubeadm --pod-network-cidr / kube-controller-manager --cluster-cidr), or re-create the cluster with --pod-network-cidr=10.244.0.0/16`
		if err == nil || err.Error() != want {
			t.Fatalf("error:\n got  %v\n want %s", err, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Keep did not fail")
	}
	if e.writes() != 0 {
		t.Error("a node outside Network was annotated")
	}
}

func TestKeepWaitsForPodCIDR(t *testing.T) {
	e := newFakeEnv(node("n1", nil, nil))
	m := e.manager(t, "n1", nil)
	if err := m.Waiting(); err == nil || err.Error() != "no subnet lease yet" {
		t.Errorf("Waiting() before Keep = %v, want no subnet lease yet", err)
	}
	leases, errc := keep(t, m, vxlanRequest(t, "n1", "198.18.0.11"))
	eventually(t, 5*time.Second, "pod cidr log", func() bool {
		return strings.Count(e.logs.String(), "pod cidr not assigned to node n1") >= 2
	})
	for _, s := range []string{"--allocate-node-cidrs=true", "--cluster-cidr=10.244.0.0/16", "level=ERROR"} {
		if !strings.Contains(e.logs.String(), s) {
			t.Errorf("log does not say %s:\n%s", s, e.logs)
		}
	}
	select {
	case l := <-leases:
		t.Fatalf("lease %v without a podCIDR", l)
	case err := <-errc:
		t.Fatal(err)
	default:
	}
	// What the agent's /readyz says meanwhile: the log's own words.
	if err := m.Waiting(); !errors.Is(err, ErrNoPodCIDR) || !strings.HasPrefix(err.Error(), "pod cidr not assigned to node n1: ") {
		t.Errorf("Waiting() = %v, want the pod cidr error", err)
	}
	n := e.node(t, "n1")
	n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.244.7.0/24", []string{"10.244.7.0/24"}
	if _, err := e.cs.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case l := <-leases:
		if l.Subnet != netip.MustParsePrefix("10.244.7.0/24") {
			t.Errorf("lease %v", l)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no lease after the podCIDR was set")
	}
	if err := m.Waiting(); err != nil {
		t.Errorf("Waiting() with a lease = %v, want nil", err)
	}
}

// flanneld's -set-node-network-unavailable=false: the annotations are
// written, the NetworkUnavailable condition is not touched, whatever it
// says.
func TestLeaveNetworkUnavailable(t *testing.T) {
	n1 := node("n1", []string{"10.244.1.0/24"}, nil)
	n1.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeNetworkUnavailable, Status: v1.ConditionTrue, Reason: "NoRouteCreated"}}
	e := newFakeEnv(n1)
	m := e.managerWith(t, "n1", nil, func(c *Config) { c.LeaveNetworkUnavailable = true })
	leases, errc := keep(t, m, vxlanRequest(t, "n1", "198.18.0.11"))
	select {
	case <-leases:
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(10 * time.Second):
		t.Fatalf("no lease; log:\n%s", e.logs)
	}
	n := e.node(t, "n1")
	if n.Annotations[pfx+"public-ip"] != "198.18.0.11" {
		t.Errorf("annotations %v, want them written", n.Annotations)
	}
	if len(n.Status.Conditions) != 1 || n.Status.Conditions[0].Status != v1.ConditionTrue || n.Status.Conditions[0].Reason != "NoRouteCreated" {
		t.Errorf("conditions %+v, want NetworkUnavailable left True", n.Status.Conditions)
	}
	if w := e.writes(); w != 1 {
		t.Errorf("%d writes, want 1 (the annotations)", w)
	}
}

// NodeSubnets says why a Node's podCIDRs cannot be its node's subnet in
// the words both the agent and doctor use.
func TestNodeSubnets(t *testing.T) {
	v4 := mustConfig(t, testNet)
	dual := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`)
	v6only := mustConfig(t, `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`)
	const path = "/etc/kube-flannel/net-conf.json"
	for _, tc := range []struct {
		name           string
		node           *v1.Node
		cfg            netconf.Config
		wantV4, wantV6 string
		kind           error
		text           string // the whole error
	}{
		{name: "IPv4", node: node("n1", []string{"10.244.1.0/24"}, nil), cfg: v4, wantV4: "10.244.1.0/24"},
		{name: "dual stack", node: node("n1", []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, nil), cfg: dual, wantV4: "10.244.1.0/24", wantV6: "fd00:10:244:1::/64"},
		{name: "a family the config does not enable is left out", node: node("n1", []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, nil), cfg: v6only, wantV6: "fd00:10:244:1::/64"},
		{name: "none assigned", node: node("n1", nil, nil), cfg: v4, kind: ErrNoPodCIDR,
			text: `pod cidr not assigned to node n1: kube-controller-manager assigns it only with --allocate-node-cidrs=true and --cluster-cidr=10.244.0.0/16 ` +
				`(kubeadm init --pod-network-cidr=10.244.0.0/16, the Network of /etc/kube-flannel/net-conf.json; on a running cluster add both flags to ` +
				`/etc/kubernetes/manifests/kube-controller-manager.yaml, and Nodes without a podCIDR get one); ` +
				`or set it by hand: kubectl patch node n1 -p '{"spec":{"podCIDR":"SUBNET","podCIDRs":["SUBNET"]}}'`},
		{name: "outside Network", node: node("n1", []string{"10.245.1.0/24"}, nil), cfg: v4, kind: ErrPodCIDROutsideNetwork,
			text: `node n1 has podCIDR 10.245.1.0/24 (from kube-controller-manager --cluster-cidr), which is not inside Network 10.244.0.0/16 of /etc/kube-flannel/net-conf.json: ` +
				`set "Network" to the cluster's pod CIDR (kubeadm --pod-network-cidr / kube-controller-manager --cluster-cidr), or re-create the cluster with --pod-network-cidr=10.244.0.0/16`},
		{name: "larger than Network", node: node("n1", []string{"10.0.0.0/8"}, nil), cfg: v4, kind: ErrPodCIDROutsideNetwork},
		{name: "outside IPv6Network", node: node("n1", []string{"10.244.1.0/24", "fd00:99::/64"}, nil), cfg: dual, kind: ErrPodCIDROutsideNetwork},
		{name: "no IPv6 podCIDR in dual stack", node: node("n1", []string{"10.244.1.0/24"}, nil), cfg: dual, kind: ErrPodCIDRFamily,
			text: `node n1 has no IPv6 podCIDR (podCIDRs [10.244.1.0/24]), but /etc/kube-flannel/net-conf.json enables IPv6: ` +
				`give kube-controller-manager an IPv6 --cluster-cidr (kubeadm --pod-network-cidr), or set "EnableIPv6": false`},
		{name: "host bits", node: node("n1", []string{"10.244.1.7/24"}, nil), cfg: v4, kind: ErrBadPodCIDR,
			text: `node n1: podCIDR 10.244.1.7/24 has host bits set: kube-controller-manager never writes that; fix the Node's spec or delete the Node and let its kubelet register it again`},
		{name: "only spec.podCIDR", node: &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}, Spec: v1.NodeSpec{PodCIDR: "10.244.1.0/24"}}, cfg: v4, wantV4: "10.244.1.0/24"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v4, v6, err := NodeSubnets(tc.node, tc.cfg, path)
			if tc.kind == nil {
				if err != nil || v4.String() != orInvalid(tc.wantV4) || v6.String() != orInvalid(tc.wantV6) {
					t.Fatalf("got %v %v %v, want %s %s", v4, v6, err, tc.wantV4, tc.wantV6)
				}
				return
			}
			var pe *PodCIDRError
			if !errors.Is(err, tc.kind) || !errors.As(err, &pe) || pe.Node != "n1" || err.Error() != pe.Problem+": "+pe.Fix {
				t.Fatalf("got %v, want a PodCIDRError of kind %v", err, tc.kind)
			}
			if tc.text != "" && err.Error() != tc.text {
				t.Errorf("error:\n got  %s\n want %s", err, tc.text)
			}
		})
	}
}

func orInvalid(s string) string {
	if s == "" {
		return netip.Prefix{}.String()
	}
	return s
}

// TestPeers covers the peer stream: the first list, a Node that stops
// qualifying, a deleted one, a changed podCIDR, and hostile Nodes skipped
// with their reason.
func TestPeers(t *testing.T) {
	hostileJSON := flannelNode("n4", "10.244.4.0/24", "198.18.0.14")
	hostileJSON.Annotations[pfx+"backend-data"] = "not json"
	e := newFakeEnv(
		flannelNode("n2", "10.244.2.0/24", "198.18.0.12"),
		flannelNode("n3", "10.244.3.0/24", "198.18.0.13"),
		hostileJSON,
		flannelNode("n5", "10.244.2.0/25", "198.18.0.15"), // overlaps n2
		flannelNode("n6", "10.244.6.0/24", "127.0.0.1"),
		node("n7", []string{"10.244.7.0/24"}, nil), // not (yet) a peer
	)
	metrics := prometheus.NewRegistry()
	m := e.manager(t, "n1", metrics)
	guard := m.Guard(mustConfig(t, testNet))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	known, _, err := m.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu     sync.Mutex
		events []lease.Event
	)
	record := func(ev []lease.Event) {
		mu.Lock()
		defer mu.Unlock()
		events = append(events, guard.Filter(ev)...)
	}
	record(func() []lease.Event {
		var ev []lease.Event
		for _, l := range known {
			ev = append(ev, lease.Event{Type: lease.Added, Lease: &l})
		}
		return ev
	}())
	got := func() []string {
		mu.Lock()
		defer mu.Unlock()
		var s []string
		for _, e := range events {
			s = append(s, e.Type.String()+" "+e.Lease.String())
		}
		events = nil
		return s
	}
	if g, want := strings.Join(got(), "; "), "added 10.244.2.0-24 (node n2); added 10.244.3.0-24 (node n3)"; g != want {
		t.Fatalf("first list:\n got  %s\n want %s\nlog:\n%s", g, want, e.logs)
	}
	for reason, n := range map[string]float64{registry.SkipUndecodable: 1, registry.SkipOverlap: 1, registry.SkipBadPublicIP: 1} {
		if c := counterValue(t, m.skipped.WithLabelValues(reason)); c != n {
			t.Errorf("loom_leases_skipped_total{reason=%q} = %v, want %v", reason, c, n)
		}
	}
	if !strings.Contains(e.logs.String(), "kubectl") {
		t.Errorf("skips logged without a kubectl fix:\n%s", e.logs)
	}

	wctx, wcancel := context.WithCancel(ctx)
	watchDone := make(chan error, 1)
	go func() { watchDone <- m.Watch(wctx, 0, known, record) }()
	defer func() { wcancel(); <-watchDone }()

	nodes := e.cs.CoreV1().Nodes()
	// Deleting a Node is deliberate: it is removed at once, and the Node
	// it shadowed (n5 overlapped n2) gets through.
	if err := nodes.Delete(ctx, "n2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	expect := func(want string) {
		t.Helper()
		var g []string
		eventually(t, 5*time.Second, want, func() bool {
			g = append(g, got()...)
			return strings.Join(g, "; ") == want
		})
	}
	expect("removed 10.244.2.0-24 (node n2); added 10.244.2.0-25 (node n5)")

	// The kube-subnet-manager annotation gone: no longer a peer.
	n3 := e.node(t, "n3")
	delete(n3.Annotations, pfx+"kube-subnet-manager")
	if _, err := nodes.Update(ctx, n3, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	expect("removed 10.244.3.0-24 (node n3)")

	// n7 starts qualifying; then its public IP changes: Added twice.
	n7 := flannelNode("n7", "10.244.7.0/24", "198.18.0.17")
	if _, err := nodes.Update(ctx, n7, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	expect("added 10.244.7.0-24 (node n7)")
	n7.Annotations[pfx+"public-ip"] = "198.18.0.27"
	if _, err := nodes.Update(ctx, n7, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	expect("added 10.244.7.0-24 (node n7)")

	// Deleted and registered again with another podCIDR: the old lease
	// goes, the new one comes.
	if err := nodes.Delete(ctx, "n7", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := nodes.Create(ctx, flannelNode("n7", "10.244.8.0/24", "198.18.0.17"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	expect("removed 10.244.7.0-24 (node n7); added 10.244.8.0-24 (node n7)")
}

func counterValue(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := c.Write(&d); err != nil {
		t.Fatal(err)
	}
	return d.GetCounter().GetValue()
}

// The node's node-public-ip annotation replaces -public-ip, as in
// flanneld; a Node not registered yet has none.
func TestManagerNodePublicIPs(t *testing.T) {
	n1 := node("n1", []string{"10.244.1.0/24"}, map[string]string{pfx + "node-public-ip": "198.18.1.11"})
	e := newFakeEnv(n1)
	ctx := context.Background()
	v4, v6, err := e.manager(t, "n1", nil).NodePublicIPs(ctx)
	if err != nil || v4 != netip.MustParseAddr("198.18.1.11") || v6.IsValid() {
		t.Errorf("NodePublicIPs = %v, %v, %v", v4, v6, err)
	}
	if v4, _, err := e.manager(t, "not-registered", nil).NodePublicIPs(ctx); err != nil || v4.IsValid() {
		t.Errorf("NodePublicIPs of a Node not registered yet = %v, %v; want none", v4, err)
	}
}
