package doctor

// Kubernetes mode, with hand-made facts: node n1 of the healthy cluster of
// facts_test.go (underlay 198.18.0.0/24, pods 10.244.0.0/16, n1..n3 =
// 10.244.1-3.0/24), its subnets now the Nodes' podCIDRs, the API server at
// 198.18.0.1:6443. 10.245.0.0/16 is the "other" cluster CIDR of the
// mismatch cases. No test here needs root or an API server.

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/loomnet/loom/internal/kubesubnet"
)

const testPrefix = "flannel.alpha.coreos.com/"

// kubeNode is a Node whose agent runs the host-gw backend and holds its
// podCIDR: annotated, NetworkUnavailable=False.
func kubeNode(name, podCIDR, publicIP string) KubeNode {
	return KubeNode{
		Name: name, ResourceVersion: "100", PodCIDRs: []string{podCIDR},
		Annotations: map[string]string{
			testPrefix + "kube-subnet-manager": "true",
			testPrefix + "backend-type":        "host-gw",
			testPrefix + "backend-data":        "null",
			testPrefix + "public-ip":           publicIP,
		},
		NetworkUnavailable: &KubeCondition{Status: "False", Reason: "LoomIsUp", Message: "loom is running on this node",
			LastTransitionTime: time.Date(2026, 11, 22, 5, 0, 0, 0, time.UTC)},
	}
}

// healthyKubeFacts is healthyFacts in Kubernetes mode.
func healthyKubeFacts(t testing.TB) *Facts {
	t.Helper()
	f := healthyFacts(t)
	f.Opts = mustOptions(t, "--kube-subnet-mgr", "--kubeconfig-file", "/etc/loom/kubeconfig", "--node-name", "n1", "--iface", "eth0", "--ip-masq",
		"--subnet-file", "/run/flannel/subnet.env", "--healthz-ip", "127.0.0.1", "--healthz-port", "2401")
	f.ConfigFrom = "file /etc/kube-flannel/net-conf.json"
	n1 := kubeNode("n1", "10.244.1.0/24", "198.18.0.11")
	f.Kube = KubeFacts{
		Server: "https://198.18.0.1:6443", Via: "-kubeconfig-file /etc/loom/kubeconfig", Version: "v1.37.1",
		Prefix: testPrefix, NodeFrom: "the agent's node name", Node: &n1,
		Peers: []KubeNode{kubeNode("n2", "10.244.2.0/24", "198.18.0.12"), kubeNode("n3", "10.244.3.0/24", "198.18.0.13")},
		Took:  4 * time.Millisecond,
	}
	rederive(f)
	return f
}

// rederive reads the leases and the registry view from the Kubernetes
// facts, as Gather does.
func rederive(f *Facts) {
	f.Kube.readLeases(f.Config, f.Opts.NetConfigPath)
	f.Store = kubeStore(f.Kube)
}

// runKubeCases runs cases over healthyKubeFacts; every change to the
// Kubernetes facts is re-read into leases as Gather would.
func runKubeCases(t *testing.T, fn func(*Facts) Result, cases []checkCase) {
	t.Helper()
	for i := range cases {
		if change := cases[i].change; change != nil {
			cases[i].change = func(f *Facts) { change(f); rederive(f) }
		}
	}
	runCasesFrom(t, healthyKubeFacts, fn, cases)
}

func peer(f *Facts, name string) *KubeNode {
	for i := range f.Kube.Peers {
		if f.Kube.Peers[i].Name == name {
			return &f.Kube.Peers[i]
		}
	}
	panic("no peer " + name)
}

func forbidden() error {
	return apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, "",
		errors.New(`User "system:serviceaccount:loom:loom" cannot list resource "nodes" in API group "" at the cluster scope`))
}

