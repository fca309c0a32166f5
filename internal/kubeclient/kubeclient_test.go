package kubeclient

// The client against a real kube-apiserver and kube-controller-manager
// (internal/kubecp, the pinned release; `make kube-bins`), never a fake:
// what it must get right is the apiserver's wire format, errors and
// authorization. Address plan: the control plane listens on 127.0.0.1 at
// free ports; Node objects carry no addresses.

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/loomnet/loom/deploy"
	"github.com/loomnet/loom/internal/kubecp"
)

// agentUser is the manifest's ServiceAccount as the apiserver sees it.
var agentUser = kubecp.User{Name: "system:serviceaccount:loom:loom", Groups: []string{"system:serviceaccounts", "system:serviceaccounts:loom"}}

// wire records the content type of every answer the apiserver sends.
type wire struct {
	mu    sync.Mutex
	types map[string]string // "GET /api/v1/nodes/x" -> Content-Type
}

func (w *wire) wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := rt.RoundTrip(r)
		if err == nil {
			w.mu.Lock()
			w.types[r.Method+" "+r.URL.Path] = resp.Header.Get("Content-Type")
			w.mu.Unlock()
		}
		return resp, err
	})
}

func (w *wire) contentType(req string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.types[req]
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// clientAs is a Client of the control plane with kubeconfig's identity.
func clientAs(t *testing.T, kubeconfig string, edit func(*Config)) *Client {
	t.Helper()
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{REST: rc}
	edit(&cfg)
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// applyManifestRBAC applies deploy/kubernetes/loom.yaml's Namespace,
// ServiceAccount, ClusterRole and ClusterRoleBinding.
func applyManifestRBAC(ctx context.Context, t *testing.T, cp *kubecp.ControlPlane) {
	t.Helper()
	objs, err := deploy.Objects()
	if err != nil {
		t.Fatal(err)
	}
	list := map[string]any{"apiVersion": "v1", "kind": "List"}
	var items []json.RawMessage
	for _, o := range objs {
		switch o.Kind {
		case "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding":
			items = append(items, o.JSON)
		}
	}
	list["items"] = items
	data, err := json.Marshal(list)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := cp.Apply(ctx, "", string(data)); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

func eventually(t *testing.T, d time.Duration, what string, f func() error) {
	t.Helper()
	var err error
	for end := time.Now().Add(d); ; {
		if err = f(); err == nil {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("not within %v: %s: %v", d, what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestAgainstAPIServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cp, err := kubecp.Start(ctx, kubecp.Config{Dir: filepath.Join(t.TempDir(), "cp"), Users: []kubecp.User{agentUser}})
	if err != nil {
		t.Fatalf("start a control plane: %v", err)
	}
	t.Cleanup(cp.Stop)
	w := &wire{types: map[string]string{}}
	admin := clientAs(t, cp.AdminKubeconfig, func(c *Config) { c.REST.WrapTransport = w.wrap })
	nodes := admin.Nodes()

	t.Run("server version", func(t *testing.T) {
		v, err := admin.ServerVersion(ctx)
		if err != nil || v != kubecp.KubeVersion {
			t.Errorf("ServerVersion = %q, %v; want %s", v, err, kubecp.KubeVersion)
		}
	})

	t.Run("nodes", func(t *testing.T) {
		for _, name := range []string{"kc-n1", "kc-n2", "kc-n3"} {
			n, err := nodes.Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"loom.test/n": name}}})
			if err != nil || n.Name != name || n.UID == "" {
				t.Fatalf("Create %s = %+v, %v", name, n, err)
			}
		}
		n, err := nodes.Get(ctx, "kc-n1")
		if err != nil || n.Labels["loom.test/n"] != "kc-n1" {
			t.Fatalf("Get = %+v, %v", n, err)
		}
		// The apiserver's cheapest encoding, as kubelet and kube-proxy
		// ask for it.
		if ct := w.contentType("GET /api/v1/nodes/kc-n1"); ct != "application/vnd.kubernetes.protobuf" {
			t.Errorf("Get answered as %q, want protobuf", ct)
		}
		if _, err := nodes.Get(ctx, "kc-none"); !apierrors.IsNotFound(err) {
			t.Errorf("Get of a missing Node: %v, want NotFound", err)
		}

		// Paged, as doctor lists: every Node once.
		var got []string
		opts := metav1.ListOptions{Limit: 2, LabelSelector: "loom.test/n"}
		for {
			list, err := nodes.List(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			if len(list.Items) > 2 {
				t.Fatalf("a page of %d Nodes with Limit 2", len(list.Items))
			}
			for _, n := range list.Items {
				got = append(got, n.Name)
			}
			if opts.Continue = list.Continue; opts.Continue == "" {
				break
			}
		}
		if strings.Join(got, ",") != "kc-n1,kc-n2,kc-n3" {
			t.Errorf("List pages gave %v", got)
		}

		n.Labels["loom.test/updated"] = "yes"
		if n, err = nodes.Update(ctx, n); err != nil || n.Labels["loom.test/updated"] != "yes" {
			t.Fatalf("Update = %+v, %v", n, err)
		}
		n.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady, Status: v1.ConditionTrue, Reason: "LoomTest", LastHeartbeatTime: metav1.Now()}}
		if n, err = nodes.UpdateStatus(ctx, n); err != nil || len(n.Status.Conditions) != 1 {
			t.Fatalf("UpdateStatus = %+v, %v", n, err)
		}
		// What the agent sends: one strategic merge patch of nodes/status
		// with annotations and a condition, merged by condition type.
		patch := `{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"198.18.0.11"}},"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"LoomIsUp"}]}}`
		n, err = nodes.Patch(ctx, "kc-n1", types.StrategicMergePatchType, []byte(patch), "status")
		if err != nil {
			t.Fatal(err)
		}
		if n.Annotations["flannel.alpha.coreos.com/public-ip"] != "198.18.0.11" || len(n.Status.Conditions) != 2 {
			t.Errorf("after the status patch: annotations %v, conditions %+v", n.Annotations, n.Status.Conditions)
		}
		if n, err = nodes.Patch(ctx, "kc-n1", types.MergePatchType, []byte(`{"spec":{"unschedulable":true}}`)); err != nil || !n.Spec.Unschedulable {
			t.Errorf("merge patch = %+v, %v", n, err)
		}
		if err := nodes.Delete(ctx, "kc-n3"); err != nil {
			t.Fatal(err)
		}
		if _, err := nodes.Get(ctx, "kc-n3"); !apierrors.IsNotFound(err) {
			t.Errorf("Get after Delete: %v, want NotFound", err)
		}
		if err := nodes.Delete(ctx, "kc-n3"); !apierrors.IsNotFound(err) {
			t.Errorf("second Delete: %v, want NotFound", err)
		}
	})

	t.Run("pods", func(t *testing.T) {
		pods := admin.Pods("default")
		pod := &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "kube-flannel-ds-x7k2p"},
			Spec:       v1.PodSpec{NodeName: "kc-n1", Containers: []v1.Container{{Name: "c", Image: "registry.k8s.io/pause:3.10"}}},
		}
		if _, err := pods.Create(ctx, pod); err != nil {
			t.Fatal(err)
		}
		if _, err := pods.Create(ctx, &v1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "pending"}, Spec: v1.PodSpec{Containers: []v1.Container{{Name: "c", Image: "x"}}}}); err != nil {
			t.Fatal(err)
		}
		p, err := pods.Get(ctx, pod.Name)
		if err != nil {
			t.Fatal(err)
		}
		p.Status.Phase, p.Status.PodIP = v1.PodRunning, "10.244.1.2"
		if p, err = pods.UpdateStatus(ctx, p); err != nil || p.Status.PodIP != "10.244.1.2" {
			t.Fatalf("UpdateStatus = %+v, %v", p, err)
		}
		list, err := pods.List(ctx, metav1.ListOptions{})
		if err != nil || len(list.Items) != 2 {
			t.Fatalf("List = %v, %v", list, err)
		}

		// kube-flannel.yml gives the agent its pod, not its node.
		if name, err := admin.NodeOfPod(ctx, "default", pod.Name); err != nil || name != "kc-n1" {
			t.Errorf("NodeOfPod = %q, %v", name, err)
		}
		if _, err := admin.NodeOfPod(ctx, "default", "pending"); err == nil || !strings.Contains(err.Error(), "is not scheduled on a node: set NODE_NAME") {
			t.Errorf("NodeOfPod of an unscheduled pod: %v", err)
		}
		if _, err := admin.NodeOfPod(ctx, "default", "gone"); !apierrors.IsNotFound(err) || !strings.Contains(err.Error(), "NODE_NAME") {
			t.Errorf("NodeOfPod of a missing pod: %v, want NotFound pointing to NODE_NAME", err)
		}

		zero := int64(0)
		for _, name := range []string{pod.Name, "pending"} {
			if err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
				t.Fatal(err)
			}
		}
		// Grace period 0: gone at once, no kubelet to confirm.
		if _, err := pods.Get(ctx, pod.Name); !apierrors.IsNotFound(err) {
			t.Errorf("Get after Delete: %v, want NotFound", err)
		}
	})

	// The agent's client needs nothing beyond the manifest's RBAC: get,
	// list and watch nodes, patch nodes/status. Its informer lists and
	// watches (as a watch-list stream) as that user.
	t.Run("agent RBAC and shared informer", func(t *testing.T) {
		applyManifestRBAC(ctx, t, cp)
		kc, err := cp.Kubeconfig(agentUser.Name)
		if err != nil {
			t.Fatal(err)
		}
		agent := clientAs(t, kc, func(c *Config) { c.Resync = time.Minute })
		eventually(t, 30*time.Second, "the manifest's RBAC in effect", func() error {
			_, err := agent.Nodes().List(ctx, metav1.ListOptions{Limit: 1})
			return err
		})
		inf := agent.Informer(&v1.Node{}, ListWatch(agent.Nodes()))
		if again := agent.Informer(&v1.Node{}, ListWatch(agent.Nodes())); again != inf {
			t.Error("a second Informer for Nodes is not the first one")
		}
		changes := make(chan string, 16)
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			UpdateFunc: func(_, obj any) { changes <- obj.(*v1.Node).Annotations["loom.test/seen"] },
		}); err != nil {
			t.Fatal(err)
		}
		agent.Start()
		syncCtx, cancelSync := context.WithTimeout(ctx, 30*time.Second)
		defer cancelSync()
		if !cache.WaitForCacheSync(syncCtx.Done(), inf.HasSynced) {
			t.Fatal("the Node informer did not sync as the agent's user")
		}
		obj, ok, err := inf.GetIndexer().GetByKey("kc-n1")
		if err != nil || !ok {
			t.Fatalf("kc-n1 not in the cache: %v", err)
		}
		if mf := obj.(*v1.Node).ManagedFields; len(mf) != 0 {
			t.Errorf("cached Node keeps %d managed fields entries", len(mf))
		}
		// The agent's one write.
		if _, err := agent.Nodes().Patch(ctx, "kc-n1", types.StrategicMergePatchType, []byte(`{"metadata":{"annotations":{"loom.test/seen":"1"}}}`), "status"); err != nil {
			t.Fatalf("patch nodes/status as the agent: %v", err)
		}
		select {
		case v := <-changes:
			if v != "1" {
				t.Errorf("the informer delivered annotation %q, want 1", v)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the informer did not deliver the patched Node")
		}
		// Anything else is refused, with the apiserver's Forbidden.
		n := obj.(*v1.Node).DeepCopy()
		if _, err := agent.Nodes().Update(ctx, n); !apierrors.IsForbidden(err) {
			t.Errorf("Update as the agent: %v, want Forbidden", err)
		}
		if _, err := agent.Nodes().Patch(ctx, "kc-n1", types.MergePatchType, []byte(`{"metadata":{"labels":{"a":"b"}}}`)); !apierrors.IsForbidden(err) {
			t.Errorf("patch of nodes (not nodes/status) as the agent: %v, want Forbidden", err)
		}
		if _, err := agent.Pods("default").Get(ctx, "x"); !apierrors.IsForbidden(err) {
			t.Errorf("get pods as the agent: %v, want Forbidden", err)
		}
		agent.Close()
		if !inf.IsStopped() {
			t.Error("the informer runs on after Close")
		}
	})

	t.Run("every request is bounded", func(t *testing.T) {
		// A connection that is accepted and never answered: without a
		// bound, Get would wait as long as ctx.
		c := clientAs(t, cp.AdminKubeconfig, func(c *Config) {
			c.RequestTimeout = 300 * time.Millisecond
			c.REST.WrapTransport = func(http.RoundTripper) http.RoundTripper {
				return roundTripFunc(func(r *http.Request) (*http.Response, error) {
					<-r.Context().Done()
					return nil, r.Context().Err()
				})
			}
		})
		start := time.Now()
		_, err := c.Nodes().Get(ctx, "kc-n1")
		if took := time.Since(start); err == nil || took > 5*time.Second {
			t.Errorf("Get on a hung apiserver: %v after %v, want an error within the request timeout", err, took)
		}
		if !errors.Is(err, context.DeadlineExceeded) && !regexp.MustCompile(`deadline|timeout`).MatchString(err.Error()) {
			t.Errorf("Get on a hung apiserver: %v, want a deadline error", err)
		}
	})

	// Last: it stops the control plane.
	t.Run("reachability monitor", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		c := clientAs(t, cp.AdminKubeconfig, func(c *Config) { c.Metrics, c.MonitorEvery = reg, 100*time.Millisecond })
		if v := gauge(t, reg, "loom_store_reachable"); v != -1 {
			t.Errorf("loom_store_reachable before Start = %v, want -1", v)
		}
		c.Start()
		eventually(t, 10*time.Second, "loom_store_reachable 1", func() error {
			if v := gauge(t, reg, "loom_store_reachable"); v != 1 {
				return errors.New("not 1")
			}
			return nil
		})
		if ts := gauge(t, reg, "loom_store_last_contact_timestamp_seconds"); time.Since(time.Unix(int64(ts), 0)) > time.Minute {
			t.Errorf("last contact %v", ts)
		}
		cp.Stop()
		eventually(t, 10*time.Second, "loom_store_reachable 0 after the apiserver stopped", func() error {
			if v := gauge(t, reg, "loom_store_reachable"); v != 0 {
				return errors.New("not 0")
			}
			return nil
		})
	})
}

