package doctor

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/loomnet/loom/internal/kubesubnet"
	"github.com/loomnet/loom/internal/netconf"
)

// Kubernetes mode (-kube-subnet-mgr). The node's subnet is its Node's
// spec.podCIDR, which kube-controller-manager assigns from --cluster-cidr
// (kubeadm's --pod-network-cidr) only with --allocate-node-cidrs=true; the
// agent announces the node to its peers in flannel's Node annotations and
// turns the NetworkUnavailable condition False. What goes wrong, in the
// order the checks look: the API cannot be read with the agent's
// credentials (store); the node has no podCIDR, or one outside the
// network config's Network, because the pod CIDR was given twice and
// differently (network-vs-lease); the annotations are missing or say
// another backend, here or on peers (kube-annotations); the condition
// still keeps pods off the node (kube-network-unavailable).

// checkKubeAPI is the store check in Kubernetes mode: the API server answers
// the agent's credentials, lists the Nodes and holds this node's.
func checkKubeAPI(f *Facts) Result {
	k := f.Kube
	server := k.Server
	if server == "" {
		server = "(unknown)"
	}
	where := fmt.Sprintf("Kubernetes API at %s (%s)", server, k.Via)
	if k.Version != "" {
		where += ", server " + k.Version
	}
	if k.Err != nil {
		return fail(fmt.Sprintf("Kubernetes API at %s: %v", server, k.Err), kubeAPIFix(f, k.Err), append([]string{where}, k.Dials...)...)
	}
	withCIDR, announced := 0, 0
	for _, p := range k.Peers {
		if p.HasPodCIDR() {
			withCIDR++
		}
		if p.LeaseErr == nil {
			announced++
		}
	}
	ev := []string{where, fmt.Sprintf("node %s: %s", f.Node, k.NodeFrom),
		fmt.Sprintf("%s besides this one: %d with a podCIDR, %d announced by their agents (read in %s)",
			plural(len(k.Peers), "other Node"), withCIDR, announced, k.Took.Round(time.Millisecond))}
	if k.NodeErr != nil {
		if apierrors.IsNotFound(k.NodeErr) {
			var names []string
			for _, p := range k.Peers {
				names = append(names, p.Name)
			}
			ev = append(ev, "Nodes: "+strings.Join(orNone(names), ", "))
			return fail(fmt.Sprintf("no Node %s in the cluster: the agent waits for it and the node has no pod network", f.Node),
				fmt.Sprintf("the agent's node name must be the kubelet's (kubectl get nodes lists them): set NODE_NAME from the downward API (spec.nodeName) or -node-name; "+
					"if the kubelet has not registered %s yet, start it", f.Node), ev...)
		}
		return fail(fmt.Sprintf("Kubernetes API at %s answers, but this node's Node is unknown: %v", server, k.NodeErr), kubeAPIFix(f, k.NodeErr), ev...)
	}
	return ok(fmt.Sprintf("Kubernetes API at %s answers: %s", server, plural(len(k.Peers)+1, "Node")), ev...)
}

// kubeAPIFix says what to do about an API error, by its kind.
func kubeAPIFix(f *Facts, err error) string {
	switch {
	case apierrors.IsUnauthorized(err):
		return fmt.Sprintf("the API server refuses the credentials of %s (token or certificate wrong or expired): give -kubeconfig-file a kubeconfig with valid ones; "+
			"in the DaemonSet the kubelet mounts the ServiceAccount's token", f.Kube.Via)
	case apierrors.IsForbidden(err):
		return "the agent's user lacks the permission the error names: it needs get, list and watch on nodes and patch on nodes/status " +
			"(and get on pods when it finds its node through POD_NAME); bind it to a ClusterRole like deploy/kubernetes/loom.yaml's " +
			"(check with kubectl auth can-i list nodes --as=USER)"
	case f.Kube.Server == "":
		return "give the agent (and doctor, which reads the same flags) -kubeconfig-file=FILE, or run it in its DaemonSet pod where the in-cluster config exists"
	}
	return fmt.Sprintf("check that the API server runs and that this node reaches %s (-kube-api-url or the kubeconfig's server): curl -k %s/readyz; "+
		"pods keep working while it is down, but no node can join or learn of a peer", f.Kube.Server, f.Kube.Server)
}