func TestCheckStoreKube(t *testing.T) {
	runKubeCases(t, checkStore, []checkCase{
		{name: "healthy", want: OK, in: "Kubernetes API at https://198.18.0.1:6443 answers: 3 Nodes"},
		{name: "evidence names the credentials and the count", want: OK, in: "-kubeconfig-file /etc/loom/kubeconfig), server v1.37.1"},
		{name: "apiserver down", change: func(f *Facts) {
			f.Kube.Err = errors.New(`list Nodes: Get "https://198.18.0.1:6443/api/v1/nodes?limit=500": dial tcp 198.18.0.1:6443: connect: connection refused`)
			f.Kube.Dials = []string{"TCP connect to 198.18.0.1:6443: connect: connection refused"}
		}, want: Fail, in: "TCP connect to 198.18.0.1:6443: connect: connection refused", fix: "curl -k https://198.18.0.1:6443/readyz"},
		{name: "RBAC", change: func(f *Facts) { f.Kube.Err = fmt.Errorf("list Nodes: %w", forbidden()) },
			want: Fail, in: "cannot list resource", fix: "get, list and watch on nodes and patch on nodes/status"},
		{name: "expired token", change: func(f *Facts) { f.Kube.Err = fmt.Errorf("list Nodes: %w", apierrors.NewUnauthorized("Unauthorized")) },
			want: Fail, in: "Unauthorized", fix: "refuses the credentials of -kubeconfig-file /etc/loom/kubeconfig"},
		{name: "no kubeconfig outside a pod", change: func(f *Facts) {
			f.Kube = KubeFacts{Via: "in-cluster config (no -kubeconfig-file)", Prefix: testPrefix,
				Err: errors.New("-kube-subnet-mgr: no -kubeconfig-file given and not running in a pod")}
		}, want: Fail, in: "not running in a pod", fix: "-kubeconfig-file=FILE"},
		{name: "node not registered under the agent's name", change: func(f *Facts) {
			f.Kube.Node = nil
			f.Kube.NodeErr = fmt.Errorf("get Node n1: %w", apierrors.NewNotFound(schema.GroupResource{Resource: "nodes"}, "n1"))
		}, want: Fail, in: "no Node n1 in the cluster", fix: "NODE_NAME"},
		{name: "node of the agent's pod unknown", change: func(f *Facts) {
			f.Kube.Node, f.Kube.NodeFrom = nil, "pod loom/loom-x7k2p (POD_NAMESPACE/POD_NAME)"
			f.Kube.NodeErr = fmt.Errorf("find this node's name from pod loom/loom-x7k2p (POD_NAMESPACE/POD_NAME): %w; or set NODE_NAME", forbidden())
		}, want: Fail, in: "this node's Node is unknown: find this node's name from pod loom/loom-x7k2p", fix: "get on pods"},
		{name: "node not registered lists the names", change: func(f *Facts) {
			f.Kube.Node = nil
			f.Kube.NodeErr = apierrors.NewNotFound(schema.GroupResource{Resource: "nodes"}, "n1")
		}, want: Fail, in: "Nodes: n2, n3"},
	})
}

