package doctor

import (
	"net/netip"
	"time"

	"github.com/loomnet/loom/internal/cni"
	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
	"github.com/loomnet/loom/internal/subnetenv"
)

// Facts is everything doctor read from the node. A read that failed leaves
// its error in the matching Err field; checks turn that into evidence, a
// SKIP or a FAIL as it deserves.
type Facts struct {
	Node       string          // the node name the agent uses (-node-name, $NODE_NAME, hostname; or --node)
	Opts       options.Options // the agent's flags as the agent reads them
	ArgsSource string          // where Opts came from: "command line", "running agent (pid 812)"

	// Config is the network config the agent runs with: the file named by
	// -net-config-path when that flag is set or in Kubernetes mode, else
	// the store's.
	Config     *netconf.Config
	ConfigFrom string // "etcd /coreos.com/network/config", "file /etc/kube-flannel/net-conf.json"
	ConfigErr  error

	// Store is the registry. In Kubernetes mode it is filled from Kube:
	// the API server's reachability, and the leases the agent reads from
	// the Nodes (this node's podCIDR, and every peer Node's podCIDR and
	// annotations), so the checks of peers work in both modes.
	Store     StoreFacts
	Kube      KubeFacts // Kubernetes mode only
	SubnetEnv SubnetEnvFacts
	Underlay  UnderlayFacts
	Kernel    KernelFacts
	CNI       CNIFacts
	IPAM      IPAMFacts
	Ready     ReadyFacts
	Peers     []PeerProbe // one per peer lease with a public IP
	Firewall  FirewallFacts
}

// StoreFacts is what the registry holds.
type StoreFacts struct {
	// Kube says the registry is the Kubernetes API (the Nodes), not etcd:
	// Endpoints then holds the API server's URL, Prefix is empty and
	// Config nil (the config is a file).
	Kube      bool
	Endpoints []string
	Prefix    string
	// Err is set when the registry could not be listed: the store is
	// unreachable (or refuses us).
	Err error
	// Config is <prefix>/config, parsed; ConfigErr says why it is not.
	Config    *netconf.Config
	ConfigErr error
	Leases    []lease.Lease // every lease and reservation, when Err is nil
	// Dials says what a plain TCP connect to each endpoint gave, when the
	// registry could not be read: "198.18.0.1:2379: connection refused".
	Dials    []string
	Revision int64
	Took     time.Duration
}

// Listed reports whether the registry was read.
func (s StoreFacts) Listed() bool { return s.Err == nil && (s.Prefix != "" || s.Kube) }

// KubeFacts is what the Kubernetes API says about this node and its peers
// (-kube-subnet-mgr), read with GET and LIST only.
type KubeFacts struct {
	Server  string // the API server's URL, as the client connects to it
	Via     string // where the connection config came from: "-kubeconfig-file /x", "in-cluster config"
	Version string // the API server's version, "" when unread
	Prefix  string // the annotation prefix, normalised: "flannel.alpha.coreos.com/"
	// NodeFrom says how this node's name was found: "-node-name",
	// "pod kube-flannel/loom-x (POD_NAMESPACE/POD_NAME)".
	NodeFrom string
	// Err is set when the API could not be read: no client config, the
	// server unreachable, credentials refused, Nodes not listable.
	Err error
	// Dials says what a plain TCP connect to the server gave, when Err is set.
	Dials []string
	// Node is this node's Node; nil when NodeErr or Err is set.
	Node    *KubeNode
	NodeErr error // this node's Node could not be read (not registered, forbidden)
	// Peers is every other Node, by name.
	Peers []KubeNode
	Took  time.Duration
}

// KubeNode is one Node as the agent sees it.
type KubeNode struct {
	Name            string
	ResourceVersion string
	// PodCIDRs is spec.podCIDRs, or spec.podCIDR when only that is set
	// (a Node written by hand); empty when no pod CIDR was assigned.
	PodCIDRs []string
	// Annotations holds the Node's annotations under the prefix (the
	// agent's and flanneld's), by full key.
	Annotations map[string]string
	// NetworkUnavailable is the Node's condition of that type; nil when
	// the Node has none.
	NetworkUnavailable *KubeCondition
	// Lease is what the agent reads from the Node: for this node its
	// podCIDR (with the annotations' attributes, when present), for a peer
	// its podCIDR and annotations. LeaseErr says why there is none.
	Lease    lease.Lease
	LeaseErr error
}

// HasPodCIDR reports whether the Node was given a pod CIDR.
func (n KubeNode) HasPodCIDR() bool { return len(n.PodCIDRs) > 0 }

// KubeCondition is one Node condition.
type KubeCondition struct {
	Status             string // "True", "False", "Unknown"
	Reason             string
	Message            string
	LastTransitionTime time.Time
}

// SubnetEnvFacts is the agent's subnet.env.
type SubnetEnvFacts struct {
	Path    string
	Env     *subnetenv.Env // nil when Err is set
	Err     error
	ModTime time.Time
}