// checkPodCIDRVsNetwork is network-vs-lease in Kubernetes mode: the node's
// podCIDR must lie inside the network config's Network. The controller
// carves podCIDRs out of --cluster-cidr, so a podCIDR outside Network means
// the pod CIDR was given twice and differently (kubeadm --pod-network-cidr
// vs net-conf.json); the agent then refuses the subnet. No podCIDR at all
// means the controller allocates none (--allocate-node-cidrs off): the
// agent waits. Also: the agent runs with the Network the config says.
func checkPodCIDRVsNetwork(f *Facts) Result {
	cfg := f.Config
	nets := configNetworks(cfg)
	ev := []string{fmt.Sprintf("%s: %s", f.ConfigFrom, nets)}
	var problems []string
	if e := f.SubnetEnv.Env; e != nil {
		ev = append(ev, fmt.Sprintf("%s: FLANNEL_NETWORK=%s FLANNEL_SUBNET=%s", f.SubnetEnv.Path, e.Network, e.Subnet))
		if cfg.EnableIPv4 && e.Network.IsValid() && e.Network != cfg.Network {
			problems = append(problems, fmt.Sprintf("the agent runs with Network %s (subnet.env) but %s says %s", e.Network, f.ConfigFrom, cfg.Network))
		}
	}
	restart := fmt.Sprintf("restart the agents so they run with %s's network (kubectl -n loom rollout restart daemonset loom), then re-create pods that have addresses of the old one", f.ConfigFrom)
	n := f.Kube.Node
	if n == nil {
		if len(problems) > 0 {
			return fail(strings.Join(problems, "; "), restart, ev...)
		}
		return skip("needs this node's Node (see %s)", CheckStore)
	}
	var bare []string // peers without a podCIDR either
	for _, p := range f.Kube.Peers {
		if !p.HasPodCIDR() {
			bare = append(bare, p.Name)
		}
	}
	if !n.HasPodCIDR() {
		ev = append(ev, fmt.Sprintf("Node %s: spec.podCIDR and spec.podCIDRs empty", n.Name))
		if len(bare) > 0 {
			ev = append(ev, fmt.Sprintf("no podCIDR either: %s of %d other Nodes (%s)", plural(len(bare), "Node"), len(f.Kube.Peers), strings.Join(bare, ", ")))
		}
		// The agent's own words, and its fix.
		e := kubesubnet.NoPodCIDR(n.Name, *cfg, f.Opts.NetConfigPath)
		return fail(e.Problem+": the agent waits for one, and the node has no pod network", e.Fix, ev...)
	}
	ev = append(ev, fmt.Sprintf("Node %s: spec.podCIDRs %s (assigned by kube-controller-manager from its --cluster-cidr)", n.Name, strings.Join(n.PodCIDRs, ",")))
	own := podCIDRProblem(*n, cfg, f.Opts.NetConfigPath)
	if own != nil {
		problems = append(problems, own.Problem)
	}
	var (
		outside  []string                   // peers' podCIDRs outside the network
		unusable []*kubesubnet.PodCIDRError // peers' podCIDRs wrong otherwise
	)
	for _, p := range f.Kube.Peers {
		switch pe := podCIDRProblem(p, cfg, f.Opts.NetConfigPath); {
		case pe == nil:
		case errors.Is(pe, kubesubnet.ErrPodCIDROutsideNetwork):
			outside = append(outside, fmt.Sprintf("%s (%s)", strings.Join(p.PodCIDRs, ","), p.Name))
		default:
			unusable = append(unusable, pe)
			problems = append(problems, pe.Problem)
		}
	}
	if len(outside) > 0 {
		problems = append(problems, fmt.Sprintf("%s outside %s: %s", plural(len(outside), "peer podCIDR")+isAre(len(outside)), nets, strings.Join(outside, ", ")))
	}
	if len(problems) == 0 {
		return ok(fmt.Sprintf("this node's podCIDR %s and every peer's lie inside %s", strings.Join(n.PodCIDRs, ","), nets), ev...)
	}
	mismatch := len(outside) > 0 || (own != nil && errors.Is(own, kubesubnet.ErrPodCIDROutsideNetwork))
	fix := restart
	switch {
	case !mismatch && own != nil:
		fix = own.Fix // a family missing, a podCIDR that does not parse: the agent's fix
	case !mismatch && len(unusable) > 0:
		fix = unusable[0].Fix
	case mismatch:
		fix = fmt.Sprintf("use one pod CIDR everywhere: set \"Network\" in %s (net-conf.json of the loom-config ConfigMap: kubectl -n loom edit configmap loom-config) "+
			"to the cluster's pod CIDR, kube-controller-manager's --cluster-cidr (kubeadm's --pod-network-cidr; kubectl cluster-info dump | grep -m1 cluster-cidr shows it), "+
			"and restart the agents; or re-create the cluster with kubeadm init --pod-network-cidr=%s", f.Opts.NetConfigPath, kubesubnet.ClusterCIDR(*cfg))
	}
	return fail(strings.Join(problems, "; "), fix, ev...)
}

