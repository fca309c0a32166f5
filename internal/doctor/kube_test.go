package doctor

// Kubernetes mode against a real control plane (internal/kubecp: etcd,
// kube-apiserver and kube-controller-manager on 127.0.0.1, free ports).
// Address plan: cluster A allocates podCIDRs from 10.245.0.0/16, cluster B
// allocates none; the net-conf Network is 10.245.0.0/16 (agreeing with A)
// or 10.244.0.0/16 (the mismatch). Node objects carry public IPs on
// loopback (127.0.0.11-14) where doctor runs in the test's own namespace:
// it probes peers' public IPs, and that traffic must stay on loopback. In
// the namespace test (root) they are underlay addresses (198.18.0.11-12),
// unroutable there: the namespace holds loopback only.
//
// Doctor runs as the user "loom-doctor", allowed only to get and list
// Nodes: a write, or a watch, would be refused. Every Node's
// resourceVersion is compared before and after each run as well.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/loomnet/loom/internal/kubecp"
	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/options"
	"github.com/loomnet/loom/internal/testnet"
)

// testRoleEnv makes this test binary play a part for the namespace test:
// "doctor" runs `loom doctor` with its arguments, "agent" stands in for a
// running `loom agent` (only its command line and environment matter).
const testRoleEnv = "LOOM_DOCTOR_TEST_ROLE"

func TestMain(m *testing.M) {
	switch os.Getenv(testRoleEnv) {
	case "doctor":
		code, err := Main(context.Background(), os.Args[1:], os.Stdout, os.Stderr)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
		os.Exit(code)
	case "agent":
		time.Sleep(10 * time.Minute) // killed by the test long before
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const doctorUser = "loom-doctor"

// kubeCluster is a running control plane with an admin client and the
// doctor user's kubeconfig.
type kubeCluster struct {
	cp         *kubecp.ControlPlane
	admin      kubernetes.Interface
	kubeconfig string // the doctor user's
}

func startCluster(t *testing.T, clusterCIDR netip.Prefix) *kubeCluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := kubecp.Start(ctx, kubecp.Config{Dir: filepath.Join(t.TempDir(), "cp"), ClusterCIDR: clusterCIDR, Users: []kubecp.User{{Name: doctorUser}}})
	if err != nil {
		t.Fatalf("start a control plane: %v", err)
	}
	t.Cleanup(cp.Stop)
	c := &kubeCluster{cp: cp, admin: clientFor(t, cp.AdminKubeconfig)}
	if c.kubeconfig, err = cp.Kubeconfig(doctorUser); err != nil {
		t.Fatal(err)
	}
	// get and list on nodes, nothing else.
	_, err = c.admin.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: doctorUser},
		Rules:      []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: doctorUser},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: doctorUser},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: doctorUser}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The authorizer learns the binding through its informer.
	doctor := clientFor(t, c.kubeconfig)
	eventually(t, "the doctor user may list Nodes", func() error {
		_, err := doctor.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		return err
	})
	return c
}

