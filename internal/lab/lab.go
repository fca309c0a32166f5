// Package lab builds a multi-node loom cluster on one machine out of network
// namespaces, running the real store, agents and CNI plugin, and tears it
// down again without leaving anything behind.
//
// Topology of lab "a" with a flat underlay and 3 nodes (every box is a
// network namespace; nothing is added to the root namespace):
//
//	                 loom-a-ext   eth0 203.0.113.10/24   (the "internet")
//	                      |
//	                 ext0 203.0.113.1/24
//	  loom-a-rt      br0  198.18.0.1/24, fixed MAC    loom store on :2379
//	             /          |           \
//	           n1           n2           n3            (veth ports of br0)
//	   eth0 198.18.0.11  198.18.0.12  198.18.0.13
//	  loom-a-n1        loom-a-n2     loom-a-n3         loom agent in each
//	   cni0 10.244.X.1/24 (made by loom-cni)
//	     |          |
//	loom-a-n1-p1  loom-a-n1-p2                        pods, made by loom-cni
//
// With --underlay routed, odd nodes sit on br0 (198.18.0.0/24) and even
// nodes on br1 (198.18.1.0/24), so nodes are no longer all on one link.
// With --store cluster, a 3-member etcd cluster with TLS runs in namespaces
// loom-a-s1..s3 on br0 (198.18.0.2-4) instead of loom store (cluster.go).
// With --datastore kube, the router also runs kube-apiserver (on
// 198.18.0.1:6443, its etcd the loom store on the router's 127.0.0.1) and
// kube-controller-manager, the agents run with --kube-subnet-mgr, and the
// lab stands in for the kubelets: Node and Pod objects (kube.go).
//
// Everything the lab owns is found by name (namespaces loom-<lab>-*, state
// under /run/loom/<lab>/, processes by the namespace they run in), so `down`
// works after a crash or a kill -9 of every lab process.
package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/loomnet/loom/internal/kubeclient"
	"github.com/loomnet/loom/internal/kubecp"
)

// Defaults and fixed parts of the address plan (DESIGN.md §5).
const (
	DefaultName = "a"
	StateRoot   = "/run/loom"
	NSPrefix    = "loom-"

	storePort   = 2379
	healthzPort = 2401
	probePort   = 7777
	podIfName   = "eth0"
	network     = "10.244.0.0/16"
)

var (
	underlayBase = netip.MustParseAddr("198.18.0.0")
	extRouter    = netip.MustParsePrefix("203.0.113.1/24")
	extHost      = netip.MustParsePrefix("203.0.113.10/24")
	labNameRE    = regexp.MustCompile(`^[a-z0-9]{1,6}$`)
)

// Options are the command-line choices of `loom lab up`.
type Options struct {
	Name      string
	Nodes     int
	Pods      int
	Backend   string // vxlan (default), udp or host-gw
	Underlay  string // flat | routed
	Firewall  string // auto | nftables | iptables, passed to every agent
	Store     string // embedded | cluster
	Datastore string // etcd | kube
	// ClusterCIDR is kube-controller-manager's --cluster-cidr with
	// --datastore kube: the range node podCIDRs are carved from. Default
	// the lab's Network, as kubeadm's --pod-network-cidr makes it.
	ClusterCIDR netip.Prefix `json:",omitzero"`
	// BinDir holds the loom and loom-cni binaries. Default: the directory
	// of the running executable.
	BinDir string
}

