package doctor

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loomnet/loom/internal/kubeclient"
	"github.com/loomnet/loom/internal/kubesubnet"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
)

// Kubernetes mode (-kube-subnet-mgr): the registry is the API server. Doctor
// reaches it exactly as the agent does (kubeclient.New with the agent's
// -kubeconfig-file and -kube-api-url, else the in-cluster config) and sends
// GET and LIST requests only, each bounded by --timeout: the server's
// version, this node's Node, and the Nodes in pages. It starts no informer
// and watches nothing, so a user allowed only to get and list nodes can run
// it.

// listPage is how many Nodes one LIST returns; a 5,000-node cluster is ten
// requests.
const listPage = 500

// gatherKube reads the API. nodeGiven says doctor's --node named the node;
// otherwise the node is the agent's, found as the agent finds it (with
// POD_NAME and POD_NAMESPACE when the name is only the hostname). It returns
// the facts and the node name.
func gatherKube(ctx context.Context, cfg Config, netCfg *netconf.Config, nodeGiven bool) (KubeFacts, string) {
	o := cfg.Opts
	start := time.Now()
	k := KubeFacts{Prefix: o.KubeAnnotationPrefix, Via: kubeVia(o)}
	if k.Prefix == "" {
		k.Prefix = kubesubnet.DefaultAnnotationPrefix
	}
	node := cfg.Node
	k.NodeFrom = "the agent's node name (-node-name, else NODE_NAME, else the hostname)"
	if nodeGiven {
		k.NodeFrom = "doctor's --node"
	}
	client, err := kubeclient.New(kubeclient.Config{
		KubeconfigFile: o.KubeconfigFile,
		APIURL:         o.KubeAPIURL,
		RequestTimeout: cfg.Timeout,
		DialTimeout:    cfg.Timeout,
		Logger:         cfg.Logger,
	})
	if err != nil {
		k.Err = err
		return k, node
	}
	defer client.Close()
	k.Server = client.Server()

	if !nodeGiven && o.NodeNameFromHostname && o.PodName != "" && o.PodNamespace != "" {
		// kube-flannel.yml gives the agent its pod's name, not the node's.
		k.NodeFrom = fmt.Sprintf("pod %s/%s (POD_NAMESPACE/POD_NAME)", o.PodNamespace, o.PodName)
		if name, err := client.NodeOfPod(ctx, o.PodNamespace, o.PodName); err != nil {
			k.NodeErr = err
		} else {
			node = name
		}
	}

	var (
		wg    sync.WaitGroup
		own   *v1.Node
		nodes []v1.Node
	)
	// The version is decoration: a server that does not say is no fault.
	wg.Go(func() { k.Version, _ = client.ServerVersion(ctx) })
	if k.NodeErr == nil {
		wg.Go(func() {
			own, k.NodeErr = client.Nodes().Get(ctx, node)
			if k.NodeErr != nil {
				k.NodeErr = fmt.Errorf("get Node %s: %w", node, k.NodeErr)
			}
		})
	}
	wg.Go(func() { nodes, k.Err = listNodes(ctx, client.Nodes()) })
	wg.Wait()
	k.Took = time.Since(start)
	if k.Err != nil {
		k.Dials = dialEndpoints([]string{k.Server}, time.Second)
		return k, node
	}
	if k.NodeErr == nil {
		n := readKubeNode(own, k.Prefix)
		k.Node = &n
	}
	for i := range nodes {
		if nodes[i].Name == node {
			continue
		}
		k.Peers = append(k.Peers, readKubeNode(&nodes[i], k.Prefix))
	}
	slices.SortFunc(k.Peers, func(a, b KubeNode) int { return strings.Compare(a.Name, b.Name) })
	k.readLeases(netCfg, o.NetConfigPath)
	return k, node
}

func kubeVia(o options.Options) string {
	via := "in-cluster config (no -kubeconfig-file)"
	if o.KubeconfigFile != "" {
		via = "-kubeconfig-file " + o.KubeconfigFile
	}
	if o.KubeAPIURL != "" {
		via += ", -kube-api-url " + o.KubeAPIURL
	}
	return via
}

// listNodes lists every Node, a page at a time, each page bounded.
func listNodes(ctx context.Context, api kubeclient.Nodes) ([]v1.Node, error) {
	var out []v1.Node
	opts := metav1.ListOptions{Limit: listPage}
	for {
		list, err := api.List(ctx, opts)
		if err != nil {
			return nil, fmt.Errorf("list Nodes: %w", err)
		}
		out = append(out, list.Items...)
		if list.Continue == "" {
			return out, nil
		}
		opts.Continue = list.Continue
	}
}

