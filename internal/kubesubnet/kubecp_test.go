package kubesubnet

// Tests against a real kube-apiserver and kube-controller-manager (kubecp:
// the binaries of `make kube-bins`, on free ports of 127.0.0.1). The
// managers here are two or three "nodes" in the test process: Node objects
// without kubelets, no kernel state, so no root is needed. The agent's user
// has exactly the RBAC rules of flannel's kube-flannel.yml, so what works
// here works where flanneld ran.
//
// Address plan: pods 10.244.0.0/16 (the control plane's --cluster-cidr,
// node /24s; nodes written by hand take 10.244.240.0/20), Services
// 10.96.0.0/12, node public addresses 198.18.0.0/24 (annotations only,
// nothing is configured), 127.0.0.1 for the control plane.

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	authv1 "k8s.io/api/authorization/v1"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/loomnet/loom/internal/kubecp"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/registry"
	"github.com/loomnet/loom/internal/testnet"
)

// agentUser is flanneld's identity in kube-flannel.yml: its ServiceAccount.
var agentUser = kubecp.User{
	Name:   "system:serviceaccount:kube-flannel:flannel",
	Groups: []string{"system:serviceaccounts", "system:serviceaccounts:kube-flannel"},
}

// flannelRBAC is what kube-flannel.yml grants flanneld, and all loom may
// use: read Nodes, patch nodes/status (and get Pods, to find its node).
const flannelRBAC = `
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: flannel}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [nodes/status]
  verbs: [patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: flannel}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: flannel}
subjects:
- {kind: ServiceAccount, name: flannel, namespace: kube-flannel}
`

// cluster is a running control plane with flannel's RBAC in place.
type cluster struct {
	cp    *kubecp.ControlPlane
	dir   string
	admin kubernetes.Interface
	agent *rest.Config // the agent user's connection
}

// newCluster starts a control plane; clusterCIDR zero turns podCIDR
// allocation off.
func newCluster(clusterCIDR netip.Prefix) (_ *cluster, err error) {
	c := &cluster{}
	if c.dir, err = os.MkdirTemp("", "loom-kubesubnet-"); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if c.cp, err = kubecp.Start(ctx, kubecp.Config{Dir: c.dir, ClusterCIDR: clusterCIDR, Users: []kubecp.User{agentUser}}); err != nil {
		return nil, fmt.Errorf("start the control plane: %w", err)
	}
	arc, err := clientcmd.BuildConfigFromFlags("", c.cp.AdminKubeconfig)
	if err != nil {
		return nil, err
	}
	if c.admin, err = kubernetes.NewForConfig(arc); err != nil {
		return nil, err
	}
	if out, err := c.cp.Apply(ctx, "", flannelRBAC); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, out)
	}
	kc, err := c.cp.Kubeconfig(agentUser.Name)
	if err != nil {
		return nil, err
	}
	if c.agent, err = clientcmd.BuildConfigFromFlags("", kc); err != nil {
		return nil, err
	}
	// RBAC reaches the authorizer's cache a moment after the write.
	agent, err := kubernetes.NewForConfig(c.agent)
	if err != nil {
		return nil, err
	}
	for {
		r, err := agent.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authv1.SelfSubjectAccessReview{Spec: authv1.SelfSubjectAccessReviewSpec{
			ResourceAttributes: &authv1.ResourceAttributes{Verb: "patch", Resource: "nodes", Subresource: "status"}}}, metav1.CreateOptions{})
		if err == nil && r.Status.Allowed {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("flannel's RBAC not in effect: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *cluster) stop() {
	if c.cp != nil {
		c.cp.Stop()
	}
	os.RemoveAll(c.dir)
}

// startCluster starts a control plane of t's own.
func startCluster(t *testing.T, clusterCIDR netip.Prefix) *cluster {
	t.Helper()
	c, err := newCluster(clusterCIDR)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.stop)
	return c
}

// sharedCP is the control plane with --cluster-cidr=10.244.0.0/16 most
// tests share (starting one costs seconds); each test uses Node names of
// its own and deletes its Nodes. TestMain stops it. It is the only global
// of the package, and exists only in its tests.
var sharedCP struct {
	once sync.Once
	c    *cluster
	err  error
}