// Validate fills defaults and refuses what the lab cannot build, naming the
// flag, the value and what to use instead.
func (o *Options) Validate() error {
	if o.Name == "" {
		o.Name = DefaultName
	}
	if !labNameRE.MatchString(o.Name) {
		return fmt.Errorf("--name %q: use 1 to 6 lower-case letters or digits (namespace names are limited)", o.Name)
	}
	if o.Nodes == 0 {
		o.Nodes = 3
	}
	if o.Nodes < 1 || o.Nodes > 200 {
		return fmt.Errorf("--nodes %d: use 1 to 200", o.Nodes)
	}
	if o.Pods < 0 || o.Pods > 50 {
		return fmt.Errorf("--pods %d: use 0 to 50", o.Pods)
	}
	if o.Backend == "" {
		o.Backend = "vxlan"
	}
	switch o.Backend {
	case "host-gw", "vxlan", "udp":
	case "wireguard":
		return fmt.Errorf("--backend %s: not yet (encryption comes after phase 1); use vxlan, udp or host-gw", o.Backend)
	default:
		return fmt.Errorf("--backend %q: unknown; use vxlan, udp or host-gw", o.Backend)
	}
	if o.Underlay == "" {
		o.Underlay = "flat"
	}
	if o.Underlay != "flat" && o.Underlay != "routed" {
		return fmt.Errorf("--underlay %q: use flat or routed", o.Underlay)
	}
	if o.Firewall == "" {
		o.Firewall = "auto"
	}
	switch o.Firewall {
	case "auto", "nftables", "iptables":
	default:
		return fmt.Errorf("--firewall %q: use auto, nftables or iptables", o.Firewall)
	}
	if o.Store == "" {
		o.Store = "embedded"
	}
	if o.Store != "embedded" && o.Store != "cluster" {
		return fmt.Errorf("--store %q: use embedded (loom store) or cluster (a 3-member etcd cluster with TLS)", o.Store)
	}
	if o.Datastore == "" {
		o.Datastore = "etcd"
	}
	if err := o.validateDatastore(); err != nil {
		return err
	}
	if o.BinDir == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find the loom binaries: %w", err)
		}
		o.BinDir = filepath.Dir(exe)
	}
	for _, bin := range []string{"loom", "loom-lab", "loom-cni"} {
		if _, err := os.Stat(filepath.Join(o.BinDir, bin)); err != nil {
			return fmt.Errorf("binary %s not found in %s: run `make build` first (or pass --bin-dir)", bin, o.BinDir)
		}
	}
	return nil
}

// validateDatastore checks --datastore and what depends on it.
func (o *Options) validateDatastore() error {
	switch o.Datastore {
	case "etcd":
		if o.ClusterCIDR.IsValid() {
			return fmt.Errorf("--cluster-cidr %s: only with --datastore kube (kube-controller-manager assigns podCIDRs from it); drop it or add --datastore kube", o.ClusterCIDR)
		}
		return nil
	case "kube":
	default:
		return fmt.Errorf("--datastore %q: use etcd (agents lease subnets in the store) or kube (a Kubernetes control plane assigns podCIDRs)", o.Datastore)
	}
	if o.Store != "embedded" {
		return fmt.Errorf("--datastore kube with --store %s: kube-apiserver keeps its data in the lab's loom store; use --store embedded", o.Store)
	}
	if !o.ClusterCIDR.IsValid() {
		o.ClusterCIDR = netip.MustParsePrefix(network)
	}
	cidr := o.ClusterCIDR
	switch {
	case !cidr.Addr().Is4():
		return fmt.Errorf("--cluster-cidr %s: the lab's pods are IPv4; use an IPv4 range such as %s", cidr, network)
	case cidr != cidr.Masked():
		return fmt.Errorf("--cluster-cidr %s has host bits set; use %s", cidr, cidr.Masked())
	case cidr.Bits() > kubecp.DefaultNodeCIDRMaskSize:
		return fmt.Errorf("--cluster-cidr %s: too small for /%d node podCIDRs; use a /%d or larger range such as %s",
			cidr, kubecp.DefaultNodeCIDRMaskSize, kubecp.DefaultNodeCIDRMaskSize, network)
	case cidr.Overlaps(netip.MustParsePrefix(kubecp.DefaultServiceCIDR)):
		return fmt.Errorf("--cluster-cidr %s overlaps the Service range %s; use %s", cidr, kubecp.DefaultServiceCIDR, network)
	}
	if _, err := kubecp.FindBins(); err != nil {
		return fmt.Errorf("--datastore kube: %w", err)
	}
	return nil
}

// Node is one lab node as recorded in the lab's state file.
type Node struct {
	Name     string       // n1
	NS       string       // loom-a-n1
	Underlay netip.Prefix // 198.18.0.11/24
	Gateway  netip.Addr   // 198.18.0.1
	Pods     []Pod
}

// Pod is one pod namespace made through loom-cni.
type Pod struct {
	Name string     // n1-p1
	NS   string     // loom-a-n1-p1
	IP   netip.Addr // from the CNI result
}

// Lab is a built lab: its options and what it is made of.
type Lab struct {
	Opts  Options
	Store netip.AddrPort // client address of the embedded store
	// Members are the etcd cluster's members with --store cluster.
	Members []Member `json:",omitempty"`
	// Kube is the Kubernetes control plane with --datastore kube.
	Kube  *KubeState `json:",omitempty"`
	Nodes []Node

	kube *kubeclient.Client // admin client of Kube, made on first use
}

