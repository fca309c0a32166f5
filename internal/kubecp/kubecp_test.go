package kubecp

// Address plan: every control plane here listens on 127.0.0.1 (free ports)
// of the test's own network namespace; nothing needs root. Node objects
// carry underlay addresses 198.18.0.11-13 (objects only, nothing is
// configured), pods 10.244.0.0/16, Services 10.96.0.0/12.

import (
	"context"
	"crypto/x509"
	"encoding/csv"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var clusterCIDR = netip.MustParsePrefix("10.244.0.0/16")

// agentUser is the identity loom's agent has in Kubernetes mode: flannel's
// ServiceAccount.
var agentUser = User{
	Name:   "system:serviceaccount:kube-flannel:loom",
	Groups: []string{"system:serviceaccounts", "system:serviceaccounts:kube-flannel"},
}

// shared is the control plane most tests use, started on first use and
// stopped by TestMain: starting one costs seconds.
type shared struct {
	once sync.Once
	dir  string
	cp   *ControlPlane
	err  error
}

func (s *shared) get(t *testing.T) *ControlPlane {
	t.Helper()
	s.once.Do(func() {
		s.dir, s.err = os.MkdirTemp("", "loom-kubecp-")
		if s.err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		s.cp, s.err = Start(ctx, Config{Dir: s.dir, ClusterCIDR: clusterCIDR, Users: []User{agentUser}})
	})
	if s.err != nil {
		t.Fatalf("start the shared control plane: %v", s.err)
	}
	return s.cp
}

func (s *shared) stop() {
	if s.cp != nil {
		s.cp.Stop()
	}
	if s.dir != "" {
		os.RemoveAll(s.dir)
	}
}

// sharedCP is the one shared control plane of this test binary. It is the
// package's only global, and exists only in its tests: TestMain must reach
// it to stop it.
var sharedCP shared

func TestMain(m *testing.M) {
	code := m.Run()
	sharedCP.stop()
	os.Exit(code)
}

func kubectl(t *testing.T, p *Plan, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := p.Kubectl(ctx, "", args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

func apply(t *testing.T, p *Plan, manifest string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := p.Apply(ctx, "", manifest); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
}

// nodeManifest is a Node as the lab creates it: no kubelet, only the
// address the agent's Kubernetes subnet manager reads.
func nodeManifest(name, ip string) string {
	return fmt.Sprintf(`{"apiVersion":"v1","kind":"Node","metadata":{"name":%q},
"status":{"addresses":[{"type":"InternalIP","address":%q}]}}`, name, ip)
}

// waitFor polls f every 100ms until it returns true or d passes.
func waitFor(d time.Duration, f func() bool) bool {
	for end := time.Now().Add(d); ; {
		if f() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestKubeVersionIsTheToolsModulePin(t *testing.T) {
	data, err := os.ReadFile("../../tools/kube/go.mod")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "k8s.io/kubernetes" && strings.HasPrefix(f[1], "v") {
			if f[1] != KubeVersion {
				t.Fatalf("tools/kube/go.mod pins k8s.io/kubernetes %s, kubecp.KubeVersion is %s: change both", f[1], KubeVersion)
			}
			return
		}
	}
	t.Fatal("tools/kube/go.mod has no k8s.io/kubernetes requirement")
}

func TestFindBinsNamesDirectoryAndFix(t *testing.T) {
	dir := t.TempDir()
	t.Setenv(BinDirEnv, dir)
	_, err := FindBins()
	if err == nil || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "make kube-bins") {
		t.Fatalf("FindBins in an empty %s = %v, want an error naming the directory and `make kube-bins`", dir, err)
	}
	for _, b := range []string{"kube-apiserver", "kube-controller-manager", "kubectl"} {
		if err := os.WriteFile(filepath.Join(dir, b), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bins, err := FindBins()
	if err != nil {
		t.Fatal(err)
	}
	if bins.Kubectl != filepath.Join(dir, "kubectl") {
		t.Errorf("Kubectl = %s, want it in %s", bins.Kubectl, dir)
	}
}

func TestDefaultBinDirIsKeyedByVersions(t *testing.T) {
	d := DefaultBinDir()
	if !strings.HasPrefix(d, "/var/cache/loom/kube/"+KubeVersion+"-go1.") {
		t.Fatalf("DefaultBinDir = %s, want /var/cache/loom/kube/%s-<go version>", d, KubeVersion)
	}
}

// TestPrepareForTheLab checks the files and command lines the lab gets, without
// running anything: a router address, the lab's store, fixed ports.
func TestPrepareForTheLab(t *testing.T) {
	dir := t.TempDir()
	bins := Bins{APIServer: "/k/kube-apiserver", ControllerManager: "/k/kube-controller-manager", Kubectl: "/k/kubectl"}
	p, err := Prepare(Config{
		Dir:         dir,
		Address:     netip.MustParseAddr("198.18.0.1"),
		EtcdServers: []string{"http://127.0.0.1:2379"},
		ClusterCIDR: clusterCIDR,
		Users:       []User{agentUser},
		Bins:        bins,
	})
	if err != nil {
		t.Fatal(err)
	}
	if p.URL != "https://198.18.0.1:6443" || p.ControllerManagerURL != "https://127.0.0.1:10257" {
		t.Errorf("URL %s, ControllerManagerURL %s; want the default ports", p.URL, p.ControllerManagerURL)
	}

	t.Run("serving certificate", func(t *testing.T) {
		data, err := os.ReadFile(filepath.Join(dir, "pki", "apiserver.pem"))
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode(data)
		if block == nil {
			t.Fatal("apiserver.pem holds no PEM block")
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, ip := range cert.IPAddresses {
			got = append(got, ip.String())
		}
		want := []string{"198.18.0.1", "127.0.0.1", "10.96.0.1"}
		if !slices.Equal(got, want) {
			t.Errorf("IP SANs %v, want %v", got, want)
		}
	})

	t.Run("secrets are private", func(t *testing.T) {
		agentKC, err := p.Kubeconfig(agentUser.Name)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{p.AdminKubeconfig, p.ControllerManagerKubeconfig, agentKC,
			filepath.Join(dir, "pki", "tokens.csv"), filepath.Join(dir, "pki", "sa-key.pem"), filepath.Join(dir, "pki", "apiserver-key.pem")} {
			st, err := os.Stat(f)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != 0o600 {
				t.Errorf("%s has mode %v, want 0600", f, st.Mode().Perm())
			}
		}
	})

	t.Run("token file", func(t *testing.T) {
		f, err := os.Open(filepath.Join(dir, "pki", "tokens.csv"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		r := csv.NewReader(f)
		r.FieldsPerRecord = -1
		rows, err := r.ReadAll()
		if err != nil {
			t.Fatal(err)
		}
		groups := map[string]string{}
		for _, row := range rows {
			if len(row) < 4 {
				t.Fatalf("row %v: want token, user, uid, groups", row)
			}
			groups[row[1]] = row[3]
			tok, err := p.Token(row[1])
			if err != nil || tok != row[0] {
				t.Errorf("Token(%q) = %q, %v; the file says %q", row[1], tok, err, row[0])
			}
		}
		want := map[string]string{
			AdminUser:             MastersGroup,
			ControllerManagerUser: MastersGroup,
			agentUser.Name:        "system:serviceaccounts,system:serviceaccounts:kube-flannel",
		}
		if fmt.Sprint(groups) != fmt.Sprint(want) {
			t.Errorf("users and groups %v, want %v", groups, want)
		}
	})

	t.Run("kubeconfig", func(t *testing.T) {
		path, err := p.Kubeconfig(agentUser.Name)
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Dir(path) != filepath.Join(dir, "users") {
			t.Errorf("user kubeconfig %s, want it in %s/users", path, dir)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var kc struct {
			Clusters []struct {
				Cluster struct {
					Server string `json:"server"`
					CA     []byte `json:"certificate-authority-data"`
				} `json:"cluster"`
			} `json:"clusters"`
			Users []struct {
				Name string `json:"name"`
				User struct {
					Token string `json:"token"`
				} `json:"user"`
			} `json:"users"`
		}
		if err := json.Unmarshal(data, &kc); err != nil {
			t.Fatal(err)
		}
		tok, _ := p.Token(agentUser.Name)
		if len(kc.Clusters) != 1 || kc.Clusters[0].Cluster.Server != p.URL || len(kc.Users) != 1 || kc.Users[0].User.Token != tok {
			t.Errorf("kubeconfig %s", data)
		}
		ca, err := os.ReadFile(p.CAFile)
		if err != nil {
			t.Fatal(err)
		}
		if string(kc.Clusters[0].Cluster.CA) != string(ca) {
			t.Error("kubeconfig does not embed the cluster CA")
		}
		if _, err := p.Kubeconfig("nobody"); err == nil {
			t.Error("Kubeconfig of a user never asked for: no error")
		}
	})

	t.Run("Load", func(t *testing.T) {
		l, err := Load(dir)
		if err != nil {
			t.Fatal(err)
		}
		l.Config.DialContext = p.Config.DialContext
		if !reflect.DeepEqual(l, p) {
			t.Errorf("Load = %+v, want what Prepare returned: %+v", l, p)
		}
		if _, err := Load(t.TempDir()); err == nil {
			t.Error("Load of a directory without a plan: no error")
		}
	})

	t.Run("command lines", func(t *testing.T) {
		if p.APIServer.Bin != bins.APIServer || p.ControllerManager.Bin != bins.ControllerManager {
			t.Errorf("binaries %s, %s; want the configured ones", p.APIServer.Bin, p.ControllerManager.Bin)
		}
		for _, want := range []string{"--etcd-servers=http://127.0.0.1:2379", "--bind-address=198.18.0.1",
			"--advertise-address=198.18.0.1", "--secure-port=6443", "--service-cluster-ip-range=10.96.0.0/12",
			"--authorization-mode=Node,RBAC"} {
			if !slices.Contains(p.APIServer.Args, want) {
				t.Errorf("apiserver args %v lack %s", p.APIServer.Args, want)
			}
		}
		// A routable advertise address keeps the endpoint reconciler.
		if slices.Contains(p.APIServer.Args, "--endpoint-reconciler-type=none") {
			t.Errorf("apiserver args %v turn the endpoint reconciler off for a routable address", p.APIServer.Args)
		}
		for _, want := range []string{"--allocate-node-cidrs=true", "--cluster-cidr=10.244.0.0/16", "--node-cidr-mask-size=24",
			"--controllers=*,-node-lifecycle-controller", "--secure-port=10257", "--leader-elect=false"} {
			if !slices.Contains(p.ControllerManager.Args, want) {
				t.Errorf("controller manager args %v lack %s", p.ControllerManager.Args, want)
			}
		}
	})
}

func TestPrepareRefusesBadConfig(t *testing.T) {
	bins := Bins{APIServer: "a", ControllerManager: "c", Kubectl: "k"}
	etcd := []string{"http://127.0.0.1:2379"}
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{name: "no dir", cfg: Config{EtcdServers: etcd, Bins: bins}, want: "no directory"},
		{name: "no etcd", cfg: Config{Dir: "d", Bins: bins}, want: "no etcd servers"},
		{name: "mask shorter than cluster CIDR", cfg: Config{Dir: "d", EtcdServers: etcd, Bins: bins,
			ClusterCIDR: clusterCIDR, NodeCIDRMaskSize: 8}, want: "does not fit"},
		{name: "cluster CIDR overlaps services", cfg: Config{Dir: "d", EtcdServers: etcd, Bins: bins,
			ClusterCIDR: netip.MustParsePrefix("10.96.0.0/16")}, want: "overlaps"},
		{name: "user twice", cfg: Config{Dir: "d", EtcdServers: etcd, Bins: bins,
			Users: []User{agentUser, agentUser}}, want: "twice"},
		{name: "built-in user", cfg: Config{Dir: "d", EtcdServers: etcd, Bins: bins,
			Users: []User{{Name: AdminUser}}}, want: "twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.cfg.Dir != "" {
				tt.cfg.Dir = t.TempDir()
			}
			_, err := Prepare(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Prepare = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	cp := sharedCP.get(t)
	var v struct {
		ClientVersion struct{ GitVersion string } `json:"clientVersion"`
		ServerVersion struct{ GitVersion string } `json:"serverVersion"`
	}
	out := kubectl(t, cp.Plan, "version", "-o", "json")
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("kubectl version: %v\n%s", err, out)
	}
	if v.ClientVersion.GitVersion != KubeVersion || v.ServerVersion.GitVersion != KubeVersion {
		t.Errorf("kubectl %s, server %s; want both %s", v.ClientVersion.GitVersion, v.ServerVersion.GitVersion, KubeVersion)
	}
}

func TestNodesGetPodCIDRs(t *testing.T) {
	cp := sharedCP.get(t)
	podCIDR := func(node string) netip.Prefix {
		var cidr netip.Prefix
		if !waitFor(5*time.Second, func() bool {
			out := kubectl(t, cp.Plan, "get", "node", node, "-o", "jsonpath={.spec.podCIDR} {.spec.podCIDRs[0]}")
			f := strings.Fields(out)
			if len(f) != 2 {
				return false
			}
			if f[0] != f[1] {
				t.Fatalf("node %s: podCIDR %s, podCIDRs[0] %s", node, f[0], f[1])
			}
			var err error
			cidr, err = netip.ParsePrefix(f[0])
			return err == nil
		}) {
			t.Fatalf("node %s got no podCIDR within 5s", node)
		}
		return cidr
	}
	start := time.Now()
	apply(t, cp.Plan, nodeManifest("cidr-n1", "198.18.0.11"))
	c1 := podCIDR("cidr-n1")
	t.Logf("cidr-n1 got %s after %v", c1, time.Since(start).Round(time.Millisecond))
	apply(t, cp.Plan, nodeManifest("cidr-n2", "198.18.0.12"))
	c2 := podCIDR("cidr-n2")
	for _, c := range []netip.Prefix{c1, c2} {
		if c.Bits() != 24 || !clusterCIDR.Contains(c.Addr()) {
			t.Errorf("podCIDR %s: want a /24 inside %s", c, clusterCIDR)
		}
	}
	if c1.Overlaps(c2) {
		t.Errorf("two nodes got overlapping podCIDRs %s and %s", c1, c2)
	}
}

func TestUserTokenAuthenticatesAsUser(t *testing.T) {
	cp := sharedCP.get(t)
	kc, err := cp.Kubeconfig(agentUser.Name)
	if err != nil {
		t.Fatal(err)
	}
	var who struct {
		Status struct {
			UserInfo struct {
				Username string   `json:"username"`
				Groups   []string `json:"groups"`
			} `json:"userInfo"`
		} `json:"status"`
	}
	out := kubectl(t, cp.Plan, "--kubeconfig="+kc, "auth", "whoami", "-o", "json")
	if err := json.Unmarshal([]byte(out), &who); err != nil {
		t.Fatalf("kubectl auth whoami: %v\n%s", err, out)
	}
	if who.Status.UserInfo.Username != agentUser.Name || !slices.Contains(who.Status.UserInfo.Groups, "system:serviceaccounts") {
		t.Errorf("whoami: %s %v, want %s in system:serviceaccounts", who.Status.UserInfo.Username, who.Status.UserInfo.Groups, agentUser.Name)
	}

	canListNodes := func() string {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// can-i exits 1 for "no": the answer is on stdout either way.
		out, _ := cp.Kubectl(ctx, "", "--kubeconfig="+kc, "auth", "can-i", "list", "nodes")
		return strings.TrimSpace(string(out))
	}
	if got := canListNodes(); got != "no" {
		t.Fatalf("an unbound user can list nodes: %q", got)
	}
	// RBAC bound to the ServiceAccount applies to the token user: the
	// binding the lab and flannel's manifest make.
	apply(t, cp.Plan, `
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: test-node-reader}
rules: [{apiGroups: [""], resources: [nodes], verbs: [list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: test-node-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: test-node-reader}
subjects: [{kind: ServiceAccount, name: loom, namespace: kube-flannel}]
`)
	if !waitFor(5*time.Second, func() bool { return canListNodes() == "yes" }) {
		t.Fatalf("after binding the ServiceAccount: can-i list nodes = %q, want yes", canListNodes())
	}
}

func TestPodStatusIsAcceptedAndKept(t *testing.T) {
	cp := sharedCP.get(t)
	apply(t, cp.Plan, nodeManifest("pod-n1", "198.18.0.13"))
	apply(t, cp.Plan, `{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p1","namespace":"default"},
"spec":{"nodeName":"pod-n1","containers":[{"name":"c","image":"registry.invalid/none"}]}}`)
	kubectl(t, cp.Plan, "patch", "pod", "p1", "--subresource=status", "--type=merge", "-p",
		`{"status":{"phase":"Running","podIP":"10.244.7.5","podIPs":[{"ip":"10.244.7.5"}],
"conditions":[{"type":"Ready","status":"True"}]}}`)
	// Time for a controller that would evict or delete it to act; the
	// node lifecycle controller's own grace periods are minutes, so its
	// absence is checked in the controller manager's command line and log.
	time.Sleep(3 * time.Second)
	got := kubectl(t, cp.Plan, "get", "pod", "p1", "-o",
		`jsonpath={.status.phase} {.status.podIP} {.status.conditions[?(@.type=="Ready")].status} {.spec.nodeName}`)
	if got != "Running 10.244.7.5 True pod-n1" {
		t.Errorf("pod p1: %q, want Running 10.244.7.5 True pod-n1", got)
	}
	taints := kubectl(t, cp.Plan, "get", "node", "pod-n1", "-o", `jsonpath={.spec.taints[?(@.effect=="NoExecute")].key}`)
	if taints != "" {
		t.Errorf("node pod-n1 has NoExecute taints %q", taints)
	}
	log, err := os.ReadFile(cp.LogFile("kube-controller-manager"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), `controller is disabled" controller="node-lifecycle-controller"`) {
		t.Errorf("controller manager log does not mention node-lifecycle-controller as disabled:\n%s", log)
	}
}

// TestWaitDialsThroughDialContext is what the lab relies on: every
// connection of Wait is opened by Config.DialContext (there, inside the
// router namespace).
func TestWaitDialsThroughDialContext(t *testing.T) {
	cp := sharedCP.get(t)
	var dials atomic.Int32
	p := *cp.Plan
	p.Config.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if dials.Load() == 0 {
		t.Fatal("Wait succeeded without dialing through Config.DialContext")
	}

	refused := errors.New("refused by the test")
	p.Config.DialContext = func(context.Context, string, string) (net.Conn, error) { return nil, refused }
	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	err := p.Wait(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, refused) || !strings.Contains(err.Error(), p.URL) {
		t.Fatalf("Wait with a failing dialer = %v, want a deadline error naming %s and the last failure", err, p.URL)
	}
}

// TestWithoutClusterCIDR runs its own control plane: the controller manager
// allocates no podCIDRs, and Stop leaves no process and no port behind.
func TestWithoutClusterCIDR(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp, err := Start(ctx, Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	if !slices.Contains(cp.ControllerManager.Args, "--allocate-node-cidrs=false") {
		t.Errorf("controller manager args %v: want --allocate-node-cidrs=false", cp.ControllerManager.Args)
	}

	t.Run("node gets no podCIDR", func(t *testing.T) {
		apply(t, cp.Plan, nodeManifest("nocidr-n1", "198.18.0.11"))
		if waitFor(3*time.Second, func() bool {
			return kubectl(t, cp.Plan, "get", "node", "nocidr-n1", "-o", "jsonpath={.spec.podCIDR}{.spec.podCIDRs}") != ""
		}) {
			t.Fatal("node got a podCIDR without a cluster CIDR")
		}
	})

	t.Run("Stop leaves nothing", func(t *testing.T) {
		pids := cp.PIDs()
		if len(pids) != 2 {
			t.Fatalf("PIDs = %v, want the apiserver and the controller manager", pids)
		}
		addrs := []string{
			strings.TrimPrefix(cp.URL, "https://"),
			strings.TrimPrefix(cp.ControllerManagerURL, "https://"),
			strings.TrimPrefix(cp.EtcdURL(), "http://"),
		}
		for _, a := range addrs {
			c, err := net.DialTimeout("tcp", a, time.Second)
			if err != nil {
				t.Fatalf("%s not listening before Stop: %v", a, err)
			}
			c.Close()
		}
		cp.Stop()
		for _, pid := range pids {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("process %d still exists after Stop", pid)
			}
		}
		for _, a := range addrs {
			if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
				c.Close()
				t.Errorf("%s still accepts connections after Stop", a)
			}
		}
	})
}