// configNetworks renders the config's networks: "Network 10.244.0.0/16".
func configNetworks(cfg *netconf.Config) string {
	var parts []string
	if cfg.EnableIPv4 {
		parts = append(parts, "Network "+cfg.Network.String())
	}
	if cfg.EnableIPv6 {
		parts = append(parts, "IPv6Network "+cfg.IPv6Network.String())
	}
	return strings.Join(parts, " and ")
}

// podCIDRProblem says why the agent cannot take a Node's podCIDRs with
// cfg, in the agent's words (kubesubnet.NodeSubnets): one that does not
// parse, a family the config enables without a podCIDR, a podCIDR outside
// its network. nil when it can, or when the Node has none: that is the
// controller's business, reported apart.
func podCIDRProblem(n KubeNode, cfg *netconf.Config, netConfigPath string) *kubesubnet.PodCIDRError {
	if !n.HasPodCIDR() {
		return nil
	}
	var pe *kubesubnet.PodCIDRError
	if _, _, err := kubesubnet.NodeSubnets(n.object(), *cfg, netConfigPath); errors.As(err, &pe) {
		return pe
	}
	return nil
}

// ownPodCIDRUsable reports whether the agent can take this node's podCIDR:
// only then has it written the annotations and the condition.
func ownPodCIDRUsable(f *Facts) bool {
	n := f.Kube.Node
	if n == nil || !n.HasPodCIDR() {
		return false
	}
	return f.Config == nil || podCIDRProblem(*n, f.Config, f.Opts.NetConfigPath) == nil
}

// requiredAnnotations are the annotations an agent writes on its Node for
// cfg (flannel's set): without them peers do not route to the node.
func requiredAnnotations(cfg *netconf.Config) []string {
	names := []string{kubesubnet.AnnKubeSubnetManager, kubesubnet.AnnBackendType}
	if cfg == nil || cfg.EnableIPv4 {
		names = append(names, kubesubnet.AnnBackendData, kubesubnet.AnnPublicIP)
	}
	if cfg != nil && cfg.EnableIPv6 {
		names = append(names, kubesubnet.AnnBackendV6Data, kubesubnet.AnnPublicIPv6)
	}
	return names
}

