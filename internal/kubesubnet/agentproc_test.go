package kubesubnet

// TestAgentProcess runs the real `loom agent -kube-subnet-mgr` binary, as a
// DaemonSet would, against a real control plane. Both need a network
// namespace of their own (the agent programs routes, a VXLAN device and
// firewall rules; the apiserver listens on loopback): the test makes one,
// then runs itself again inside it (ip netns exec), where the second run
// starts the control plane and the agent. Nothing touches the machine's own
// namespace.
//
// The control plane allocates no podCIDRs (no --allocate-node-cidrs), as a
// cluster whose controller manager was set up without them: the agent
// waits, alive and saying why on /readyz, until the podCIDR is set by hand.
//
// Address plan, inside the namespace: eth0 (veth) 198.18.0.11/24, default
// route via 198.18.0.1; pods 10.244.0.0/16, n1's podCIDR 10.244.1.0/24; a
// flanneld peer Node "peer" at 198.18.0.12 with podCIDR 10.244.200.0/24;
// control plane on 127.0.0.1.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loomnet/loom/internal/subnetenv"
	"github.com/loomnet/loom/internal/testnet"
)

// inNetnsEnv marks the second run of TestAgentProcess, inside the
// namespace; binDirEnv passes it the directory of the loom binary.
const (
	inNetnsEnv = "LOOM_KUBESUBNET_IN_NETNS"
	binDirEnv  = "LOOM_KUBESUBNET_BIN_DIR"
)

func TestAgentProcess(t *testing.T) {
	if os.Getenv(inNetnsEnv) != "" {
		agentProcessInNetns(t)
		return
	}
	testnet.RequireRoot(t)
	if binDir == "" {
		t.Fatal("the loom binary was not built (TestMain builds it as root)")
	}
	n := testnet.NewNS(t, "ksagent")
	name := filepath.Base(n.Path())
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		// A veth pair with both ends in the namespace: a link that is up,
		// needing no module beyond what the lab uses.
		{"link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"},
		{"addr", "add", "198.18.0.11/24", "dev", "eth0"},
		{"link", "set", "eth0-peer", "up"},
		{"link", "set", "eth0", "up"},
		{"route", "add", "default", "via", "198.18.0.1", "dev", "eth0"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", name, os.Args[0], "-test.run=^TestAgentProcess$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), inNetnsEnv+"=1", binDirEnv+"="+binDir)
	out, err := cmd.CombinedOutput()
	t.Logf("run inside %s:\n%s", name, out)
	if err != nil {
		t.Fatalf("inside the namespace: %v", err)
	}
}