func TestCheckNetworkVsPodCIDR(t *testing.T) {
	noPodCIDR := func(f *Facts) {
		f.Kube.Node.PodCIDRs = nil
		f.SubnetEnv.Env, f.SubnetEnv.Err = nil, errors.New("not written")
	}
	otherClusterCIDR := func(f *Facts) {
		f.Kube.Node.PodCIDRs = []string{"10.245.1.0/24"}
		peer(f, "n2").PodCIDRs = []string{"10.245.2.0/24"}
		peer(f, "n3").PodCIDRs = []string{"10.245.3.0/24"}
		f.SubnetEnv.Env, f.SubnetEnv.Err = nil, errors.New("not written")
	}
	runKubeCases(t, checkNetworkVsLease, []checkCase{
		{name: "healthy", want: OK, in: "this node's podCIDR 10.244.1.0/24 and every peer's lie inside Network 10.244.0.0/16"},
		{name: "pod cidr not assigned", change: noPodCIDR, want: Fail, in: "pod cidr not assigned to node n1: the agent waits for one",
			fix: "--allocate-node-cidrs=true and --cluster-cidr=10.244.0.0/16 (kubeadm init --pod-network-cidr=10.244.0.0/16"},
		{name: "pod cidr not assigned: the agent's very words", change: noPodCIDR, want: Fail,
			fix: kubesubnet.NoPodCIDR("n1", *mustConfig(t, `{"Network":"10.244.0.0/16"}`), "/etc/kube-flannel/net-conf.json").Fix},
		{name: "no node has one: allocation is off", change: func(f *Facts) {
			noPodCIDR(f)
			peer(f, "n2").PodCIDRs, peer(f, "n3").PodCIDRs = nil, nil
		}, want: Fail, in: "no podCIDR either: 2 Nodes of 2 other Nodes (n2, n3)", fix: "kubectl patch node n1"},
		{name: "cluster CIDR is not Network", change: otherClusterCIDR, want: Fail,
			in:  "node n1 has podCIDR 10.245.1.0/24 (from kube-controller-manager --cluster-cidr), which is not inside Network 10.244.0.0/16 of /etc/kube-flannel/net-conf.json",
			fix: `set "Network" in /etc/kube-flannel/net-conf.json`},
		{name: "cluster CIDR is not Network: evidence says where each came from", change: otherClusterCIDR, want: Fail,
			in:  "file /etc/kube-flannel/net-conf.json: Network 10.244.0.0/16\nNode n1: spec.podCIDRs 10.245.1.0/24 (assigned by kube-controller-manager",
			fix: "--pod-network-cidr=10.244.0.0/16"},
		{name: "cluster CIDR is not Network: the agent's very words", change: otherClusterCIDR, want: Fail,
			in: kubesubnet.PodCIDROutsideNetwork("n1", pfx("10.245.1.0/24"), pfx("10.244.0.0/16"), "Network", "/etc/kube-flannel/net-conf.json").Problem},
		{name: "cluster CIDR is not Network: peers too", change: otherClusterCIDR, want: Fail, in: "2 peer podCIDRs are outside Network 10.244.0.0/16: 10.245.2.0/24 (n2), 10.245.3.0/24 (n3)"},
		{name: "a hand-made peer outside", change: func(f *Facts) { peer(f, "n3").PodCIDRs = []string{"10.96.3.0/24"} },
			want: Fail, in: "10.96.3.0/24 (n3)"},
		{name: "config changed under running agents", change: func(f *Facts) {
			f.Config = mustConfig(t, `{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw"}}`)
		}, want: Fail, in: "the agent runs with Network 10.244.0.0/16 (subnet.env) but file /etc/kube-flannel/net-conf.json says 10.0.0.0/8", fix: "rollout restart"},
		{name: "dual stack without an IPv6 podCIDR", change: func(f *Facts) {
			f.Config = mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}`)
		}, want: Fail, in: "node n1 has no IPv6 podCIDR (podCIDRs [10.244.1.0/24]), but /etc/kube-flannel/net-conf.json enables IPv6",
			fix: `give kube-controller-manager an IPv6 --cluster-cidr (kubeadm --pod-network-cidr), or set "EnableIPv6": false`},
		{name: "dual stack", change: func(f *Facts) {
			f.Config = mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}`)
			for i, n := range append([]*KubeNode{f.Kube.Node}, peer(f, "n2"), peer(f, "n3")) {
				n.PodCIDRs = append(n.PodCIDRs, fmt.Sprintf("fd00:10:244:%d::/64", i+1))
			}
		}, want: OK, in: "inside Network 10.244.0.0/16 and IPv6Network fd00:10:244::/56"},
		{name: "podCIDR with host bits", change: func(f *Facts) { f.Kube.Node.PodCIDRs = []string{"10.244.1.7/24"} },
			want: Fail, in: `node n1: podCIDR 10.244.1.7/24 has host bits set`},
		{name: "Node unreadable", change: func(f *Facts) { f.Kube.Node, f.Kube.NodeErr = nil, forbidden() }, want: Skip, in: CheckStore},
		{name: "no config file", change: func(f *Facts) {
			f.Config, f.ConfigErr = nil, fmt.Errorf("open /etc/kube-flannel/net-conf.json: %w", os.ErrNotExist)
		}, want: Fail, in: "the network config /etc/kube-flannel/net-conf.json is unreadable: open /etc/kube-flannel/net-conf.json: file does not exist",
			fix: "loom-config ConfigMap"},
	})
}