func sharedCluster(t *testing.T) *cluster {
	t.Helper()
	sharedCP.once.Do(func() { sharedCP.c, sharedCP.err = newCluster(netip.MustParsePrefix("10.244.0.0/16")) })
	if sharedCP.err != nil {
		t.Fatal(sharedCP.err)
	}
	return sharedCP.c
}

// binDir holds the loom binary TestMain builds (as root) for
// TestAgentProcess.
var binDir string

func TestMain(m *testing.M) {
	var code int
	if os.Getenv(inNetnsEnv) != "" {
		code = m.Run() // the second run of TestAgentProcess: already built
	} else {
		code = testnet.MainWithBinaries(m, func(dir string) { binDir = dir })
	}
	if sharedCP.c != nil {
		sharedCP.c.stop()
	}
	os.Exit(code)
}

// createNode creates a Node as a kubelet registers one: no podCIDR, no
// annotations; kube-controller-manager assigns the podCIDR.
func (c *cluster) createNode(t *testing.T, n *v1.Node) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.admin.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.admin.CoreV1().Nodes().Delete(context.Background(), n.Name, metav1.DeleteOptions{}) })
}

func (c *cluster) getNode(t *testing.T, name string) *v1.Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n, err := c.admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// agentNode is one agent in the test process.
type agentNode struct {
	m      *Manager
	logs   *logBuf
	writes *atomic.Int64 // requests other than GET, LIST, WATCH
	leases chan lease.Lease
	errc   chan error
	stop   func()
}

// start runs a manager for node name holding req, as the agent would:
// its own client (flannel's identity), Keep in the background.
func (c *cluster) start(t *testing.T, name, network string, req registry.Request) *agentNode {
	t.Helper()
	a := &agentNode{logs: &logBuf{}, writes: &atomic.Int64{}, leases: make(chan lease.Lease, 8), errc: make(chan error, 1)}
	rc := rest.CopyConfig(c.agent)
	rc.WrapTransport = func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(r *http.Request) (*http.Response, error) {
			if r.Method != http.MethodGet {
				a.writes.Add(1)
			}
			return rt.RoundTrip(r)
		})
	}
	client, err := NewClient(ClientConfig{REST: rc, Logger: a.logs.logger(), Metrics: prometheus.NewRegistry(), MonitorEvery: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	req.Config = mustConfig(t, network)
	a.m, err = New(Config{Client: client, NodeName: name, Network: req.Config, Logger: a.logs.logger(), Metrics: prometheus.NewRegistry(), WaitLogEvery: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.errc <- a.m.Keep(ctx, req, func(l lease.Lease) { a.leases <- l })
	}()
	var once sync.Once
	a.stop = func() {
		once.Do(func() {
			cancel()
			<-done
			a.m.Close()
			client.Close()
		})
	}
	t.Cleanup(a.stop)
	return a
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// lease waits for the next lease Keep reports.
func (a *agentNode) lease(t *testing.T, d time.Duration) lease.Lease {
	t.Helper()
	select {
	case l := <-a.leases:
		return l
	case err := <-a.errc:
		t.Fatalf("Keep: %v\nlog:\n%s", err, a.logs)
	case <-time.After(d):
		t.Fatalf("no lease within %v; log:\n%s", d, a.logs)
	}
	return lease.Lease{}
}

const network = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`

func vxlanReq(node, publicIP, mac string) registry.Request {
	return registry.Request{NodeName: node, Attrs: lease.Attrs{
		PublicIP:    netip.MustParseAddr(publicIP),
		BackendType: "vxlan",
		BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"` + mac + `"}`),
	}}
}

// flannelAnnotations are the annotations flanneld v0.28 writes for a vxlan
// node (pkg/subnet/kube: prefix + name, backend-data its vxlanLeaseAttrs
// JSON), and nothing else.
func flannelAnnotations(publicIP, mac string) map[string]string {
	return map[string]string{
		"flannel.alpha.coreos.com/kube-subnet-manager": "true",
		"flannel.alpha.coreos.com/backend-type":        "vxlan",
		"flannel.alpha.coreos.com/backend-data":        `{"VNI":1,"VtepMAC":"` + mac + `"}`,
		"flannel.alpha.coreos.com/public-ip":           publicIP,
	}
}

func ownAnnotations(n *v1.Node) map[string]string {
	out := map[string]string{}
	for k, v := range n.Annotations {
		if strings.HasPrefix(k, "flannel.alpha.coreos.com/") {
			out[k] = v
		}
	}
	return out
}