func agentProcessInNetns(t *testing.T) {
	bin := filepath.Join(os.Getenv(binDirEnv), "loom")
	c := startCluster(t, netip.Prefix{})
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	c.createNode(t, &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}})
	// A peer as flanneld annotates it, with a podCIDR set at registration.
	c.createNode(t, &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "peer", Annotations: map[string]string{
			"flannel.alpha.coreos.com/kube-subnet-manager": "true",
			"flannel.alpha.coreos.com/backend-type":        "vxlan",
			"flannel.alpha.coreos.com/backend-data":        `{"VNI":1,"VtepMAC":"5e:1f:0a:9c:33:12"}`,
			"flannel.alpha.coreos.com/public-ip":           "198.18.0.12",
		}},
		Spec: v1.NodeSpec{PodCIDR: "10.244.200.0/24", PodCIDRs: []string{"10.244.200.0/24"}},
	})
	netConf := filepath.Join(dir, "net-conf.json")
	if err := os.WriteFile(netConf, []byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := c.cp.Kubeconfig(agentUser.Name)
	if err != nil {
		t.Fatal(err)
	}
	subnetFile := filepath.Join(dir, "subnet.env")
	agent := exec.Command(bin, "agent",
		"-kube-subnet-mgr",
		"-kubeconfig-file", kubeconfig,
		"-net-config-path", netConf,
		"--node-name", "n1",
		"-iface", "eth0",
		"-ip-masq",
		"-subnet-file", subnetFile,
		"-state-dir", filepath.Join(dir, "state"),
		"-healthz-port", "2401",
	)
	stderr, err := agent.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			fmt.Fprintln(logs, s.Text())
		}
	}()
	exited := make(chan error, 1)
	go func() { <-copied; exited <- agent.Wait() }()
	defer func() {
		agent.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("agent exit after SIGTERM: %v", err)
			}
		case <-time.After(15 * time.Second):
			agent.Process.Kill()
			t.Error("agent did not stop within 15 s of SIGTERM")
		}
		t.Logf("agent log:\n%s", logs)
	}()

	// waitHTTP polls path on the health server until ok accepts the
	// answer, failing when the agent exits or d passes.
	waitHTTP := func(path string, d time.Duration, ok func(code int, body string) bool) {
		t.Helper()
		var (
			code int
			body []byte
			err  error
		)
		for end := time.Now().Add(d); ; time.Sleep(200 * time.Millisecond) {
			select {
			case err := <-exited:
				exited <- err
				t.Fatalf("agent exited: %v", err)
			default:
			}
			var resp *http.Response
			if resp, err = http.Get("http://127.0.0.1:2401" + path); err == nil {
				code = resp.StatusCode
				body, err = io.ReadAll(resp.Body)
				resp.Body.Close()
				if err == nil && ok(code, string(body)) {
					return
				}
			}
			if time.Now().After(end) {
				t.Fatalf("GET %s within %v: %d %s %v", path, d, code, body, err)
			}
		}
	}

	// No podCIDR: alive (the DaemonSet's liveness probe must not restart
	// the agent in a loop), not ready, and /readyz says why in the words
	// of the log; no lease on /metrics.
	waitHTTP("/healthz", 60*time.Second, func(code int, _ string) bool { return code == http.StatusOK })
	waitHTTP("/readyz", 60*time.Second, func(code int, body string) bool {
		return code == http.StatusServiceUnavailable && strings.Contains(body, "[-]lease: pod cidr not assigned to node n1: ") &&
			strings.Contains(body, "--allocate-node-cidrs=true")
	})
	waitHTTP("/metrics", 10*time.Second, func(code int, body string) bool {
		return code == http.StatusOK && strings.Contains(body, "\nloom_lease_held 0\n")
	})
	if out, err := c.cp.Kubectl(ctx, "", "patch", "node", "n1", "-p", `{"spec":{"podCIDR":"10.244.1.0/24","podCIDRs":["10.244.1.0/24"]}}`); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	waitHTTP("/readyz", 90*time.Second, func(code int, _ string) bool { return code == http.StatusOK })

	node, err := c.admin.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	env, err := subnetenv.Read(subnetFile)
	if err != nil {
		t.Fatal(err)
	}
	if env.Subnet.Masked().String() != node.Spec.PodCIDR || env.Network.String() != "10.244.0.0/16" {
		t.Errorf("subnet.env %+v, Node podCIDR %s", env, node.Spec.PodCIDR)
	}
	ann := ownAnnotations(node)
	if ann["flannel.alpha.coreos.com/backend-type"] != "vxlan" || ann["flannel.alpha.coreos.com/public-ip"] != "198.18.0.11" ||
		!regexp.MustCompile(`^\{"VNI":1,"VtepMAC":"([0-9a-f]{2}:){5}[0-9a-f]{2}"\}$`).MatchString(ann["flannel.alpha.coreos.com/backend-data"]) {
		t.Errorf("annotations %q", ann)
	}
	var backend struct{ VtepMAC string }
	if err := json.Unmarshal([]byte(ann["flannel.alpha.coreos.com/backend-data"]), &backend); err != nil {
		t.Fatal(err)
	}
	if !networkAvailable(node) {
		t.Errorf("conditions %+v, want NetworkUnavailable False", node.Status.Conditions)
	}
	// The flanneld peer is routed to over VXLAN, as flanneld would.
	out, err := exec.Command("ip", "route", "show", "10.244.200.0/24").CombinedOutput()
	if err != nil || !regexp.MustCompile(`via 10\.244\.200\.0 dev flannel\.1 .*onlink`).Match(out) {
		t.Errorf("route to the peer: %v %s", err, out)
	}
	if out, err := exec.Command("ip", "link", "show", "flannel.1").CombinedOutput(); err != nil || !strings.Contains(string(out), backend.VtepMAC) {
		t.Errorf("flannel.1 does not carry the annotated VtepMAC %s: %v %s", backend.VtepMAC, err, out)
	}
	resp, err := http.Get("http://127.0.0.1:2401/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"loom_lease_held 1", "loom_peers 1", `loom_leases_skipped_total{reason="bad-public-ip"} 0`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// The reachability check runs every 10 s; its first result comes at once.
	if !regexp.MustCompile(`(?m)^loom_store_reachable 1$`).Match(body) {
		t.Errorf("/metrics: loom_store_reachable is not 1:\n%s", grepLines(string(body), "loom_store"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for line := range strings.Lines(s) {
		if strings.Contains(line, sub) {
			out = append(out, strings.TrimRight(line, "\n"))
		}
	}
	return strings.Join(out, "\n")
}