func TestCheckKubeAnnotations(t *testing.T) {
	unannotated := func(names ...string) func(*Facts) {
		return func(f *Facts) {
			for _, n := range names {
				peer(f, n).Annotations = map[string]string{}
			}
		}
	}
	runCases(t, checkKubeAnnotations, []checkCase{{name: "etcd mode", want: Skip, in: "not in Kubernetes mode"}})
	runKubeCases(t, checkKubeAnnotations, []checkCase{
		{name: "healthy", want: OK, in: "Node n1 announces host-gw at 198.18.0.11; 2 peers are announced"},
		{name: "healthy shows the annotations", want: OK, in: "flannel.alpha.coreos.com/public-ip=198.18.0.11"},
		{name: "this node unannotated", change: func(f *Facts) { f.Kube.Node.Annotations = map[string]string{} }, want: Fail,
			in:  "missing flannel.alpha.coreos.com/kube-subnet-manager, flannel.alpha.coreos.com/backend-type, flannel.alpha.coreos.com/backend-data, flannel.alpha.coreos.com/public-ip",
			fix: "patch on nodes/status"},
		{name: "this node lacks public-ip", change: func(f *Facts) { delete(f.Kube.Node.Annotations, testPrefix+"public-ip") },
			want: Fail, in: "missing flannel.alpha.coreos.com/public-ip"},
		{name: "this node announces another backend", change: func(f *Facts) { f.Kube.Node.Annotations[testPrefix+"backend-type"] = "vxlan" },
			want: Fail, in: "backend-type is vxlan but file /etc/kube-flannel/net-conf.json says host-gw", fix: "rollout restart"},
		{name: "this node without an address", change: func(f *Facts) { f.Kube.Node.Annotations[testPrefix+"public-ip"] = "0.0.0.0" },
			want: Fail, in: "public-ip is 0.0.0.0"},
		{name: "this node with garbage", change: func(f *Facts) { f.Kube.Node.Annotations[testPrefix+"backend-data"] = "{VtepMAC" },
			want: Fail, in: `flannel.alpha.coreos.com/backend-data="{VtepMAC" is not JSON`},
		{name: "a peer whose agent never ran", change: unannotated("n3"), want: Warn,
			in: "1 peer of 2 gets no route from this node: n3 (no flannel.alpha.coreos.com/kube-subnet-manager annotation", fix: "kubectl -n loom get pods -o wide"},
		{name: "a peer of another backend", change: func(f *Facts) {
			n2 := peer(f, "n2")
			n2.Annotations[testPrefix+"backend-type"] = "vxlan"
			n2.Annotations[testPrefix+"backend-data"] = `{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}`
		}, want: Warn, in: "n2 (backend vxlan, this node host-gw: skipped)", fix: "one Backend.Type (host-gw) everywhere"},
		{name: "peers waiting for a podCIDR", change: func(f *Facts) {
			unannotated("n2", "n3")(f)
			peer(f, "n2").PodCIDRs, peer(f, "n3").PodCIDRs = nil, nil
		}, want: Warn, in: "2 peers of 2 get no route from this node: n2 (no podCIDR and no annotations: its agent waits for a podCIDR); n3", fix: "--allocate-node-cidrs=true"},
		{name: "a peer with an unusable address", change: func(f *Facts) { peer(f, "n2").Annotations[testPrefix+"public-ip"] = "n2.example" },
			want: Warn, in: `public-ip="n2.example" is not an IPv4 address`},
		{name: "this node has no podCIDR", change: func(f *Facts) {
			f.Kube.Node.PodCIDRs, f.Kube.Node.Annotations = nil, map[string]string{}
		}, want: Skip, in: "judged by network-vs-lease"},
		{name: "this node's podCIDR outside Network", change: func(f *Facts) {
			f.Kube.Node.PodCIDRs, f.Kube.Node.Annotations = []string{"10.245.1.0/24"}, map[string]string{}
		}, want: Skip, in: "judged by network-vs-lease"},
		{name: "API down", change: func(f *Facts) { f.Kube.Err = errors.New("connection refused") }, want: Skip, in: CheckStore},
		{name: "another annotation prefix", change: func(f *Facts) {
			f.Kube.Prefix = "example.com/net-"
			for _, n := range append([]*KubeNode{f.Kube.Node}, peer(f, "n2"), peer(f, "n3")) {
				m := map[string]string{}
				for k, v := range n.Annotations {
					m["example.com/net-"+strings.TrimPrefix(k, testPrefix)] = v
				}
				n.Annotations = m
			}
		}, want: OK, in: "example.com/net-backend-type=host-gw"},
		{name: "another prefix than the Nodes carry", change: func(f *Facts) { f.Kube.Prefix = "example.com/net-" },
			want: Fail, in: "missing example.com/net-kube-subnet-manager"},
	})
}