// peerStream runs List and Watch for a as the agent does, and records the
// events that pass the Guard.
type peerStream struct {
	mu     sync.Mutex
	events []lease.Event
}

func (p *peerStream) take() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var s []string
	for _, e := range p.events {
		s = append(s, e.Type.String()+" "+e.Lease.Attrs.NodeName+" "+e.Lease.Key())
	}
	p.events = nil
	return s
}

func (a *agentNode) peers(t *testing.T) *peerStream {
	t.Helper()
	p := &peerStream{}
	guard := a.m.Guard(a.m.cfg.Network)
	deliver := func(ev []lease.Event) {
		ev = guard.Filter(ev)
		p.mu.Lock()
		p.events = append(p.events, ev...)
		p.mu.Unlock()
	}
	ctx, cancel := context.WithCancel(context.Background())
	known, rev, err := a.m.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var first []lease.Event
	for _, l := range known {
		first = append(first, lease.Event{Type: lease.Added, Lease: &l})
	}
	deliver(first)
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.m.Watch(ctx, rev, known, deliver)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return p
}

// TestTwoNodes is the main path: kube-controller-manager assigns podCIDRs,
// two agents take them, annotate their Nodes as flanneld does, mark the
// network available, see each other, and a deleted Node is gone at once.
// A restarted agent writes nothing and gets the same lease.
func TestTwoNodes(t *testing.T) {
	c := sharedCluster(t)
	for _, n := range []string{"two-n1", "two-n2"} {
		c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}})
	}
	a1 := c.start(t, "two-n1", network, vxlanReq("two-n1", "198.18.0.11", "5e:1f:0a:9c:33:01"))
	a2 := c.start(t, "two-n2", network, vxlanReq("two-n2", "198.18.0.12", "5e:1f:0a:9c:33:02"))
	l1, l2 := a1.lease(t, 30*time.Second), a2.lease(t, 30*time.Second)

	for _, tc := range []struct {
		a        *agentNode
		l        lease.Lease
		name, ip string
		mac      string
	}{{a1, l1, "two-n1", "198.18.0.11", "5e:1f:0a:9c:33:01"}, {a2, l2, "two-n2", "198.18.0.12", "5e:1f:0a:9c:33:02"}} {
		n := c.getNode(t, tc.name)
		if tc.l.Subnet.String() != n.Spec.PodCIDR || tc.l.Subnet.Bits() != 24 || !netip.MustParsePrefix("10.244.0.0/16").Contains(tc.l.Subnet.Addr()) {
			t.Errorf("%s: lease %s, Node's podCIDR %s", tc.name, tc.l.Subnet, n.Spec.PodCIDR)
		}
		if got, want := ownAnnotations(n), flannelAnnotations(tc.ip, tc.mac); !maps.Equal(got, want) {
			t.Errorf("%s annotations:\n got  %q\n want %q", tc.name, got, want)
		}
		var cond *v1.NodeCondition
		for i := range n.Status.Conditions {
			if n.Status.Conditions[i].Type == v1.NodeNetworkUnavailable {
				cond = &n.Status.Conditions[i]
			}
		}
		if cond == nil || cond.Status != v1.ConditionFalse || cond.Reason != "LoomIsUp" {
			t.Errorf("%s: NetworkUnavailable condition %+v, want False with reason LoomIsUp", tc.name, cond)
		}
		if w := tc.a.writes.Load(); w != 1 {
			t.Errorf("%s: %d writes, want 1 (annotations and condition in one patch)", tc.name, w)
		}
	}

	p1, p2 := a1.peers(t), a2.peers(t)
	want := func(p *peerStream, what string, lines ...string) {
		t.Helper()
		var got []string
		eventually(t, 10*time.Second, what, func() bool {
			got = append(got, p.take()...)
			return strings.Join(got, "; ") == strings.Join(lines, "; ")
		})
	}
	// Each lists itself first (as the etcd registry does), then the other.
	want(p1, "two-n1 sees two-n2", "added two-n1 "+l1.Key(), "added two-n2 "+l2.Key())
	want(p2, "two-n2 sees two-n1", "added two-n2 "+l2.Key(), "added two-n1 "+l1.Key())

	// Deleting a Node is deliberate: its routes go at once.
	start := time.Now()
	if err := c.admin.CoreV1().Nodes().Delete(context.Background(), "two-n2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want(p1, "two-n1 drops two-n2", "removed two-n2 "+l2.Key())
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("removal took %v", d)
	}

	// two-n2 registers again and gets another podCIDR (set here by hand,
	// as the allocator may hand the old one back): its agent takes it,
	// loudly, annotates the new Node, and two-n1 learns it.
	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "two-n2"}, Spec: v1.NodeSpec{PodCIDR: "10.244.250.0/24", PodCIDRs: []string{"10.244.250.0/24"}}})
	if l := a2.lease(t, 10*time.Second); l.Subnet != netip.MustParsePrefix("10.244.250.0/24") {
		t.Errorf("lease after the Node came back: %v", l)
	}
	if !strings.Contains(a2.logs.String(), "level=ERROR msg=\"SUBNET CHANGED") || !strings.Contains(a2.logs.String(), "old="+l2.Key()) {
		t.Errorf("no SUBNET CHANGED error naming the old subnet:\n%s", a2.logs)
	}
	want(p1, "two-n1 learns two-n2's new subnet", "added two-n2 10.244.250.0-24")
	if got := ownAnnotations(c.getNode(t, "two-n2")); !maps.Equal(got, flannelAnnotations("198.18.0.12", "5e:1f:0a:9c:33:02")) {
		t.Errorf("two-n2 annotations after it came back: %q", got)
	}

	// A restart changes nothing: no write at all, the same lease.
	before := c.getNode(t, "two-n1")
	a1.stop()
	a1b := c.start(t, "two-n1", network, vxlanReq("two-n1", "198.18.0.11", "5e:1f:0a:9c:33:01"))
	if l := a1b.lease(t, 30*time.Second); !sameLease(l, l1) {
		t.Errorf("after restart lease %+v, want %+v", l, l1)
	}
	time.Sleep(time.Second) // time for any write it would make
	after := c.getNode(t, "two-n1")
	if w := a1b.writes.Load(); w != 0 || after.ResourceVersion != before.ResourceVersion {
		t.Errorf("restart: %d writes, resourceVersion %s -> %s; want no write", w, before.ResourceVersion, after.ResourceVersion)
	}

	// Annotations someone removes come back.
	patch := `{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":null,"flannel.alpha.coreos.com/public-ip":null}}}`
	if _, err := c.cp.Kubectl(context.Background(), "", "patch", "node", "two-n1", "-p", patch); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "annotations written back", func() bool {
		return maps.Equal(ownAnnotations(c.getNode(t, "two-n1")), flannelAnnotations("198.18.0.11", "5e:1f:0a:9c:33:01"))
	})
}