// checkKubeAnnotations: peers learn this node's public address, backend
// and VTEP from its annotations, so a node without them gets no route from
// anyone, and one whose backend-type differs is skipped by every peer's
// backend. The same holds for peers: a peer whose agent never ran (no
// annotations) or runs another backend gets no route from this node.
func checkKubeAnnotations(f *Facts) Result {
	if !f.kube() {
		return skip("not in Kubernetes mode")
	}
	k := f.Kube
	if k.Err != nil || k.Node == nil {
		return skip("needs this node's Node (see %s)", CheckStore)
	}
	if !ownPodCIDRUsable(f) {
		return skip("the agent writes the annotations once it holds a podCIDR: judged by %s", CheckNetworkLease)
	}
	n, ann := *k.Node, k.annotations()
	bt := f.backendType()
	ev := append([]string{fmt.Sprintf("Node %s:", n.Name)}, orNone(sortedAnnotations(n))...)

	var missing, problems []string
	for _, name := range requiredAnnotations(f.Config) {
		if _, found := n.Annotations[ann.Key(name)]; !found {
			missing = append(missing, ann.Key(name))
		}
	}
	if v, found := n.Annotations[ann.Key(kubesubnet.AnnKubeSubnetManager)]; found && !ann.Managed(n.Annotations) {
		problems = append(problems, fmt.Sprintf("%s is %q, not \"true\"", ann.Key(kubesubnet.AnnKubeSubnetManager), v))
	}
	if len(missing) > 0 {
		problems = append(problems, "missing "+strings.Join(missing, ", "))
	}
	if got := n.Annotations[ann.Key(kubesubnet.AnnBackendType)]; got != "" && bt != "" && got != bt {
		problems = append(problems, fmt.Sprintf("backend-type is %s but %s says %s: every peer's backend skips this node", got, f.ConfigFrom, bt))
	}
	if _, err := ann.PublicIP(n.Annotations, kubesubnet.AnnPublicIP, false); err != nil {
		problems = append(problems, problem(err))
	} else if v := n.Annotations[ann.Key(kubesubnet.AnnPublicIP)]; v != "" && (f.Config == nil || f.Config.EnableIPv4) {
		if ip, _ := netip.ParseAddr(v); ip.IsUnspecified() {
			problems = append(problems, fmt.Sprintf("%s is %s: the agent found no IPv4 address, peers cannot reach the node", ann.Key(kubesubnet.AnnPublicIP), v))
		}
	}
	if _, err := ann.BackendData(n.Annotations, kubesubnet.AnnBackendData); err != nil {
		problems = append(problems, problem(err))
	}
	if len(problems) > 0 {
		return fail(fmt.Sprintf("Node %s's annotations do not announce it to its peers: %s; no peer routes to its pods", n.Name, strings.Join(problems, "; ")),
			fmt.Sprintf("the agent writes them (through nodes/status) once it holds the subnet, and again when someone removes them: "+
				"if it runs with another config, restart it (kubectl -n loom rollout restart daemonset loom); if not, read its log "+
				"(kubectl -n loom get pods -o wide --field-selector spec.nodeName=%s, then kubectl -n loom logs POD): its user needs patch on nodes/status, "+
				"and an admission webhook may drop the annotations", n.Name), ev...)
	}

	var unrouted []string
	for _, peer := range k.Peers {
		if why := unroutedPeer(f, peer); why != "" {
			unrouted = append(unrouted, peer.Name+" ("+why+")")
		}
	}
	if len(unrouted) > 0 {
		return warn(fmt.Sprintf("%s of %d get%s no route from this node: %s", plural(len(unrouted), "peer"), len(k.Peers), verbS(len(unrouted)), strings.Join(unrouted, "; ")),
			fmt.Sprintf("run loom (or flanneld with -kube-subnet-mgr) on every node, with one Backend.Type (%s) everywhere: "+
				"kubectl -n loom get pods -o wide shows where it runs; a Node without a podCIDR needs kube-controller-manager --allocate-node-cidrs=true", orDefault(bt, "the config's")),
			append(ev, unrouted...)...)
	}
	return ok(fmt.Sprintf("Node %s announces %s at %s; %s announced", n.Name, n.Annotations[ann.Key(kubesubnet.AnnBackendType)], n.Annotations[ann.Key(kubesubnet.AnnPublicIP)],
		plural(len(k.Peers), "peer")+isAre(len(k.Peers))), ev...)
}