func TestCheckKubeNetworkUnavailable(t *testing.T) {
	unset := func(f *Facts) { f.Kube.Node.NetworkUnavailable = nil }
	runCases(t, checkKubeNetworkUnavailable, []checkCase{{name: "etcd mode", want: Skip, in: "not in Kubernetes mode"}})
	runKubeCases(t, checkKubeNetworkUnavailable, []checkCase{
		{name: "healthy", want: OK, in: "NetworkUnavailable=False (LoomIsUp)"},
		{name: "evidence", want: OK, in: `reason LoomIsUp, "loom is running on this node", since 2026-11-22T05:00:00Z`},
		{name: "still true", change: func(f *Facts) {
			f.Kube.Node.NetworkUnavailable = &KubeCondition{Status: "True", Reason: "NodeInitialization", Message: "waiting for the network plugin",
				LastTransitionTime: time.Date(2026, 11, 22, 4, 0, 0, 0, time.UTC)}
		}, want: Fail, in: "NetworkUnavailable=True reason NodeInitialization, \"waiting for the network plugin\", since 2026-11-22T04:00:00Z",
			fix: "the agent sets NetworkUnavailable=False once it holds the node's subnet"},
		{name: "set by a cloud route controller", change: func(f *Facts) {
			f.Kube.Node.NetworkUnavailable = &KubeCondition{Status: "True", Reason: "NoRouteCreated", Message: "Node created without a route"}
		}, want: Fail, in: "tainted node.kubernetes.io/network-unavailable", fix: "--configure-cloud-routes=false"},
		{name: "absent while the agent is ready", change: unset, want: Fail, in: "the agent is ready but NetworkUnavailable is not set", fix: "patch on nodes/status"},
		{name: "absent while the agent is down", change: func(f *Facts) {
			unset(f)
			f.Ready.Status, f.Ready.Err = 0, errors.New("connection refused")
		}, want: Skip, in: CheckAgentReady},
		{name: "absent while the agent is not ready", change: func(f *Facts) {
			unset(f)
			f.Ready.Status = http.StatusServiceUnavailable
		}, want: Skip, in: CheckAgentReady},
		{name: "absent, readiness unknown", change: func(f *Facts) {
			unset(f)
			f.Ready = ReadyFacts{}
		}, want: Warn, in: "-healthz-port 0"},
		{name: "unknown", change: func(f *Facts) { f.Kube.Node.NetworkUnavailable.Status = "Unknown" }, want: Warn, in: "NetworkUnavailable=Unknown"},
		{name: "not the agent's job (-set-node-network-unavailable=false)", change: func(f *Facts) {
			f.Opts.SetNodeNetworkUnavailable = false
			f.Kube.Node.NetworkUnavailable = &KubeCondition{Status: "True", Reason: "NoRouteCreated"}
		}, want: Skip, in: "-set-node-network-unavailable=false: Node n1's NetworkUnavailable condition (True (reason NoRouteCreated)) is not its job"},
		{name: "not the agent's job, and not set", change: func(f *Facts) {
			f.Opts.SetNodeNetworkUnavailable = false
			unset(f)
		}, want: Skip, in: "(not set) is not its job"},
		{name: "API down", change: func(f *Facts) { f.Kube.Err = errors.New("connection refused") }, want: Skip},
	})
}