func (l *Lab) dir() string             { return filepath.Join(StateRoot, l.Opts.Name) }
func (l *Lab) nodeDir(n string) string { return filepath.Join(l.dir(), n) }
func (l *Lab) ns(part string) string   { return NSPrefix + l.Opts.Name + "-" + part }

// Node returns the node named n1, n2, ...
func (l *Lab) Node(name string) (*Node, error) {
	for i := range l.Nodes {
		if l.Nodes[i].Name == name {
			return &l.Nodes[i], nil
		}
	}
	return nil, fmt.Errorf("lab %s has no node %q", l.Opts.Name, name)
}

// NodeDir is where node's subnet.env, logs, IPAM and CNI files live.
func (l *Lab) NodeDir(node string) string { return l.nodeDir(node) }

// SubnetFile is the node's subnet.env.
func (l *Lab) SubnetFile(node string) string { return filepath.Join(l.nodeDir(node), "subnet.env") }

// StoreEndpoint is what agents get as -etcd-endpoints: the store's URL,
// or the members' URLs separated by commas.
func (l *Lab) StoreEndpoint() string { return strings.Join(l.StoreEndpoints(), ",") }

// StoreEndpoints are the store's client URLs.
func (l *Lab) StoreEndpoints() []string {
	if l.Opts.Store != "cluster" {
		return []string{"http://" + l.Store.String()}
	}
	var urls []string
	for _, m := range l.Members {
		urls = append(urls, m.ClientURL())
	}
	return urls
}

// RouterNS and ExtNS name the router and "internet" namespaces.
func (l *Lab) RouterNS() string { return l.ns("rt") }
func (l *Lab) ExtNS() string    { return l.ns("ext") }

// NSOf maps a lab member name (rt, ext, n1, n1-p1) to its namespace.
func (l *Lab) NSOf(member string) (string, error) {
	if member == "rt" || member == "ext" {
		return l.ns(member), nil
	}
	if m, err := l.Member(member); err == nil {
		return m.NS, nil
	}
	for _, n := range l.Nodes {
		if n.Name == member {
			return n.NS, nil
		}
		for _, p := range n.Pods {
			if p.Name == member {
				return p.NS, nil
			}
		}
	}
	return "", fmt.Errorf("lab %s has no member %q (use rt, ext, n1.., n1-p1.., s1..s3 with --store cluster)", l.Opts.Name, member)
}

func (l *Lab) save() error {
	data, err := json.MarshalIndent(l, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(l.dir(), ".lab.json.tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("save lab state: %w", err)
	}
	return os.Rename(tmp, filepath.Join(l.dir(), "lab.json"))
}

// ErrNoLab says there is no lab by that name.
var ErrNoLab = errors.New("no such lab")

// Load reads the state of a lab brought up earlier.
func Load(name string) (*Lab, error) {
	if name == "" {
		name = DefaultName
	}
	data, err := os.ReadFile(filepath.Join(StateRoot, name, "lab.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("lab %s: %w (bring it up with `loom lab up --name %s`)", name, ErrNoLab, name)
	}
	if err != nil {
		return nil, fmt.Errorf("load lab %s: %w", name, err)
	}
	var l Lab
	if err := json.Unmarshal(data, &l); err != nil {
		return nil, fmt.Errorf("load lab %s: %w", name, err)
	}
	return &l, nil
}

// nodeAddr is node i's (1-based) underlay address and its bridge index.
func nodeAddr(i int, routed bool) (netip.Prefix, int) {
	bridge := 0
	if routed {
		bridge = (i - 1) % 2
	}
	a := underlayBase.As4()
	a[2] = byte(bridge)
	a[3] = byte(10 + i)
	return netip.PrefixFrom(netip.AddrFrom4(a), 24), bridge
}

func bridgeAddr(bridge int) netip.Prefix {
	a := underlayBase.As4()
	a[2] = byte(bridge)
	a[3] = 1
	return netip.PrefixFrom(netip.AddrFrom4(a), 24)
}

func nodeName(i int) string             { return "n" + strconv.Itoa(i) }
func podName(node string, j int) string { return node + "-p" + strconv.Itoa(j) }