func clientFor(t *testing.T, kubeconfig string) kubernetes.Interface {
	t.Helper()
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func eventually(t *testing.T, what string, try func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := try()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20s: %v", what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// announced are the annotations an agent of backend bt at ip writes.
func announced(bt, ip, data string) map[string]string {
	return map[string]string{
		testPrefix + "kube-subnet-manager": "true",
		testPrefix + "backend-type":        bt,
		testPrefix + "backend-data":        data,
		testPrefix + "public-ip":           ip,
	}
}

const vxlanData = `{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}`

// createNode registers a Node as a kubelet would (plus the annotations an
// agent would have written), optionally with NetworkUnavailable, and waits
// for the controller's podCIDR when the cluster allocates them.
func (c *kubeCluster) createNode(t *testing.T, name string, ann map[string]string, unavailable v1.ConditionStatus, wantCIDR bool) *v1.Node {
	t.Helper()
	ctx := context.Background()
	n, err := c.admin.CoreV1().Nodes().Create(ctx, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if unavailable != "" {
		c.setNetworkUnavailable(t, name, unavailable)
	}
	if wantCIDR {
		eventually(t, "a podCIDR for "+name, func() error {
			if n, err = c.admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{}); err != nil {
				return err
			}
			if n.Spec.PodCIDR == "" {
				return errors.New("none yet")
			}
			return nil
		})
	}
	return n
}

func (c *kubeCluster) setNetworkUnavailable(t *testing.T, name string, status v1.ConditionStatus) {
	t.Helper()
	ctx := context.Background()
	reason := map[v1.ConditionStatus]string{v1.ConditionTrue: "NoRouteCreated", v1.ConditionFalse: "LoomIsUp"}[status]
	eventually(t, "set NetworkUnavailable of "+name, func() error {
		n, err := c.admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now()
		var kept []v1.NodeCondition
		for _, cond := range n.Status.Conditions {
			if cond.Type != v1.NodeNetworkUnavailable {
				kept = append(kept, cond)
			}
		}
		n.Status.Conditions = append(kept, v1.NodeCondition{Type: v1.NodeNetworkUnavailable, Status: status, Reason: reason,
			Message: "set by the test", LastTransitionTime: now, LastHeartbeatTime: now})
		_, err = c.admin.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	})
}

// versions are the Nodes' resourceVersions, once they stopped changing
// (the controllers annotate and allocate right after a Node appears).
func (c *kubeCluster) versions(t *testing.T) map[string]string {
	t.Helper()
	read := func() map[string]string {
		list, err := c.admin.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, n := range list.Items {
			out[n.Name] = n.ResourceVersion
		}
		return out
	}
	prev := read()
	for range 50 {
		time.Sleep(200 * time.Millisecond)
		cur := read()
		if fmt.Sprint(cur) == fmt.Sprint(prev) {
			return cur
		}
		prev = cur
	}
	t.Fatalf("Nodes keep changing: %v", prev)
	return nil
}

// doctorRun is one doctor run's inputs.
type doctorRun struct {
	kubeconfig string
	network    string // net-conf.json's Network
	node       string
	subnetEnv  string // subnet.env's content; "" for none
}

// gather runs Gather in-process with the agent's flags and checks that no
// Node changed.
func (c *kubeCluster) gather(t *testing.T, r doctorRun) (*Facts, map[string]Result) {
	t.Helper()
	dir := t.TempDir()
	conf := filepath.Join(dir, "net-conf.json")
	if err := os.WriteFile(conf, fmt.Appendf(nil, `{"Network":%q,"Backend":{"Type":"vxlan"}}`, r.network), 0o644); err != nil {
		t.Fatal(err)
	}
	env := filepath.Join(dir, "subnet.env")
	if r.subnetEnv != "" {
		if err := os.WriteFile(env, []byte(r.subnetEnv), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	opts := mustOptions(t, "--kube-subnet-mgr", "--kubeconfig-file", r.kubeconfig, "--net-config-path", conf,
		"--node-name", r.node, "--subnet-file", env, "--healthz-port", "0")
	before := c.versions(t)
	f := Gather(context.Background(), Config{Opts: opts, CNIConfDir: filepath.Join(dir, "net.d"), CNICacheDir: filepath.Join(dir, "cache")})
	if after := c.versions(t); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("a doctor run changed Nodes: resourceVersions %v, then %v", before, after)
	}
	res := map[string]Result{}
	results := Run(f)
	for _, r := range results {
		res[r.Check] = r
	}
	var b strings.Builder
	_ = NewReport(f, results, 0).WriteText(&b)
	t.Log(b.String())
	return f, res
}

// expect asserts one check's status and that its summary and evidence
// hold every string of in.
func expect(t *testing.T, res map[string]Result, check string, want Status, in ...string) {
	t.Helper()
	r := res[check]
	text := r.Summary + "\n" + strings.Join(r.Evidence, "\n")
	for _, s := range in {
		if !strings.Contains(text, s) {
			t.Errorf("%s: %q not in %s: %s\n%s\nfix: %s", check, s, r.Status, r.Summary, strings.Join(r.Evidence, "\n"), r.Fix)
		}
	}
	if r.Status != want {
		t.Errorf("%s is %s, want %s: %s\n%s\nfix: %s", check, r.Status, want, r.Summary, strings.Join(r.Evidence, "\n"), r.Fix)
	}
}

// Cluster A assigns podCIDRs from 10.245.0.0/16: n1 (this node, announced,
// network available), n2 (announced vxlan), n3 (no agent ever ran), n4
// (host-gw), n5 (registered, never announced).
func TestKubeModeAgainstAPIServer(t *testing.T) {
	c := startCluster(t, netip.MustParsePrefix("10.245.0.0/16"))
	n1 := c.createNode(t, "n1", announced("vxlan", "127.0.0.11", vxlanData), v1.ConditionFalse, true)
	c.createNode(t, "n2", announced("vxlan", "127.0.0.12", `{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}`), v1.ConditionFalse, true)
	c.createNode(t, "n3", nil, "", true)
	c.createNode(t, "n4", announced("host-gw", "127.0.0.14", "null"), v1.ConditionFalse, true)
	c.createNode(t, "n5", nil, "", true)
	podCIDR := n1.Spec.PodCIDR
	env := fmt.Sprintf("FLANNEL_NETWORK=10.245.0.0/16\nFLANNEL_SUBNET=%s\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n", gatewayOf(netip.MustParsePrefix(podCIDR)))
	agrees := doctorRun{kubeconfig: c.kubeconfig, network: "10.245.0.0/16", node: "n1", subnetEnv: env}

	t.Run("as the agent sees it", func(t *testing.T) {
		f, res := c.gather(t, agrees)
		expect(t, res, CheckStore, OK, "Kubernetes API at "+c.cp.URL+" answers: 5 Nodes", "-kubeconfig-file "+c.kubeconfig, "server "+kubecp.KubeVersion)
		expect(t, res, CheckNetworkLease, OK, "this node's podCIDR "+podCIDR, "inside Network 10.245.0.0/16")
		expect(t, res, CheckKubeAnnotations, Warn, "n3 (no flannel.alpha.coreos.com/kube-subnet-manager annotation", "n4 (backend host-gw, this node vxlan: skipped)", "n5 (")
		expect(t, res, CheckKubeNetworkUnavailable, OK, "NetworkUnavailable=False (LoomIsUp)")
		expect(t, res, CheckSubnetEnv, OK, "subnet.env agrees with the node's lease", "Node n1 podCIDR")
		if len(f.Store.Leases) != 3 { // n1's own, n2, n4
			t.Errorf("leases %v: want n1, n2 and n4", f.Store.Leases)
		}
		if len(f.Peers) != 2 {
			t.Errorf("probed %d peers, want n2 and n4", len(f.Peers))
		}
	})
	t.Run("cluster CIDR is not Network", func(t *testing.T) {
		r := agrees
		r.network, r.subnetEnv = "10.244.0.0/16", ""
		_, res := c.gather(t, r)
		expect(t, res, CheckNetworkLease, Fail, "node n1 has podCIDR "+podCIDR+" (from kube-controller-manager --cluster-cidr), which is not inside Network 10.244.0.0/16 of ", "Network 10.244.0.0/16", "spec.podCIDRs "+podCIDR)
		if fix := res[CheckNetworkLease].Fix; !strings.Contains(fix, `set "Network" in `) || !strings.Contains(fix, "--pod-network-cidr=10.244.0.0/16") {
			t.Errorf("fix %q", fix)
		}
		expect(t, res, CheckKubeAnnotations, Skip, "judged by network-vs-lease")
	})
	t.Run("this node unannotated", func(t *testing.T) {
		r := agrees
		r.node, r.subnetEnv = "n5", ""
		_, res := c.gather(t, r)
		expect(t, res, CheckKubeAnnotations, Fail, "missing flannel.alpha.coreos.com/kube-subnet-manager")
		expect(t, res, CheckKubeNetworkUnavailable, Warn, "not set on Node n5")
	})
	t.Run("network unavailable", func(t *testing.T) {
		c.setNetworkUnavailable(t, "n1", v1.ConditionTrue)
		t.Cleanup(func() { c.setNetworkUnavailable(t, "n1", v1.ConditionFalse) })
		_, res := c.gather(t, agrees)
		expect(t, res, CheckKubeNetworkUnavailable, Fail, "NetworkUnavailable=True on Node n1", "reason NoRouteCreated")
	})
	t.Run("node not registered", func(t *testing.T) {
		r := agrees
		r.node = "n9"
		_, res := c.gather(t, r)
		expect(t, res, CheckStore, Fail, "no Node n9 in the cluster")
		expect(t, res, CheckKubeAnnotations, Skip)
	})
	t.Run("node found through the agent's pod", func(t *testing.T) {
		// kube-flannel.yml gives POD_NAME and POD_NAMESPACE, no NODE_NAME.
		ctx := context.Background()
		_, err := c.admin.CoreV1().Pods("default").Create(ctx, &v1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "loom-x7k2p"},
			Spec:       v1.PodSpec{NodeName: "n2", Containers: []v1.Container{{Name: "agent", Image: "loom"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		env := map[string]string{"POD_NAME": "loom-x7k2p", "POD_NAMESPACE": "default"}
		for _, tc := range []struct {
			name, kubeconfig string
			want             Status
			in               string
		}{
			{name: "allowed", kubeconfig: c.cp.AdminKubeconfig, want: OK, in: "node n2: pod default/loom-x7k2p (POD_NAMESPACE/POD_NAME)"},
			{name: "forbidden", kubeconfig: c.kubeconfig, want: Fail, in: "this node's Node is unknown: find this node's name from pod default/loom-x7k2p"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				dir := t.TempDir()
				conf := filepath.Join(dir, "net-conf.json")
				if err := os.WriteFile(conf, []byte(`{"Network":"10.245.0.0/16"}`), 0o644); err != nil {
					t.Fatal(err)
				}
				opts, err := options.Parse([]string{"--kube-subnet-mgr", "--kubeconfig-file", tc.kubeconfig, "--net-config-path", conf,
					"--subnet-file", filepath.Join(dir, "subnet.env"), "--healthz-port", "0"}, func(k string) string { return env[k] })
				if err != nil {
					t.Fatal(err)
				}
				f := Gather(ctx, Config{Opts: opts, CNIConfDir: dir, CNICacheDir: dir})
				res := map[string]Result{}
				for _, r := range Run(f) {
					res[r.Check] = r
				}
				expect(t, res, CheckStore, tc.want, tc.in)
				if tc.want == OK && f.Node != "n2" {
					t.Errorf("node %q, want n2", f.Node)
				}
			})
		}
	})
	t.Run("credentials refused", func(t *testing.T) {
		r := agrees
		r.kubeconfig = withToken(t, c.kubeconfig, "not-a-token")
		_, res := c.gather(t, r)
		expect(t, res, CheckStore, Fail, "Unauthorized")
		if !strings.Contains(res[CheckStore].Fix, "refuses the credentials") {
			t.Errorf("fix %q", res[CheckStore].Fix)
		}
	})
	t.Run("API server down", func(t *testing.T) {
		dir := t.TempDir()
		conf := filepath.Join(dir, "net-conf.json")
		if err := os.WriteFile(conf, []byte(`{"Network":"10.245.0.0/16"}`), 0o644); err != nil {
			t.Fatal(err)
		}
		kubeconfig := withServer(t, c.kubeconfig, "https://127.0.0.1:1") // nothing listens on port 1
		start := time.Now()
		f := Gather(context.Background(), Config{Opts: mustOptions(t, "--kube-subnet-mgr", "--kubeconfig-file", kubeconfig,
			"--net-config-path", conf, "--node-name", "n1", "--subnet-file", filepath.Join(dir, "subnet.env"), "--healthz-port", "0"),
			CNIConfDir: dir, CNICacheDir: dir, Timeout: time.Second})
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("doctor took %s with the API server down, want about one timeout", took)
		}
		res := map[string]Result{}
		for _, r := range Run(f) {
			res[r.Check] = r
		}
		expect(t, res, CheckStore, Fail, "Kubernetes API at https://127.0.0.1:1", "TCP connect to 127.0.0.1:1: connect: connection refused")
		expect(t, res, CheckNetworkLease, Skip)
		expect(t, res, CheckKubeAnnotations, Skip)
		expect(t, res, CheckPeerLiveness, Skip)
	})
}

// Cluster B runs kube-controller-manager without --allocate-node-cidrs.
func TestKubeModePodCIDRNotAssigned(t *testing.T) {
	c := startCluster(t, netip.Prefix{})
	c.createNode(t, "m1", nil, "", false)
	c.createNode(t, "m2", nil, "", false)
	time.Sleep(time.Second) // had the controller allocated, it would have by now
	f, res := c.gather(t, doctorRun{kubeconfig: c.kubeconfig, network: "10.244.0.0/16", node: "m1"})
	if f.Kube.Node == nil || f.Kube.Node.HasPodCIDR() {
		t.Fatalf("Node m1 read as %+v (err %v)", f.Kube.Node, f.Kube.NodeErr)
	}
	expect(t, res, CheckStore, OK, "2 Nodes")
	expect(t, res, CheckNetworkLease, Fail, "pod cidr not assigned to node m1", "no podCIDR either: 1 Node of 1 other Nodes (m2)")
	if fix := res[CheckNetworkLease].Fix; !strings.Contains(fix, "--allocate-node-cidrs=true and --cluster-cidr=10.244.0.0/16") {
		t.Errorf("fix %q", fix)
	}
	expect(t, res, CheckKubeAnnotations, Skip, "judged by network-vs-lease")
	expect(t, res, CheckSubnetEnv, Fail, "does not exist")
}

// withToken and withServer write a copy of a kubeconfig with another
// bearer token or server.
func withToken(t *testing.T, kubeconfig, token string) string {
	return editKubeconfig(t, kubeconfig, "", token)
}

func withServer(t *testing.T, kubeconfig, url string) string {
	return editKubeconfig(t, kubeconfig, url, "")
}

// editKubeconfig replaces the server and the token ("" keeps them).
func editKubeconfig(t *testing.T, kubeconfig, server, token string) string {
	t.Helper()
	cfg, err := clientcmd.LoadFromFile(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cfg.Clusters {
		if server != "" {
			c.Server = server
		}
	}
	for _, a := range cfg.AuthInfos {
		if token != "" {
			a.Token = token
		}
	}
	out := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, out); err != nil {
		t.Fatal(err)
	}
	return out
}

// `loom doctor` in a node's namespace, with no flags: it finds the agent
// running there and reads the kubeconfig path and NODE_NAME from its
// command line and environment, as in a lab node or on a host. The
// namespace holds loopback only; a proxy listening inside it forwards to
// the API server, as the lab's router would.
func TestDoctorInNodeNamespace(t *testing.T) {
	testnet.RequireRoot(t)
	ipBin, err := exec.LookPath("ip")
	if err != nil {
		t.Fatalf("needs iproute2's ip: %v", err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, netip.MustParsePrefix("10.245.0.0/16"))
	c.createNode(t, "n1", announced("vxlan", "198.18.0.11", vxlanData), v1.ConditionFalse, true)
	c.createNode(t, "n2", announced("vxlan", "198.18.0.12", `{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}`), v1.ConditionFalse, true)

	ns := fmt.Sprintf("%sdockube-%d", testnet.Prefix, os.Getpid())
	if err := netns.Create(ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := netns.Delete(ns); err != nil {
			t.Error(err)
		}
	})
	apiAddr := strings.TrimPrefix(c.cp.URL, "https://")
	proxy := proxyInto(t, ns, apiAddr)

	dir := t.TempDir()
	kubeconfig := withServer(t, c.kubeconfig, "https://"+proxy)
	conf := filepath.Join(dir, "net-conf.json")
	if err := os.WriteFile(conf, []byte(`{"Network":"10.245.0.0/16","Backend":{"Type":"vxlan"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	loom := filepath.Join(dir, "loom") // so the process looks like `loom agent`
	if err := os.Symlink(self, loom); err != nil {
		t.Fatal(err)
	}
	agent := exec.Command(ipBin, "netns", "exec", ns, loom, "agent", "--kube-subnet-mgr", "--kubeconfig-file", kubeconfig,
		"--net-config-path", conf, "--subnet-file", filepath.Join(dir, "subnet.env"), "--healthz-port", "0")
	agent.Env = append(os.Environ(), testRoleEnv+"=agent", "NODE_NAME=n1")
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = agent.Process.Kill() // `ip netns exec` execs the program: this is the stand-in agent
		_ = agent.Wait()
	})
	// Doctor sees the agent once it runs in the namespace.
	eventually(t, "the stand-in agent runs", func() error {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", agent.Process.Pid))
		if err != nil || !strings.Contains(string(data), "agent") {
			return fmt.Errorf("cmdline %q: %v", data, err)
		}
		return nil
	})

	before := c.versions(t)
	cmd := exec.Command(ipBin, "netns", "exec", ns, self, "--json", "--cni-conf-dir", filepath.Join(dir, "net.d"), "--cni-cache-dir", filepath.Join(dir, "cache"))
	cmd.Env = append(os.Environ(), testRoleEnv+"=doctor")
	out, err := cmd.Output()
	if ee, isExit := errors.AsType[*exec.ExitError](err); isExit && ee.ExitCode() <= 2 {
		err = nil
	}
	if err != nil {
		t.Fatalf("doctor: %v\n%s", err, out)
	}
	if after := c.versions(t); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("doctor changed Nodes: resourceVersions %v, then %v", before, after)
	}
	var rep Report
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("decode the report: %v\n%s", err, out)
	}
	if rep.Node != "n1" || !strings.Contains(rep.ArgsSource, fmt.Sprintf("running agent, pid %d", agent.Process.Pid)) {
		t.Errorf("report of node %q with flags from %q: want n1 and the running agent", rep.Node, rep.ArgsSource)
	}
	res := map[string]Result{}
	for _, r := range rep.Results {
		res[r.Check] = r
	}
	expect(t, res, CheckStore, OK, "Kubernetes API at https://"+proxy+" answers: 2 Nodes", "-kubeconfig-file "+kubeconfig)
	expect(t, res, CheckNetworkLease, OK, "inside Network 10.245.0.0/16")
	expect(t, res, CheckKubeAnnotations, OK, "Node n1 announces vxlan at 198.18.0.11; 1 peer is announced")
	expect(t, res, CheckKubeNetworkUnavailable, OK)
	if p := res[CheckPeerLiveness]; p.Status != Warn || !strings.Contains(p.Fix, "kubectl delete node n2") {
		// The namespace has no route to n2's address: no answer, and no
		// packet leaves.
		t.Errorf("peer-liveness %s %s, fix %q", p.Status, p.Summary, p.Fix)
	}
}

// proxyInto listens on 127.0.0.1 inside ns and forwards every connection
// to target, dialled from the test's own namespace. It returns the
// listening address.
func proxyInto(t *testing.T, ns, target string) string {
	t.Helper()
	ln, err := netns.Listen(ns, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}
	wg.Go(func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			track(in)
			track(out)
			wg.Go(func() { _, _ = io.Copy(out, in); _ = out.(*net.TCPConn).CloseWrite() })
			wg.Go(func() { _, _ = io.Copy(in, out); _ = in.(*net.TCPConn).CloseWrite() })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}