// The other checks read the node's podCIDR as its lease, and the peers'
// Nodes as theirs.
func TestKubeModeRegistryChecks(t *testing.T) {
	t.Run("subnet-env", func(t *testing.T) {
		runKubeCases(t, checkSubnetEnv, []checkCase{
			{name: "healthy", want: OK, in: "Node n1 podCIDR 10.244.1.0/24"},
			{name: "stale after the Node was re-registered", change: func(f *Facts) { f.Kube.Node.PodCIDRs = []string{"10.244.9.0/24"} },
				want: Fail, in: "subnet.env says 10.244.1.1/24, the node's lease is 10.244.9.0/24", fix: "restart the agent"},
			{name: "no podCIDR", change: func(f *Facts) { f.Kube.Node.PodCIDRs = nil }, want: OK, in: "no usable podCIDR"},
			{name: "API down", change: func(f *Facts) { f.Kube.Err = errors.New("down") }, want: OK, in: "not compared"},
		})
	})
	t.Run("public-ip", func(t *testing.T) {
		runKubeCases(t, checkPublicIP, []checkCase{
			{name: "healthy", want: OK, in: "2 peers routed through eth0"},
			{name: "Node announces another address", change: func(f *Facts) { f.Kube.Node.Annotations[testPrefix+"public-ip"] = "198.18.0.99" },
				want: Fail, in: "this node's lease advertises 198.18.0.99 but the flags choose 198.18.0.11"},
			{name: "the operator's override", change: func(f *Facts) {
				f.Kube.Node.Annotations[testPrefix+"public-ip"] = "198.19.0.11"
				f.Kube.Node.Annotations[testPrefix+"public-ip-overwrite"] = "198.19.0.11"
			}, want: OK, in: "public-ip-overwrite annotation"},
			{name: "a peer on this node's address", change: func(f *Facts) { peer(f, "n3").Annotations[testPrefix+"public-ip"] = "198.18.0.11" },
				want: Fail, in: "198.18.0.11 is already the public IP of node n3"},
		})
	})
	t.Run("peer-liveness", func(t *testing.T) {
		runKubeCases(t, checkPeerLiveness, []checkCase{
			{name: "healthy", want: OK, in: "2 peers answer"},
			{name: "dead peer", change: func(f *Facts) { f.Peers[0].Alive, f.Peers[0].Answer = false, "timeout" },
				want: Warn, in: "no answer from 1 peer: n2", fix: "kubectl delete node n2"},
			{name: "API down", change: func(f *Facts) { f.Kube.Err = errors.New("down") }, want: Skip, in: "Kubernetes API unreadable"},
		})
	})
	t.Run("datapath", func(t *testing.T) {
		runKubeCases(t, checkDatapath, []checkCase{
			{name: "healthy", want: OK, in: "host-gw data path programmed for 2 peers"},
			{name: "route missing", change: func(f *Facts) { f.Kernel.Routes = f.Kernel.Routes[:3] }, want: Fail, in: "no route to 10.244.2.0/24"},
			{name: "a peer of another backend is not expected", change: func(f *Facts) {
				f.Kernel.Routes = slices.Delete(f.Kernel.Routes, 3, 4) // n2's
				peer(f, "n2").Annotations[testPrefix+"backend-type"] = "vxlan"
			}, want: OK, in: "n2 10.244.2.0/24: runs vxlan, not routed (see kube-annotations)"},
			{name: "an unannotated peer is not expected", change: func(f *Facts) {
				f.Kernel.Routes = slices.Delete(f.Kernel.Routes, 3, 4)
				peer(f, "n2").Annotations = map[string]string{}
			}, want: OK, in: "for 1 peer"},
		})
	})
}

// Every check is OK on a healthy node in Kubernetes mode.
func TestHealthyKubeFactsAllOK(t *testing.T) {
	f := healthyKubeFacts(t)
	for _, r := range Run(f) {
		if r.Status != OK {
			t.Errorf("%s: %s %s %v", r.Check, r.Status, r.Summary, r.Evidence)
		}
	}
}