// TestHostGWAnnotations: flanneld writes "null" backend data for host-gw.
func TestHostGWAnnotations(t *testing.T) {
	c := sharedCluster(t)
	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "hgw-n1"}})
	req := registry.Request{NodeName: "hgw-n1", Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "host-gw"}}
	a := c.start(t, "hgw-n1", `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`, req)
	a.lease(t, 30*time.Second)
	want := map[string]string{
		"flannel.alpha.coreos.com/kube-subnet-manager": "true",
		"flannel.alpha.coreos.com/backend-type":        "host-gw",
		"flannel.alpha.coreos.com/backend-data":        "null",
		"flannel.alpha.coreos.com/public-ip":           "198.18.0.11",
	}
	if got := ownAnnotations(c.getNode(t, "hgw-n1")); !maps.Equal(got, want) {
		t.Errorf("annotations:\n got  %q\n want %q", got, want)
	}
}

// TestPublicIPOverwrite: the operator's override is what peers are told.
func TestPublicIPOverwrite(t *testing.T) {
	c := sharedCluster(t)
	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "ovr-n1", Annotations: map[string]string{
		"flannel.alpha.coreos.com/public-ip-overwrite": "198.18.1.11",
	}}})
	a := c.start(t, "ovr-n1", network, vxlanReq("ovr-n1", "198.18.0.11", "5e:1f:0a:9c:33:01"))
	if l := a.lease(t, 30*time.Second); l.Attrs.PublicIP != netip.MustParseAddr("198.18.0.11") {
		t.Errorf("own lease public IP %s, want the node's own address", l.Attrs.PublicIP)
	}
	if got := c.getNode(t, "ovr-n1").Annotations["flannel.alpha.coreos.com/public-ip"]; got != "198.18.1.11" {
		t.Errorf("public-ip %q, want the override 198.18.1.11", got)
	}
}

