package lab

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

// Unit tests of the lab's plan; no root needed.

func TestOptionsValidate(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		opts Options
		want string // error substring; "" = valid
	}{
		{name: "defaults", opts: Options{}, want: "binary loom not found"},
		{name: "bad name", opts: Options{Name: "Lab_1"}, want: `--name "Lab_1"`},
		{name: "too many nodes", opts: Options{Nodes: 500}, want: "--nodes 500"},
		{name: "wireguard not yet", opts: Options{Backend: "wireguard"}, want: "--backend wireguard: not yet"},
		{name: "unknown backend", opts: Options{Backend: "ipip"}, want: `--backend "ipip": unknown`},
		{name: "unknown firewall", opts: Options{Firewall: "pf"}, want: `--firewall "pf"`},
		{name: "bad underlay", opts: Options{Underlay: "mesh"}, want: `--underlay "mesh"`},
		{name: "unknown datastore", opts: Options{Datastore: "consul"}, want: `--datastore "consul": use etcd`},
		{name: "kube on the etcd cluster", opts: Options{Datastore: "kube", Store: "cluster"}, want: "--datastore kube with --store cluster: kube-apiserver keeps its data in the lab's loom store; use --store embedded"},
		{name: "cluster cidr without kube", opts: Options{ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16")}, want: "--cluster-cidr 10.244.0.0/16: only with --datastore kube"},
		{name: "cluster cidr IPv6", opts: Options{Datastore: "kube", ClusterCIDR: netip.MustParsePrefix("fd00::/48")}, want: "--cluster-cidr fd00::/48: the lab's pods are IPv4"},
		{name: "cluster cidr too small", opts: Options{Datastore: "kube", ClusterCIDR: netip.MustParsePrefix("10.244.0.0/25")}, want: "--cluster-cidr 10.244.0.0/25: too small for /24 node podCIDRs"},
		{name: "cluster cidr host bits", opts: Options{Datastore: "kube", ClusterCIDR: netip.MustParsePrefix("10.244.1.0/16")}, want: "has host bits set; use 10.244.0.0/16"},
		{name: "cluster cidr on services", opts: Options{Datastore: "kube", ClusterCIDR: netip.MustParsePrefix("10.96.0.0/16")}, want: "overlaps the Service range 10.96.0.0/12"},
		{name: "unknown store", opts: Options{Store: "consul"}, want: `--store "consul": use embedded (loom store) or cluster`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.opts
			o.BinDir = dir
			err := o.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate() = %v, want error containing %q", err, tc.want)
			}
		})
	}
}

func TestAddressPlan(t *testing.T) {
	for _, tc := range []struct {
		node       int
		routed     bool
		want       string
		wantBridge int
	}{
		{node: 1, want: "198.18.0.11/24"},
		{node: 3, want: "198.18.0.13/24"},
		{node: 1, routed: true, want: "198.18.0.11/24", wantBridge: 0},
		{node: 2, routed: true, want: "198.18.1.12/24", wantBridge: 1},
	} {
		got, br := nodeAddr(tc.node, tc.routed)
		if got != netip.MustParsePrefix(tc.want) || br != tc.wantBridge {
			t.Errorf("node %d routed=%v: %s on br%d, want %s on br%d", tc.node, tc.routed, got, br, tc.want, tc.wantBridge)
		}
		if !netip.MustParsePrefix("198.18.0.0/15").Contains(got.Addr()) {
			t.Errorf("node address %s outside the underlay plan", got)
		}
	}
}

func TestMatrixCoversEveryKind(t *testing.T) {
	l := &Lab{Opts: Options{Name: "a"}}
	for i := 1; i <= 3; i++ {
		a, _ := nodeAddr(i, false)
		n := Node{Name: nodeName(i), NS: l.ns(nodeName(i)), Underlay: a}
		for j := 1; j <= 2; j++ {
			n.Pods = append(n.Pods, Pod{Name: podName(n.Name, j), IP: netip.AddrFrom4([4]byte{10, 244, byte(i), byte(1 + j)})})
		}
		l.Nodes = append(l.Nodes, n)
	}
	kinds := map[string]int{}
	for _, r := range l.Matrix() {
		kinds[r.Kind]++
		if strings.HasPrefix(r.Kind, "pod->pod") {
			src := r.From
			if !r.WantSeen.IsValid() {
				t.Errorf("%s %s->%s does not check the source address", r.Kind, src, r.To)
			}
		}
	}
	for _, k := range []string{"pod->pod same node", "pod->pod cross-node", "node->pod", "pod->node", "pod->internet", "internet->pod"} {
		if kinds[k] == 0 {
			t.Errorf("matrix has no %q row", k)
		}
	}
}