// -kubeconfig-file, and -kube-api-url over its server or alone; no
// -kubeconfig-file outside a pod is an error naming the RBAC the user
// needs. Nothing is dialled: New sends nothing.
func TestRESTConfig(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	_, err := New(Config{})
	if err == nil || !strings.Contains(err.Error(), "get, list and watch nodes and patch nodes/status") {
		t.Errorf("New outside a pod without a kubeconfig: %v", err)
	}
	if c, err := New(Config{APIURL: "http://198.18.0.1:8080"}); err != nil || c.Server() != "http://198.18.0.1:8080" {
		t.Errorf("New with only -kube-api-url: %v", err)
	}
	dir := t.TempDir()
	kc := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*kubeconfig("https://198.18.0.1:6443"), kc); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, apiURL, want string
	}{
		{name: "kubeconfig", want: "https://198.18.0.1:6443"},
		{name: "-kube-api-url wins", apiURL: "https://198.18.0.2:6443", want: "https://198.18.0.2:6443"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := New(Config{KubeconfigFile: kc, APIURL: tc.apiURL})
			if err != nil {
				t.Fatal(err)
			}
			if c.Server() != tc.want {
				t.Errorf("server %q, want %s", c.Server(), tc.want)
			}
		})
	}
	if _, err := New(Config{KubeconfigFile: filepath.Join(dir, "missing")}); err == nil || !strings.Contains(err.Error(), "-kubeconfig-file") {
		t.Errorf("missing kubeconfig: %v, want an error naming -kubeconfig-file", err)
	}
	rc, err := restConfig(Config{REST: &rest.Config{Host: "https://198.18.0.1:6443"}, DialTimeout: time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err != nil || rc.QPS != defaultQPS || rc.Burst != defaultBurst || !strings.HasPrefix(rc.UserAgent, "loom/") || rc.Dial == nil || rc.Timeout != 0 {
		t.Errorf("rest config %+v, %v: want loom's QPS, burst, user agent and dialer, and no overall timeout (it would cut watches)", rc, err)
	}
}

// kubeconfig is a kubeconfig of one cluster at server with a token user.
func kubeconfig(server string) *clientcmdapi.Config {
	return &clientcmdapi.Config{
		Clusters:       map[string]*clientcmdapi.Cluster{"c": {Server: server, InsecureSkipTLSVerify: true}},
		AuthInfos:      map[string]*clientcmdapi.AuthInfo{"u": {Token: "t"}},
		Contexts:       map[string]*clientcmdapi.Context{"x": {Cluster: "c", AuthInfo: "u"}},
		CurrentContext: "x",
	}
}