// UnderlayFacts is the interface the agent's flags choose (iface.Select).
type UnderlayFacts struct {
	Name     string
	How      string // "-iface eth0", "default route"
	MTU      int
	PublicIP netip.Addr
	Prefixes []netip.Prefix
	Err      error
}

// Link is one network interface.
type Link struct {
	Name   string
	Index  int
	Type   string // "bridge", "veth", "vxlan", "tun", "device", ...
	MTU    int
	Up     bool
	Master int // index of the bridge the link is a port of; 0 when none
	Addrs  []netip.Prefix
}

// Route is one route of the main table.
type Route struct {
	Dst      netip.Prefix // 0.0.0.0/0 for the default route
	Gw       netip.Addr
	Dev      string
	Protocol int // 108 for loom's routes
	OnLink   bool
	Type     string // "unicast", "blackhole", "unreachable", "prohibit", ...
}

// Lookup is the kernel's answer to `ip route get DST`.
type Lookup struct {
	Dst netip.Addr
	Gw  netip.Addr
	Dev string
	Err error
}

// Neigh is one neighbour (ARP/NDP) entry.
type Neigh struct {
	IP    netip.Addr
	MAC   string
	Dev   string
	State string // "permanent", "reachable", "stale", "failed", ...
}

// FDBEntry is one bridge forwarding entry of a VXLAN device.
type FDBEntry struct {
	MAC string
	Dst netip.Addr
	Dev string
}

// KernelFacts is the node's network stack.
type KernelFacts struct {
	Links   []Link
	Routes  []Route
	Lookups map[netip.Addr]Lookup // route lookups of peer gateways and public IPs
	Neigh   []Neigh
	FDB     []FDBEntry
	// Sysctls holds the values read, keyed as sysctl names them
	// (net.ipv4.ip_forward); a missing key could not be read.
	Sysctls map[string]string
	// BrNetfilter is whether br_netfilter is loaded (/proc/sys/net/bridge exists).
	BrNetfilter bool
	Err         error
}

// LinkByName returns the named link.
func (k KernelFacts) LinkByName(name string) (Link, bool) {
	for _, l := range k.Links {
		if l.Name == name {
			return l, true
		}
	}
	return Link{}, false
}

// LinkByIndex returns the link with index i.
func (k KernelFacts) LinkByIndex(i int) (Link, bool) {
	for _, l := range k.Links {
		if l.Index == i {
			return l, true
		}
	}
	return Link{}, false
}

// LocalAddrs returns every address on the node.
func (k KernelFacts) LocalAddrs() []netip.Addr {
	var out []netip.Addr
	for _, l := range k.Links {
		for _, p := range l.Addrs {
			out = append(out, p.Addr())
		}
	}
	return out
}

// CNIFile is one file of the CNI configuration directory.
type CNIFile struct {
	Path    string
	Name    string   // the network name
	Plugins []string // plugin types, in order
	Err     error    // unreadable or invalid
	// Loom is loom-cni's entry (or flannel's, which reads the same
	// subnet.env), parsed with loom-cni's rules; nil when neither is in the file.
	Loom *cni.Config
}

// CNIFacts is the CNI configuration directory and result cache.
type CNIFacts struct {
	ConfDir  string
	DirErr   error
	Files    []CNIFile // in the order the runtime tries them (sorted by name)
	CacheDir string
	// Cache lists the runtime's cached ADD results (libcni's
	// <cache dir>/results): which container has which netns.
	Cache    []CacheEntry
	CacheErr error
}

// Chosen is the file the runtime uses: the first valid one.
func (c CNIFacts) Chosen() (CNIFile, bool) {
	for _, f := range c.Files {
		if f.Err == nil {
			return f, true
		}
	}
	return CNIFile{}, false
}

// CacheEntry is one cached CNI ADD result.
type CacheEntry struct {
	ContainerID string
	IfName      string
	Network     string
	NetNS       string
	NetNSExists bool
	File        string
}

// IPAMFacts is the host-local style allocation store of the node's network.
type IPAMFacts struct {
	Dir         string
	Allocations []ipam.Allocation
	Err         error
}

// ReadyFacts is the agent's /readyz.
type ReadyFacts struct {
	URL    string // empty when the health server is off (-healthz-port 0)
	Status int
	Body   string
	Err    error
}

// PeerProbe is one cheap liveness probe of a peer's public IP.
type PeerProbe struct {
	Lease  lease.Lease
	Target netip.AddrPort
	Alive  bool          // connected, or refused (an RST is an answer)
	Answer string        // "connected", "refused", "timeout", "no route to host"...
	Took   time.Duration // how long the answer took
}

// FirewallFacts are the two rule dumps of the node.
type FirewallFacts struct {
	NFT      *NFTRuleset // `nft -j list ruleset`, parsed
	NFTErr   error
	IPT      *IPTables // `iptables-save`, parsed
	IPTErr   error
	IPTSaver string // which binary produced IPT
}
