package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/loomnet/loom/internal/kubesubnet"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
)

// Kubernetes mode (-kube-subnet-mgr): the registry is the API server. Doctor
// reaches it exactly as the agent does (kubesubnet.NewClient with the
// agent's -kubeconfig-file and -kube-api-url, else the in-cluster config)
// and sends GET and LIST requests only: the server's version, this node's
// Node, and the Nodes in pages. It starts no informer and watches nothing,
// so a user allowed only to get and list nodes can run it.

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
	client, err := kubesubnet.NewClient(kubesubnet.ClientConfig{
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
	cs := client.Clientset()

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
	wg.Go(func() { k.Version = serverVersion(ctx, cs, cfg.Timeout) })
	if k.NodeErr == nil {
		wg.Go(func() {
			rctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
			defer cancel()
			own, k.NodeErr = cs.CoreV1().Nodes().Get(rctx, node, metav1.GetOptions{})
			if k.NodeErr != nil {
				k.NodeErr = fmt.Errorf("get Node %s: %w", node, k.NodeErr)
			}
		})
	}
	wg.Go(func() { nodes, k.Err = listNodes(ctx, cs, cfg.Timeout) })
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
	k.readLeases(netCfg)
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
func listNodes(ctx context.Context, cs kubernetes.Interface, timeout time.Duration) ([]v1.Node, error) {
	var out []v1.Node
	opts := metav1.ListOptions{Limit: listPage}
	for {
		rctx, cancel := context.WithTimeout(ctx, timeout)
		list, err := cs.CoreV1().Nodes().List(rctx, opts)
		cancel()
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

// serverVersion is the API server's gitVersion, "" when it does not say.
func serverVersion(ctx context.Context, cs kubernetes.Interface, timeout time.Duration) string {
	rc := cs.Discovery().RESTClient()
	if rc == nil {
		return ""
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	raw, err := rc.Get().AbsPath("/version").Do(ctx).Raw()
	if err != nil {
		return ""
	}
	var v struct {
		GitVersion string `json:"gitVersion"`
	}
	if json.Unmarshal(raw, &v) != nil {
		return ""
	}
	return v.GitVersion
}

// readKubeNode keeps what doctor judges of a Node.
func readKubeNode(n *v1.Node, prefix string) KubeNode {
	kn := KubeNode{Name: n.Name, ResourceVersion: n.ResourceVersion, Annotations: map[string]string{}}
	kn.PodCIDRs = slices.Clone(n.Spec.PodCIDRs)
	if len(kn.PodCIDRs) == 0 && n.Spec.PodCIDR != "" {
		kn.PodCIDRs = []string{n.Spec.PodCIDR}
	}
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

// readLeases reads every Node's lease as the agent does with cfg: this
// node's from its podCIDR, the peers' from podCIDR and annotations. cfg
// nil (no network config) leaves them unread.
func (k *KubeFacts) readLeases(cfg *netconf.Config) {
	read := func(n *KubeNode, own bool) {
		switch {
		case cfg == nil:
			n.Lease, n.LeaseErr = lease.Lease{}, errors.New("no network config to read the Node with")
		case own:
			n.Lease, n.LeaseErr = ownNodeLease(*n, *cfg, k.Prefix)
		default:
			n.Lease, n.LeaseErr = peerNodeLease(*n, *cfg, k.Prefix)
		}
	}
	if k.Node != nil {
		read(k.Node, true)
	}
	for i := range k.Peers {
		read(&k.Peers[i], false)
	}
}

// The agent's reading of a Node.
//
// REPLACE with kubesubnet's translation once it exports it (the agent's
// node → lease: annotation names, podCIDR parsing, what makes a peer). This
// is the smallest copy doctor needs meanwhile; it follows the agent's
// rules (internal/kubesubnet/node.go) and must not grow.

// Annotation names after the prefix (flannel's).
const (
	annKubeSubnetMgr  = "kube-subnet-manager"
	annBackendType    = "backend-type"
	annBackendData    = "backend-data"
	annPublicIP       = "public-ip"
	annBackendV6Data  = "backend-v6-data"
	annPublicIPv6     = "public-ipv6"
	annPublicIPOver   = "public-ip-overwrite"
	annNodePublicIP   = "node-public-ip"
	annotationTrue    = "true"
	backendDataNone   = "null" // what flanneld writes for a backend without data
	leaseExpiryOfNode = 24 * time.Hour
)

// errNotPeer is a Node the agent does not route to because its agent never
// announced it: no podCIDR, or no kube-subnet-manager annotation.
var errNotPeer = errors.New("not a peer: no podCIDR or no kube-subnet-manager annotation")

// errNoPodCIDR is a Node without a pod CIDR.
var errNoPodCIDR = errors.New("no podCIDR assigned")

// parsePodCIDRs splits a Node's pod CIDRs by family.
func parsePodCIDRs(list []string) (v4, v6 netip.Prefix, err error) {
	if len(list) > 2 {
		return v4, v6, fmt.Errorf("spec.podCIDRs %v has %d entries: at most one IPv4 and one IPv6 CIDR", list, len(list))
	}
	for _, s := range list {
		p, perr := netip.ParsePrefix(s)
		if perr != nil || p != p.Masked() {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("podCIDR %q is not a network address with a prefix length", s)
		}
		dst := &v4
		if p.Addr().Is6() {
			dst = &v6
		}
		if dst.IsValid() {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("spec.podCIDRs %v has two CIDRs of one family", list)
		}
		*dst = p
	}
	return v4, v6, nil
}

// ownNodeLease is this node's lease: its podCIDRs of the enabled families,
// with whatever attributes its annotations carry (kube-annotations judges
// those), so subnet.env and the data path can be compared with it.
func ownNodeLease(n KubeNode, cfg netconf.Config, prefix string) (lease.Lease, error) {
	if !n.HasPodCIDR() {
		return lease.Lease{}, errNoPodCIDR
	}
	v4, v6, err := parsePodCIDRs(n.PodCIDRs)
	if err != nil {
		return lease.Lease{}, err
	}
	l := lease.Lease{Attrs: lease.Attrs{NodeName: n.Name, BackendType: n.Annotations[prefix+annBackendType]},
		Expiration: time.Now().Add(leaseExpiryOfNode)}
	if cfg.EnableIPv4 {
		l.Subnet = v4
		l.Attrs.PublicIP, _ = annotationAddr(n, prefix+annPublicIP, false)
		l.Attrs.BackendData, _ = annotationJSON(n, prefix+annBackendData)
	}
	if cfg.EnableIPv6 {
		l.IPv6Subnet = v6
		if ip, _ := annotationAddr(n, prefix+annPublicIPv6, true); ip.IsValid() {
			l.Attrs.PublicIPv6 = &ip
		}
		l.Attrs.BackendV6Data, _ = annotationJSON(n, prefix+annBackendV6Data)
	}
	if !l.Subnet.IsValid() && !l.IPv6Subnet.IsValid() {
		return lease.Lease{}, fmt.Errorf("no podCIDR of a family the network config enables (podCIDRs %v)", n.PodCIDRs)
	}
	return l, nil
}

// peerNodeLease is the lease the agent reads from a peer Node, or why it
// reads none.
func peerNodeLease(n KubeNode, cfg netconf.Config, prefix string) (lease.Lease, error) {
	if n.Annotations[prefix+annKubeSubnetMgr] != annotationTrue || !n.HasPodCIDR() {
		return lease.Lease{}, errNotPeer
	}
	v4, v6, err := parsePodCIDRs(n.PodCIDRs)
	if err != nil {
		return lease.Lease{}, err
	}
	l := lease.Lease{Attrs: lease.Attrs{NodeName: n.Name, BackendType: n.Annotations[prefix+annBackendType]},
		Expiration: time.Now().Add(leaseExpiryOfNode)}
	if l.Attrs.BackendType == "" {
		return lease.Lease{}, fmt.Errorf("no %s annotation", prefix+annBackendType)
	}
	if cfg.EnableIPv4 {
		if !v4.IsValid() {
			return lease.Lease{}, fmt.Errorf("no IPv4 podCIDR (podCIDRs %v) but the network config enables IPv4", n.PodCIDRs)
		}
		l.Subnet = v4
		if l.Attrs.PublicIP, err = annotationAddr(n, prefix+annPublicIP, false); err != nil {
			return lease.Lease{}, err
		}
		if l.Attrs.BackendData, err = annotationJSON(n, prefix+annBackendData); err != nil {
			return lease.Lease{}, err
		}
	}
	if cfg.EnableIPv6 {
		if !v6.IsValid() {
			return lease.Lease{}, fmt.Errorf("no IPv6 podCIDR (podCIDRs %v) but the network config enables IPv6", n.PodCIDRs)
		}
		l.IPv6Subnet = v6
		ip, err := annotationAddr(n, prefix+annPublicIPv6, true)
		if err != nil {
			return lease.Lease{}, err
		}
		if ip.IsValid() {
			l.Attrs.PublicIPv6 = &ip
		}
		if l.Attrs.BackendV6Data, err = annotationJSON(n, prefix+annBackendV6Data); err != nil {
			return lease.Lease{}, err
		}
	}
	return l, nil
}

// annotationAddr reads an address annotation; absent or unspecified
// (flanneld writes "0.0.0.0" for none) is the invalid Addr.
func annotationAddr(n KubeNode, key string, v6 bool) (netip.Addr, error) {
	s := n.Annotations[key]
	if s == "" {
		return netip.Addr{}, nil
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" || ip.Is6() != v6 || ip.Is4In6() {
		return netip.Addr{}, fmt.Errorf("%s=%q is not an %s address", key, s, familyName(v6))
	}
	if ip.IsUnspecified() {
		return netip.Addr{}, nil
	}
	return ip, nil
}

// annotationJSON reads a backend data annotation; "null" is none.
func annotationJSON(n KubeNode, key string) (json.RawMessage, error) {
	s := strings.TrimSpace(n.Annotations[key])
	if s == "" || s == backendDataNone {
		return nil, nil
	}
	if !json.Valid([]byte(s)) {
		return nil, fmt.Errorf("%s is not JSON: %.64q", key, s)
	}
	return json.RawMessage(s), nil
}

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
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
	if ip, err := annotationAddr(*k.Node, k.Prefix+annNodePublicIP, false); err == nil && ip.IsValid() {
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