// unroutedPeer says why this node's agent does not route to a peer Node,
// "" when it does.
func unroutedPeer(f *Facts, n KubeNode) string {
	key := f.Kube.annotations().Key(kubesubnet.AnnKubeSubnetManager)
	_, annotated := n.Annotations[key]
	switch {
	case !n.HasPodCIDR() && !annotated:
		return "no podCIDR and no annotations: its agent waits for a podCIDR"
	case !n.HasPodCIDR():
		return "annotated but no podCIDR"
	case !annotated:
		return "no " + key + " annotation: no agent in Kubernetes mode announces it (none ever ran there, or it is down and the annotations were removed)"
	case n.LeaseErr != nil:
		return problem(n.LeaseErr)
	case !f.sameBackend(n.Lease):
		return fmt.Sprintf("backend %s, this node %s: skipped", orDefault(n.Lease.Attrs.BackendType, "udp"), f.backendType())
	}
	return ""
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// checkKubeNetworkUnavailable: while a Node's NetworkUnavailable condition
// is True, the node lifecycle controller taints it
// (node.kubernetes.io/network-unavailable) and the scheduler keeps pods
// off. Cloud route controllers start Nodes that way; the agent turns it
// False once it holds the subnet, unless it runs with flanneld's
// -set-node-network-unavailable=false: then the condition is someone
// else's (a cloud route controller, another plugin) and not judged here.
func checkKubeNetworkUnavailable(f *Facts) Result {
	if !f.kube() {
		return skip("not in Kubernetes mode")
	}
	k := f.Kube
	if k.Err != nil || k.Node == nil {
		return skip("needs this node's Node (see %s)", CheckStore)
	}
	n := k.Node
	if !f.Opts.SetNodeNetworkUnavailable {
		state := "not set"
		if c := n.NetworkUnavailable; c != nil {
			state = fmt.Sprintf("%s (reason %s)", c.Status, orDefault(c.Reason, "none"))
		}
		return skip("the agent runs with -set-node-network-unavailable=false: Node %s's NetworkUnavailable condition (%s) is not its job", n.Name, state)
	}
	fix := fmt.Sprintf("the agent sets NetworkUnavailable=False once it holds the node's subnet: see %s and %s, and read its log "+
		"(kubectl -n loom get pods -o wide --field-selector spec.nodeName=%s, then kubectl -n loom logs POD); its user needs patch on nodes/status",
		CheckNetworkLease, CheckAgentReady, n.Name)
	c := n.NetworkUnavailable
	if c == nil {
		ev := []string{fmt.Sprintf("Node %s has no NetworkUnavailable condition", n.Name)}
		switch {
		case f.Ready.URL == "":
			return warn("NetworkUnavailable is not set on Node "+n.Name+", and the agent's readiness is unknown (-healthz-port 0): no agent in Kubernetes mode has confirmed the network", fix, ev...)
		case f.Ready.Err == nil && f.Ready.Status == http.StatusOK:
			return fail("the agent is ready but NetworkUnavailable is not set on Node "+n.Name+": its write of the condition did not reach the API server", fix, ev...)
		}
		return skip("NetworkUnavailable not set yet: the agent sets it once ready (see %s)", CheckAgentReady)
	}
	ev := []string{fmt.Sprintf("Node %s: NetworkUnavailable=%s reason %s, %q, since %s", n.Name, c.Status, orDefault(c.Reason, "(none)"), c.Message,
		c.LastTransitionTime.UTC().Format(time.RFC3339))}
	switch c.Status {
	case "False":
		return ok(fmt.Sprintf("NetworkUnavailable=False (%s)", orDefault(c.Reason, "no reason")), ev...)
	case "True":
		if c.Reason == "NoRouteCreated" || strings.Contains(strings.ToLower(c.Message), "route") {
			fix += "; a cloud route controller sets it True (reason NoRouteCreated) when it cannot make the node's route: with an overlay, run kube-controller-manager with --configure-cloud-routes=false"
		}
		return fail(fmt.Sprintf("NetworkUnavailable=True on Node %s: the node is tainted node.kubernetes.io/network-unavailable and no pod is scheduled there", n.Name), fix, ev...)
	}
	return warn(fmt.Sprintf("NetworkUnavailable=%s on Node %s: neither set nor cleared", c.Status, n.Name), fix, ev...)
}