// TestPodCIDROutsideNetwork is the classic kubeadm mistake: the cluster's
// --pod-network-cidr is not net-conf.json's Network.
func TestPodCIDROutsideNetwork(t *testing.T) {
	c := sharedCluster(t)
	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "out-n1"}})
	a := c.start(t, "out-n1", `{"Network":"10.245.0.0/16"}`, vxlanReq("out-n1", "198.18.0.11", "5e:1f:0a:9c:33:01"))
	var podCIDR string
	eventually(t, 30*time.Second, "podCIDR assigned", func() bool {
		podCIDR = c.getNode(t, "out-n1").Spec.PodCIDR
		return podCIDR != ""
	})
	select {
	case err := <-a.errc:
		want := fmt.Sprintf(`node out-n1 has podCIDR %s (from kube-controller-manager --cluster-cidr), which is not inside Network 10.245.0.0/16 of /etc/kube-flannel/net-conf.json: `+
			`set "Network" to the cluster's pod CIDR (kubeadm --pod-network-cidr / kube-controller-manager --cluster-cidr), or re-create the cluster with --pod-network-cidr=10.245.0.0/16`, podCIDR)
		if err == nil || err.Error() != want {
			t.Fatalf("Keep error:\n got  %v\n want %s", err, want)
		}
	case l := <-a.leases:
		t.Fatalf("lease %v outside Network", l)
	case <-time.After(30 * time.Second):
		t.Fatalf("Keep did not fail; log:\n%s", a.logs)
	}
	if n := c.getNode(t, "out-n1"); len(ownAnnotations(n)) != 0 || networkAvailable(n) {
		t.Errorf("a node outside Network was annotated or marked available: %v %v", n.Annotations, n.Status.Conditions)
	}
}

// TestHostileNodes: Nodes written by hand with a loopback public-ip,
// backend-data that is not JSON, a podCIDR overlapping a live node's, a
// public-ip that is no address: each is skipped with its reason and the
// agent carries on.
func TestHostileNodes(t *testing.T) {
	c := sharedCluster(t)
	ann := func(ip, data string) map[string]string {
		return map[string]string{
			"flannel.alpha.coreos.com/kube-subnet-manager": "true",
			"flannel.alpha.coreos.com/backend-type":        "vxlan",
			"flannel.alpha.coreos.com/backend-data":        data,
			"flannel.alpha.coreos.com/public-ip":           ip,
		}
	}
	good := `{"VNI":1,"VtepMAC":"5e:1f:0a:9c:33:09"}`
	handMade := func(name, cidr string, a map[string]string) *v1.Node {
		return &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: a}, Spec: v1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}}}
	}
	c.createNode(t, handMade("bad-good", "10.244.240.0/24", ann("198.18.0.20", good)))
	c.createNode(t, handMade("bad-loopback", "10.244.241.0/24", ann("127.0.0.1", good)))
	c.createNode(t, handMade("bad-json", "10.244.242.0/24", ann("198.18.0.22", "{VNI:1")))
	c.createNode(t, handMade("bad-overlap", "10.244.240.0/25", ann("198.18.0.23", good)))
	c.createNode(t, handMade("bad-ip", "10.244.244.0/24", ann("198.18.0.300", good)))
	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "bad-n1"}})

	a := c.start(t, "bad-n1", network, vxlanReq("bad-n1", "198.18.0.11", "5e:1f:0a:9c:33:01"))
	l := a.lease(t, 30*time.Second)
	p := a.peers(t)
	var got []string
	eventually(t, 10*time.Second, "the good peer", func() bool {
		got = append(got, p.take()...)
		return strings.Join(got, "; ") == "added bad-n1 "+l.Key()+"; added bad-good 10.244.240.0-24"
	})
	for reason, n := range map[string]float64{registry.SkipBadPublicIP: 1, registry.SkipUndecodable: 2, registry.SkipOverlap: 1} {
		if v := counterValue(t, a.m.skipped.WithLabelValues(reason)); v != n {
			t.Errorf("loom_leases_skipped_total{reason=%q} = %v, want %v\nlog:\n%s", reason, v, n, a.logs)
		}
	}
	for _, s := range []string{"node=bad-loopback", "node=bad-json", "node=bad-overlap", "node=bad-ip", "kubectl delete node bad-overlap"} {
		if !strings.Contains(a.logs.String(), s) {
			t.Errorf("log does not mention %s:\n%s", s, a.logs)
		}
	}

	// The impostor's overlap ends with the node it overlapped.
	if err := c.admin.CoreV1().Nodes().Delete(context.Background(), "bad-good", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	got = nil
	eventually(t, 10*time.Second, "the overlapping node let in", func() bool {
		got = append(got, p.take()...)
		return strings.Join(got, "; ") == "removed bad-good 10.244.240.0-24; added bad-overlap 10.244.240.0-25"
	})
	select {
	case err := <-a.errc:
		t.Fatalf("Keep ended: %v", err)
	default:
	}
}

