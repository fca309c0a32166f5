package lab

// End-to-end tests of the Kubernetes lab (--datastore kube): a real
// kube-apiserver and kube-controller-manager in the router namespace,
// agents with --kube-subnet-mgr running as the manifest's ServiceAccount,
// real kernel data path, real CNI calls. Address plan: underlay
// 198.18.0.0/24 (the apiserver on 198.18.0.1:6443, its etcd on the
// router's 127.0.0.1:2379), pods 10.244.0.0/16 (the cluster CIDR;
// kube-cidr-mismatch gives n1 a net-conf.json with 10.245.0.0/16), Services
// 10.96.0.0/12 (unused), internet 203.0.113.0/24. Nothing is added to the
// root namespace. Lab names k1..k3 are used by no other test.

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	v1 "k8s.io/api/core/v1"

	"github.com/loomnet/loom/internal/netns"
)

// kubeLab brings up a Kubernetes lab; on failure the control plane's logs
// are attached besides the agents'.
func kubeLab(t *testing.T, name, backend string, pods int) *Lab {
	t.Helper()
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, proc := range []string{apiServerProc, controllerManagerProc} {
			path := filepath.Join(StateRoot, name, proc+".log")
			if data, err := os.ReadFile(path); err == nil {
				t.Logf("log of %s:\n%s", proc, lastLines(data, 30))
			}
		}
	})
	start := time.Now()
	l := upLab(t, Options{Name: name, Nodes: 3, Pods: pods, Backend: backend, Datastore: "kube", Firewall: os.Getenv("LOOM_TEST_FIREWALL")})
	t.Logf("kube lab %s (%s) up in %s", name, backend, time.Since(start).Round(time.Second))
	return l
}