func TestOverrideFlags(t *testing.T) {
	args := []string{"agent", "--node-name", "n1", "--iface", "eth0", "--ip-masq", "--subnet-file", "/x"}
	for _, tc := range []struct {
		name      string
		overrides []string
		want      string
	}{
		{name: "replace value", overrides: []string{"--iface", "nat0"}, want: "agent --node-name n1 --iface nat0 --ip-masq --subnet-file /x"},
		{name: "drop flag", overrides: []string{"--iface", ""}, want: "agent --node-name n1 --ip-masq --subnet-file /x"},
		{name: "bool off", overrides: []string{"--ip-masq", "false"}, want: "agent --node-name n1 --iface eth0 --ip-masq=false --subnet-file /x"},
		{name: "drop bool", overrides: []string{"--ip-masq", ""}, want: "agent --node-name n1 --iface eth0 --subnet-file /x"},
		{name: "add", overrides: []string{"--public-ip", "198.18.0.99"}, want: "agent --node-name n1 --iface eth0 --ip-masq --subnet-file /x --public-ip 198.18.0.99"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := strings.Join(overrideFlags(args, tc.overrides), " "); got != tc.want {
				t.Fatalf("got  %s\nwant %s", got, tc.want)
			}
		})
	}
}

// With --store cluster, the members sit below the nodes on br0, agents get
// every member's https URL and the client certificate.
func TestClusterPlan(t *testing.T) {
	for i, want := range []string{"198.18.0.2/24", "198.18.0.3/24", "198.18.0.4/24"} {
		if got := memberAddr(i + 1).String(); got != want {
			t.Errorf("member %d at %s, want %s", i+1, got, want)
		}
	}
	if first, _ := nodeAddr(1, false); memberAddr(clusterSize).Addr().Compare(first.Addr()) >= 0 {
		t.Fatalf("members reach into the nodes' addresses (%s)", first)
	}
	l := &Lab{Opts: Options{Name: "a", Store: "cluster", Firewall: "auto"}}
	for i := 1; i <= clusterSize; i++ {
		l.Members = append(l.Members, Member{Name: "s" + strconv.Itoa(i), Addr: memberAddr(i)})
	}
	if got, want := l.StoreEndpoint(), "https://198.18.0.2:2379,https://198.18.0.3:2379,https://198.18.0.4:2379"; got != want {
		t.Errorf("StoreEndpoint() = %s, want %s", got, want)
	}
	args := strings.Join(l.AgentArgs("n1"), " ")
	for _, want := range []string{"--etcd-cafile /run/loom/a/pki/ca.pem", "--etcd-certfile /run/loom/a/pki/client.pem", "--etcd-keyfile /run/loom/a/pki/client-key.pem"} {
		if !strings.Contains(args, want) {
			t.Errorf("agent args lack %q: %s", want, args)
		}
	}
}

// In Kubernetes mode the agents run as the DaemonSet runs them: the
// manifest's ServiceAccount, net-conf.json, and not one etcd flag.
func TestKubeAgentArgs(t *testing.T) {
	l := &Lab{Opts: Options{Name: "k", Firewall: "auto", Datastore: "kube"}, Kube: &KubeState{AgentKubeconfig: "/run/loom/k/kube/users/agent.kubeconfig"}}
	args := strings.Join(l.AgentArgs("n2"), " ")
	for _, want := range []string{"agent --node-name n2 --kube-subnet-mgr --kubeconfig-file /run/loom/k/kube/users/agent.kubeconfig --net-config-path /run/loom/k/net-conf.json", "--iface eth0", "--subnet-file /run/loom/k/n2/subnet.env", "--state-dir /run/loom/k/n2"} {
		if !strings.Contains(args, want) {
			t.Errorf("agent args lack %q: %s", want, args)
		}
	}
	if strings.Contains(args, "--etcd") {
		t.Errorf("agent args in Kubernetes mode name etcd: %s", args)
	}
	_, user, err := manifestRBAC()
	if err != nil {
		t.Fatal(err)
	}
	if user.Name != "system:serviceaccount:loom:loom" || strings.Join(user.Groups, ",") != "system:serviceaccounts,system:serviceaccounts:loom" {
		t.Errorf("agent user %+v, want the manifest's ServiceAccount loom/loom in its groups", user)
	}
}

// Every scenario says where it applies, and the Kubernetes ones are
// refused in an etcd lab with the fix.
func TestScenarioDatastores(t *testing.T) {
	kube := 0
	for _, sc := range scenarios() {
		switch sc.datastore {
		case "kube":
			kube++
			if !strings.HasPrefix(sc.name, "kube-") {
				t.Errorf("scenario %s is for Kubernetes labs only but not named kube-*", sc.name)
			}
		case "", "etcd":
		default:
			t.Errorf("scenario %s: datastore %q", sc.name, sc.datastore)
		}
	}
	if kube != 4 {
		t.Errorf("%d Kubernetes scenarios, want 4", kube)
	}
	l := &Lab{Opts: Options{Name: "zz", Datastore: "etcd"}}
	err := l.Break(t.Context(), "kube-no-podcidr")
	if err == nil || !strings.Contains(err.Error(), "scenario kube-no-podcidr needs a lab with --datastore kube, and lab zz runs --datastore etcd") {
		t.Fatalf("Break(kube-no-podcidr) in an etcd lab = %v", err)
	}
	l.Opts.Datastore = "kube"
	err = l.Break(t.Context(), "empty-registry")
	if err == nil || !strings.Contains(err.Error(), "needs a lab with --datastore etcd") {
		t.Fatalf("Break(empty-registry) in a kube lab = %v", err)
	}
}