// readKubeNode and the lease reading follow the agent: podCIDRs, else
// podCIDR; only the prefix's annotations; peers need the
// kube-subnet-manager annotation, this node only its podCIDR.
func TestReadKubeNode(t *testing.T) {
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	node := func(name, podCIDR string, ann map[string]string) *v1.Node {
		return &v1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: "7", Annotations: ann},
			Spec:       v1.NodeSpec{PodCIDR: podCIDR},
			Status: v1.NodeStatus{Conditions: []v1.NodeCondition{
				{Type: v1.NodeReady, Status: v1.ConditionTrue},
				{Type: v1.NodeNetworkUnavailable, Status: v1.ConditionTrue, Reason: "NoRouteCreated"},
			}},
		}
	}
	announced := map[string]string{
		testPrefix + "kube-subnet-manager": "true",
		testPrefix + "backend-type":        "vxlan",
		testPrefix + "backend-data":        `{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}`,
		testPrefix + "public-ip":           "198.18.0.12",
		"node.alpha.kubernetes.io/ttl":     "0",
	}
	k := KubeFacts{Prefix: testPrefix}
	own := readKubeNode(node("n1", "10.244.1.0/24", nil), testPrefix)
	k.Node = &own
	k.Peers = []KubeNode{
		readKubeNode(node("n2", "10.244.2.0/24", announced), testPrefix),
		readKubeNode(node("n3", "10.244.3.0/24", nil), testPrefix),
		readKubeNode(node("n4", "", announced), testPrefix),
	}
	k.readLeases(cfg, "/etc/kube-flannel/net-conf.json")

	if own.NetworkUnavailable == nil || own.NetworkUnavailable.Status != "True" || own.NetworkUnavailable.Reason != "NoRouteCreated" || own.ResourceVersion != "7" {
		t.Errorf("own Node read as %+v", own)
	}
	if k.Node.LeaseErr != nil || k.Node.Lease.Subnet != pfx("10.244.1.0/24") || k.Node.Lease.Attrs.NodeName != "n1" || k.Node.Lease.Reserved() {
		t.Errorf("own lease %+v, %v: want 10.244.1.0/24 of n1 from the podCIDR alone", k.Node.Lease, k.Node.LeaseErr)
	}
	n2 := k.Peers[0]
	if _, found := n2.Annotations["node.alpha.kubernetes.io/ttl"]; found || len(n2.Annotations) != 4 {
		t.Errorf("annotations kept: %v", n2.Annotations)
	}
	if n2.LeaseErr != nil || n2.Lease.Subnet != pfx("10.244.2.0/24") || n2.Lease.Attrs.PublicIP != addr("198.18.0.12") ||
		n2.Lease.Attrs.BackendType != "vxlan" || string(n2.Lease.Attrs.BackendData) != `{"VNI":1,"VtepMAC":"0e:00:00:00:00:02"}` {
		t.Errorf("peer lease %+v, %v", n2.Lease, n2.LeaseErr)
	}
	for _, p := range k.Peers[1:] {
		if !errors.Is(p.LeaseErr, kubesubnet.ErrNotPeer) {
			t.Errorf("%s: lease error %v, want not a peer", p.Name, p.LeaseErr)
		}
	}
	s := kubeStore(k)
	if !s.Listed() || len(s.Leases) != 2 || s.Leases[0].Attrs.NodeName != "n1" || s.Leases[1].Attrs.NodeName != "n2" {
		t.Errorf("registry view %+v", s)
	}
}

// The agent takes node-public-ip in place of -public-ip; so does doctor.
func TestKubeOptionsNodePublicIP(t *testing.T) {
	o := mustOptions(t, "--kube-subnet-mgr", "--node-name", "n1", "--public-ip", "198.18.0.11")
	n := kubeNode("n1", "10.244.1.0/24", "198.18.0.11")
	n.Annotations[testPrefix+"node-public-ip"] = "198.18.0.21"
	k := KubeFacts{Prefix: testPrefix, Node: &n}
	if got := kubeOptions(o, k).PublicIP; got != addr("198.18.0.21") {
		t.Errorf("public IP %s, want the annotation's 198.18.0.21", got)
	}
	n.Annotations[testPrefix+"node-public-ip"] = "not-an-address"
	if got := kubeOptions(o, k).PublicIP; got != addr("198.18.0.11") {
		t.Errorf("public IP %s with a bad annotation, want the flag's 198.18.0.11", got)
	}
}