func TestKubeLab(t *testing.T) {
	for _, tc := range []struct {
		lab, backend string
	}{
		{lab: "k1", backend: "vxlan"},
		{lab: "k2", backend: "host-gw"},
	} {
		t.Run(tc.backend, func(t *testing.T) {
			l := kubeLab(t, tc.lab, tc.backend, 2)
			ctx := t.Context()

			t.Run("matrix", func(t *testing.T) { mustCheck(t, l, l.Matrix()) })

			t.Run("annotations", func(t *testing.T) {
				for _, n := range l.Nodes {
					node := getNode(t, l, n.Name)
					checkFlannelAnnotations(t, l, n, node)
					if c := nodeCondition(node, v1.NodeNetworkUnavailable); c == nil || c.Status != v1.ConditionFalse {
						t.Errorf("Node %s: NetworkUnavailable condition %+v, want False", n.Name, c)
					}
				}
			})

			t.Run("pods", func(t *testing.T) {
				for _, n := range l.Nodes {
					for _, p := range n.Pods {
						checkPodObject(t, l, n, p)
					}
				}
			})

			t.Run("agent-kill-restart", func(t *testing.T) {
				before := getNode(t, l, "n1")
				if err := l.StopAgent("n1", syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				if err := l.StartAgent("n1"); err != nil {
					t.Fatal(err)
				}
				rctx, cancel := context.WithTimeout(ctx, time.Minute)
				defer cancel()
				if err := l.WaitReady(rctx, "n1"); err != nil {
					t.Fatal(err)
				}
				// Anything the restarted agent would write, it writes
				// before it is ready or within a sync or two after.
				time.Sleep(3 * time.Second)
				after := getNode(t, l, "n1")
				if after.Spec.PodCIDR != before.Spec.PodCIDR {
					t.Errorf("podCIDR %s after the restart, was %s", after.Spec.PodCIDR, before.Spec.PodCIDR)
				}
				key := flannelPrefix + "backend-data"
				if after.Annotations[key] != before.Annotations[key] {
					t.Errorf("%s %s after the restart, was %s (the VtepMAC must survive a restart)", key, after.Annotations[key], before.Annotations[key])
				}
				if after.ResourceVersion != before.ResourceVersion {
					t.Errorf("Node n1 written by a restart that changed nothing: resourceVersion %s -> %s; annotations now %v",
						before.ResourceVersion, after.ResourceVersion, flannelAnnotations(after))
				}
				n1, _ := l.Node("n1")
				checkFlannelAnnotations(t, l, *n1, after)
				if err := l.WaitConverged(rctx); err != nil {
					t.Fatal(err)
				}
				mustCheck(t, l, l.Matrix())
			})

			t.Run("delete-node", func(t *testing.T) {
				subnet := netip.MustParsePrefix(getNode(t, l, "n3").Spec.PodCIDR)
				var mac net.HardwareAddr
				if tc.backend == "vxlan" {
					n3, _ := l.Node("n3")
					mac = vtepMACOf(t, n3.NS)
				}
				n1, _ := l.Node("n1")
				if have := entriesFor(t, *n1, subnet, mac); len(have) == 0 {
					t.Fatalf("n1 has no entry for n3 (%s) before the deletion: nothing to check", subnet)
				}
				if err := l.DeleteNode(ctx, "n3"); err != nil {
					t.Fatal(err)
				}
				deadline := time.Now().Add(10 * time.Second)
				for _, name := range []string{"n1", "n2"} {
					n, _ := l.Node(name)
					var left []string
					for {
						left = entriesFor(t, *n, subnet, mac)
						if len(left) == 0 || time.Now().After(deadline) {
							break
						}
						time.Sleep(100 * time.Millisecond)
					}
					if len(left) > 0 {
						t.Errorf("%s still has entries for deleted Node n3 (%s) 10s after its deletion:\n  %s", name, subnet, strings.Join(left, "\n  "))
					}
				}
			})

			// A crash of everything, the control plane included: kill -9
			// every lab process, then down leaves nothing.
			t.Run("kill-all-down", func(t *testing.T) {
				names, _ := netns.List(NSPrefix + l.Opts.Name + "-")
				pids, _ := pidsIn(names)
				procs := map[string]int{}
				for _, p := range pids {
					procs[cmdline(p)]++
				}
				if procs[apiServerProc] != 1 || procs[controllerManagerProc] != 1 || procs["store"] != 1 || procs["agent"] != 3 {
					t.Fatalf("lab processes by kind %v, want a store, an apiserver, a controller manager and 3 agents", procs)
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
				for _, p := range pids {
					if alive(p) {
						t.Errorf("process %d (%s) survived down", p, cmdline(p))
					}
				}
			})
		})
	}
}

func getNode(t *testing.T, l *Lab, name string) *v1.Node {
	t.Helper()
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	n, err := cs.Nodes().Get(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func nodeCondition(n *v1.Node, typ v1.NodeConditionType) *v1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

func flannelAnnotations(n *v1.Node) map[string]string {
	out := map[string]string{}
	for k, v := range n.Annotations {
		if strings.HasPrefix(k, flannelPrefix) {
			out[k] = v
		}
	}
	return out
}

// vxlanBackendData is flanneld's vxlan backend-data, byte for byte: the
// field order and spelling of its Go struct, the MAC in lower-case hex.
var vxlanBackendData = regexp.MustCompile(`^\{"VNI":1,"VtepMAC":"((?:[0-9a-f]{2}:){5}[0-9a-f]{2})"\}$`)

// checkFlannelAnnotations asserts exactly flanneld's annotations of an
// IPv4 node: the keys it writes and values of its shape.
func checkFlannelAnnotations(t *testing.T, l *Lab, n Node, node *v1.Node) {
	t.Helper()
	got := flannelAnnotations(node)
	keys := slices.Sorted(maps.Keys(got))
	want := []string{flannelPrefix + "backend-data", flannelPrefix + "backend-type", flannelPrefix + "kube-subnet-manager", flannelPrefix + "public-ip"}
	if !slices.Equal(keys, want) {
		t.Errorf("Node %s carries annotations %v, want exactly %v", n.Name, keys, want)
	}
	if v := got[flannelPrefix+"kube-subnet-manager"]; v != "true" {
		t.Errorf("Node %s: kube-subnet-manager %q, want \"true\"", n.Name, v)
	}
	if v := got[flannelPrefix+"backend-type"]; v != l.Opts.Backend {
		t.Errorf("Node %s: backend-type %q, want %q", n.Name, v, l.Opts.Backend)
	}
	if v := got[flannelPrefix+"public-ip"]; v != n.Underlay.Addr().String() {
		t.Errorf("Node %s: public-ip %q, want its underlay address %s", n.Name, v, n.Underlay.Addr())
	}
	data := got[flannelPrefix+"backend-data"]
	switch l.Opts.Backend {
	case "vxlan":
		m := vxlanBackendData.FindStringSubmatch(data)
		if m == nil {
			t.Errorf("Node %s: backend-data %q, want flanneld's {\"VNI\":1,\"VtepMAC\":\"xx:xx:xx:xx:xx:xx\"}", n.Name, data)
			return
		}
		if dev := vtepMACOf(t, n.NS); m[1] != dev.String() {
			t.Errorf("Node %s: backend-data names VtepMAC %s, but flannel.1 in %s has %s", n.Name, m[1], n.NS, dev)
		}
	default:
		// flanneld marshals a backend without data as JSON null.
		if data != "null" {
			t.Errorf("Node %s: backend-data %q, want \"null\" as flanneld writes for %s", n.Name, data, l.Opts.Backend)
		}
	}
}

// vtepMACOf reads the MAC of flannel.1 in namespace ns.
func vtepMACOf(t *testing.T, ns string) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	err := withLink(ns, "flannel.1", func(_ *handle, lk netlink.Link) error {
		mac = lk.Attrs().HardwareAddr
		return nil
	})
	if err != nil {
		t.Fatalf("flannel.1 in %s: %v", ns, err)
	}
	return mac
}

// checkPodObject asserts what EndpointSlices are built from: the Pod
// object of lab pod p, on its node, with the CNI address and Ready.
func checkPodObject(t *testing.T, l *Lab, n Node, p Pod) {
	t.Helper()
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	pod, err := cs.Pods(PodNamespace).Get(t.Context(), p.Name)
	if err != nil {
		t.Fatalf("Pod object of %s: %v", p.Name, err)
	}
	if pod.Spec.NodeName != n.Name || pod.Status.PodIP != p.IP.String() || pod.Status.HostIP != n.Underlay.Addr().String() || pod.Status.Phase != v1.PodRunning {
		t.Errorf("Pod %s: node %q, podIP %q, hostIP %q, phase %s; want %s, %s, %s, Running",
			p.Name, pod.Spec.NodeName, pod.Status.PodIP, pod.Status.HostIP, pod.Status.Phase, n.Name, p.IP, n.Underlay.Addr())
	}
	ready := false
	for _, c := range pod.Status.Conditions {
		if c.Type == v1.PodReady {
			ready = c.Status == v1.ConditionTrue
		}
	}
	if !ready {
		t.Errorf("Pod %s is not Ready: %+v", p.Name, pod.Status.Conditions)
	}
}

// entriesFor lists what node n still has for a peer: a route to its
// subnet, and with vxlan a neighbour or FDB entry with its VtepMAC.
func entriesFor(t *testing.T, n Node, subnet netip.Prefix, mac net.HardwareAddr) []string {
	t.Helper()
	h, err := openHandle(n.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var left []string
	routes, err := h.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.String() == subnet.String() {
			left = append(left, "route "+r.String())
		}
	}
	if mac == nil {
		return left
	}
	for _, family := range []int{netlink.FAMILY_V4, syscall.AF_BRIDGE} {
		neighs, err := h.NeighList(0, family)
		if err != nil {
			t.Fatal(err)
		}
		for _, nb := range neighs {
			if bytes.Equal(nb.HardwareAddr, mac) {
				kind := "neighbour"
				if family == syscall.AF_BRIDGE {
					kind = "fdb"
				}
				left = append(left, fmt.Sprintf("%s %s lladdr %s", kind, nb.IP, nb.HardwareAddr))
			}
		}
	}
	return left
}

// The documented failures of Kubernetes mode, injected with `lab break`:
// each ends with the agent's own words in its log (and doctor's report),
// then heal brings back a green matrix.
func TestKubeLabFaults(t *testing.T) {
	l := kubeLab(t, "k3", "vxlan", 1)
	ctx := t.Context()
	agentLog := func(node string) string {
		data, _ := os.ReadFile(filepath.Join(l.NodeDir(node), "agent.log"))
		return string(data)
	}
	// waitLog waits until node's agent log, past offset, has a line
	// matching re, and returns it.
	waitLog := func(t *testing.T, node string, offset int, re *regexp.Regexp, within time.Duration) string {
		t.Helper()
		deadline := time.Now().Add(within)
		for {
			log := agentLog(node)
			if offset <= len(log) {
				for line := range strings.SplitSeq(log[offset:], "\n") {
					if re.MatchString(line) {
						return line
					}
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no line matching %s in %s's agent log within %s; it ends:\n%s", re, node, within, lastLines([]byte(log), 10))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	heal := func(t *testing.T) {
		t.Helper()
		if err := l.Heal(ctx); err != nil {
			t.Fatal(err)
		}
		mustCheck(t, l, l.Matrix())
	}
	podCIDR := func(t *testing.T) string { return getNode(t, l, "n1").Spec.PodCIDR }

	t.Run("kube-cidr-mismatch", func(t *testing.T) {
		cidr := podCIDR(t)
		offset := len(agentLog("n1"))
		if err := l.Break(ctx, "kube-cidr-mismatch"); err != nil {
			_ = l.Heal(ctx)
			t.Fatal(err)
		}
		line := waitLog(t, "n1", offset, regexp.MustCompile(regexp.QuoteMeta(cidr)+`.*`+regexp.QuoteMeta(kubeMismatchNetwork.String())), 5*time.Second)
		if !strings.Contains(line, "--pod-network-cidr") && !strings.Contains(line, "--cluster-cidr") {
			t.Errorf("the agent's error names both CIDRs but no fix: %s", line)
		}
		expectKubeDoctor(t, l, "kube-cidr-mismatch")
		heal(t)
	})

	t.Run("kube-no-podcidr", func(t *testing.T) {
		offset := len(agentLog("n1"))
		if err := l.Break(ctx, "kube-no-podcidr"); err != nil {
			_ = l.Heal(ctx)
			t.Fatal(err)
		}
		waitLog(t, "n1", offset, regexp.MustCompile(`pod cidr not assigned.*--allocate-node-cidrs`), 30*time.Second)
		if c := podCIDR(t); c != "" {
			t.Fatalf("n1 got podCIDR %s with the controller manager stopped", c)
		}
		expectKubeDoctor(t, l, "kube-no-podcidr")
		heal(t)
		n1, _ := l.Node("n1")
		checkFlannelAnnotations(t, l, *n1, getNode(t, l, "n1"))
		for _, p := range n1.Pods {
			checkPodObject(t, l, *n1, p)
		}
	})

	t.Run("kube-annotations-missing", func(t *testing.T) {
		if err := l.Break(ctx, "kube-annotations-missing"); err != nil {
			_ = l.Heal(ctx)
			t.Fatal(err)
		}
		expectKubeDoctor(t, l, "kube-annotations-missing")
		heal(t)
		n2, _ := l.Node("n2")
		checkFlannelAnnotations(t, l, *n2, getNode(t, l, "n2"))
	})

	t.Run("kube-network-unavailable", func(t *testing.T) {
		if err := l.Break(ctx, "kube-network-unavailable"); err != nil {
			_ = l.Heal(ctx)
			t.Fatal(err)
		}
		expectKubeDoctor(t, l, "kube-network-unavailable")
		heal(t)
		if c := nodeCondition(getNode(t, l, "n1"), v1.NodeNetworkUnavailable); c == nil || c.Status != v1.ConditionFalse {
			t.Errorf("after heal n1's NetworkUnavailable is %+v, want False", c)
		}
	})

	t.Run("etcd-scenario-refused", func(t *testing.T) {
		err := l.Break(ctx, "empty-registry")
		if err == nil || !strings.Contains(err.Error(), "needs a lab with --datastore etcd") {
			t.Fatalf("Break(empty-registry) in a kube lab = %v, want a refusal naming --datastore etcd", err)
		}
	})
}

// expectKubeDoctor asserts doctor's report on the scenario's node: the
// checks the scenario names report it, with evidence and a fix, and
// every other check is OK or SKIP.
func expectKubeDoctor(t *testing.T, l *Lab, name string) {
	t.Helper()
	sc, err := findScenario(name)
	if err != nil {
		t.Fatal(err)
	}
	r := runDoctor(t, l, sc.node)
	expectReport(t, r, sc.expect, true)
	for check := range sc.expect {
		res, _ := r.Result(check)
		if res.Fix == "" || len(res.Evidence) == 0 {
			t.Errorf("%s names no evidence or no fix:\n%s", check, render(r))
		}
	}
}