// TestNoAllocation: without --allocate-node-cidrs the Node never gets a
// podCIDR; the agent says why, at error level, and holds no lease until
// the podCIDR is set by hand.
func TestNoAllocation(t *testing.T) {
	c := startCluster(t, netip.Prefix{})
	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "noalloc-n1"}})
	a := c.start(t, "noalloc-n1", network, vxlanReq("noalloc-n1", "198.18.0.11", "5e:1f:0a:9c:33:01"))
	eventually(t, 30*time.Second, "the pod cidr log, twice", func() bool {
		return strings.Count(a.logs.String(), "pod cidr not assigned to node noalloc-n1") >= 2
	})
	for _, s := range []string{"level=ERROR", "--allocate-node-cidrs=true", "--cluster-cidr=10.244.0.0/16", "--pod-network-cidr"} {
		if !strings.Contains(a.logs.String(), s) {
			t.Errorf("log does not say %s:\n%s", s, a.logs)
		}
	}
	select {
	case l := <-a.leases:
		t.Fatalf("lease %v without a podCIDR", l)
	default:
	}
	if n := c.getNode(t, "noalloc-n1"); len(ownAnnotations(n)) != 0 {
		t.Errorf("annotated before it had a subnet: %v", n.Annotations)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := c.cp.Kubectl(ctx, "", "patch", "node", "noalloc-n1", "-p", `{"spec":{"podCIDR":"10.244.9.0/24","podCIDRs":["10.244.9.0/24"]}}`); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if l := a.lease(t, 10*time.Second); l.Subnet != netip.MustParsePrefix("10.244.9.0/24") {
		t.Errorf("lease %v, want 10.244.9.0/24", l)
	}
}

// TestForbidden: a user without flannel's RBAC gets an error that says
// what to grant, not an endless wait.
func TestForbidden(t *testing.T) {
	c := sharedCluster(t)
	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "rbac-n1"}})
	eventually(t, 30*time.Second, "podCIDR assigned", func() bool { return c.getNode(t, "rbac-n1").Spec.PodCIDR != "" })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Read-only: may list and watch Nodes, not patch their status.
	if out, err := c.cp.Apply(ctx, "", `
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: readonly-nodes}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: loom-test-node-reader}
subjects: [{kind: User, name: loom-readonly}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: loom-test-node-reader}
rules: [{apiGroups: [""], resources: [nodes], verbs: [get, list, watch]}]
`); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// The admin may impersonate (system:masters); the agent may not.
	arc, err := clientcmd.BuildConfigFromFlags("", c.cp.AdminKubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	arc.Impersonate.UserName = "loom-readonly"
	readonly := kubernetes.NewForConfigOrDie(arc)
	eventually(t, 30*time.Second, "read-only RBAC in effect", func() bool {
		_, err := readonly.CoreV1().Nodes().Get(ctx, "rbac-n1", metav1.GetOptions{})
		return err == nil
	})
	logs := &logBuf{}
	client, err := NewClient(ClientConfig{REST: arc, Logger: logs.logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	m, err := New(Config{Client: client, NodeName: "rbac-n1", Network: mustConfig(t, network), Logger: logs.logger()})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	req := vxlanReq("rbac-n1", "198.18.0.11", "5e:1f:0a:9c:33:01")
	req.Config = mustConfig(t, network)
	err = m.Keep(ctx, req, nil)
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "patch on nodes/status") {
		t.Fatalf("Keep error %v, want forbidden naming nodes/status", err)
	}
}
