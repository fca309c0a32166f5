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
	// -net-config-path when that flag is set, else the store's.
	Config     *netconf.Config
	ConfigFrom string // "etcd /coreos.com/network/config", "file /etc/kube-flannel/net-conf.json"
	ConfigErr  error

	Store     StoreFacts
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
func (s StoreFacts) Listed() bool { return s.Err == nil && s.Prefix != "" }

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