// readKubeNode keeps what doctor judges of a Node.
func readKubeNode(n *v1.Node, prefix string) KubeNode {
	kn := KubeNode{Name: n.Name, ResourceVersion: n.ResourceVersion, Annotations: map[string]string{}}
	kn.PodCIDRs = slices.Clone(kubesubnet.PodCIDRList(n))
	for key, v := range n.Annotations {
		if strings.HasPrefix(key, prefix) {
			kn.Annotations[key] = v
		}
	}
	for _, c := range n.Status.Conditions {
		if c.Type == v1.NodeNetworkUnavailable {
			kn.NetworkUnavailable = &KubeCondition{Status: string(c.Status), Reason: c.Reason, Message: c.Message, LastTransitionTime: c.LastTransitionTime.Time}
		}
	}
	return kn
}

// readLeases reads every Node's lease as the agent does with cfg (read
// from netConfigPath, for messages): this node's from its podCIDR, the
// peers' from podCIDR and annotations, with kubesubnet's own reading. cfg
// nil (no network config) leaves them unread.
func (k *KubeFacts) readLeases(cfg *netconf.Config, netConfigPath string) {
	ann := k.annotations()
	read := func(n *KubeNode, own bool) {
		switch {
		case cfg == nil:
			n.Lease, n.LeaseErr = lease.Lease{}, errors.New("no network config to read the Node with")
		case own:
			n.Lease, n.LeaseErr = ann.OwnLease(n.object(), *cfg, netConfigPath)
		default:
			n.Lease, n.LeaseErr = ann.NodeLease(n.object(), *cfg)
		}
	}
	if k.Node != nil {
		read(k.Node, true)
	}
	for i := range k.Peers {
		read(&k.Peers[i], false)
	}
}

// annotations are the agent's annotation keys and readers, under the
// agent's prefix.
func (k KubeFacts) annotations() kubesubnet.Annotations {
	return kubesubnet.Annotations{Prefix: k.Prefix}
}

// object is the Node again, as far as doctor kept it: what kubesubnet
// reads (name, podCIDRs, annotations).
func (n KubeNode) object() *v1.Node {
	return &v1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, ResourceVersion: n.ResourceVersion, Annotations: n.Annotations},
		Spec:       v1.NodeSpec{PodCIDRs: n.PodCIDRs},
	}
}

// problem is what is wrong with an annotation or a podCIDR, without the
// skip reason kubesubnet adds for its metric.
func problem(err error) string {
	var skip *kubesubnet.SkipError
	if errors.As(err, &skip) {
		return skip.Detail
	}
	return err.Error()
}

// kubeStore is the registry view of the Kubernetes facts: the API server's
// reachability, this node's lease and the peers' leases.
func kubeStore(k KubeFacts) StoreFacts {
	s := StoreFacts{Kube: true, Err: k.Err, Dials: k.Dials, Took: k.Took}
	if k.Server != "" {
		s.Endpoints = []string{k.Server}
	}
	if k.Err != nil {
		return s
	}
	s.Leases = []lease.Lease{}
	if k.Node != nil && k.Node.LeaseErr == nil {
		s.Leases = append(s.Leases, k.Node.Lease)
	}
	for _, p := range k.Peers {
		if p.LeaseErr == nil {
			s.Leases = append(s.Leases, p.Lease)
		}
	}
	return s
}

// kubeOptions are the agent's flags as the agent completes them from its
// Node: the node-public-ip annotation takes the place of -public-ip.
func kubeOptions(o options.Options, k KubeFacts) options.Options {
	if k.Node == nil {
		return o
	}
	// An unusable annotation stops the agent at start; doctor keeps the
	// flag's address and lets the other checks speak.
	if ip, _, err := k.annotations().NodePublicIPs(k.Node.Annotations); err == nil && ip.IsValid() {
		o.PublicIP = ip
	}
	return o
}

// sortedAnnotations renders a Node's annotations as key=value lines.
func sortedAnnotations(n KubeNode) []string {
	var out []string
	for _, key := range slices.Sorted(maps.Keys(n.Annotations)) {
		out = append(out, fmt.Sprintf("%s=%s", key, n.Annotations[key]))
	}
	return out
}
