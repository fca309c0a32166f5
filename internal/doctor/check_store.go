package doctor

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/subnetenv"
)

// checkStore: the store answers, holds the network config (unless the agent
// reads it from a file) and holds leases. An empty registry is etcd data
// loss or a careless `etcdctl del --prefix`; agents re-claim their subnets
// only when they restart.
func checkStore(f *Facts) Result {
	if f.kube() {
		return checkKubeAPI(f)
	}
	s := f.Store
	where := fmt.Sprintf("-etcd-endpoints %s, -etcd-prefix %s", strings.Join(s.Endpoints, ","), s.Prefix)
	if s.Err != nil {
		return fail("store unreachable: "+s.Err.Error(),
			fmt.Sprintf("check that the store runs and that -etcd-endpoints is right for this host: %s; "+
				"pods keep working while it is down, but no node can join, move or learn of a peer", f.etcdctl("endpoint health")),
			append([]string{where}, s.Dials...)...)
	}
	ev := []string{where, fmt.Sprintf("%d leases at revision %d (read in %s)", len(s.Leases), s.Revision, s.Took.Round(1e6))}
	if s.ConfigErr != nil && !configFromFile(f.Opts) {
		return fail("network config missing or invalid in the store", fixConfig(f), append(ev, s.ConfigErr.Error())...)
	}
	if len(s.Leases) == 0 {
		return fail("registry is empty: no subnet lease under "+f.subnetsPrefix(),
			"the store lost its data or the keys were deleted; restart every agent: loom re-claims the subnet its subnet.env names "+
				"(and restore etcd from a backup if the config went too)", ev...)
	}
	if s.Config != nil {
		ev = append(ev, fmt.Sprintf("%s/config: Network %s, Backend %s", s.Prefix, s.Config.Network, s.Config.Backend.Type))
	}
	return ok(fmt.Sprintf("store answers: %d leases", len(s.Leases)), ev...)
}

func fixConfig(f *Facts) string {
	return fmt.Sprintf(`write the network config: %s or start the store with loom store --network-config=FILE`,
		f.etcdctl(fmt.Sprintf(`put %s/config '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'`, f.Store.Prefix)))
}

// checkNetworkVsLease: the node's subnet must lie inside the pod network,
// and the network the agent runs with (subnet.env) must be the configured
// one. Both go wrong when the pod CIDR is given twice and differently
// (kubeadm --pod-network-cidr vs flannel's Network) or when Network is
// changed under running agents: masquerade and forward rules are written
// for one CIDR while pods sit in another.
func checkNetworkVsLease(f *Facts) Result {
	if f.Config == nil && configFromFile(f.Opts) && f.ConfigErr != nil {
		// The agent exits at start without it.
		where := ""
		if f.kube() {
			where = " (the DaemonSet mounts it from net-conf.json of the loom-config ConfigMap)"
		}
		return fail(fmt.Sprintf("the network config %s is unreadable: %v", f.Opts.NetConfigPath, f.ConfigErr),
			fmt.Sprintf(`write %s%s with the cluster's pod CIDR as Network, e.g. {"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}, or point -net-config-path at it`,
				f.Opts.NetConfigPath, where), "-net-config-path "+f.Opts.NetConfigPath)
	}
	if f.Config == nil {
		return skip("no network config to compare with (see %s)", CheckStore)
	}
	if f.kube() {
		return checkPodCIDRVsNetwork(f)
	}
	cfgNet := f.Config.Network
	if !cfgNet.IsValid() {
		return skip("IPv4 disabled in the network config")
	}
	var ev, problems []string
	ev = append(ev, fmt.Sprintf("%s: Network %s", f.ConfigFrom, cfgNet))
	if e := f.SubnetEnv.Env; e != nil {
		ev = append(ev, fmt.Sprintf("%s: FLANNEL_NETWORK=%s FLANNEL_SUBNET=%s", f.SubnetEnv.Path, e.Network, e.Subnet))
		if e.Network.IsValid() && e.Network != cfgNet {
			problems = append(problems, fmt.Sprintf("the agent runs with Network %s (subnet.env) but the config says %s", e.Network, cfgNet))
		}
		if e.Subnet.IsValid() && !cfgNet.Contains(e.Subnet.Addr()) {
			problems = append(problems, fmt.Sprintf("this node's subnet %s is outside Network %s", e.Subnet.Masked(), cfgNet))
		}
	}
	own, haveOwn := f.ownLease()
	if haveOwn && own.Subnet.IsValid() {
		ev = append(ev, f.leaseRef(own))
		sameAsEnv := f.SubnetEnv.Env != nil && own.Subnet == f.SubnetEnv.Env.Subnet.Masked()
		if !cfgNet.Contains(own.Subnet.Addr()) && !sameAsEnv {
			problems = append(problems, fmt.Sprintf("this node's lease %s is outside Network %s", own.Subnet, cfgNet))
		}
	}
	var outside []string
	for _, l := range f.peerLeases() {
		if l.Subnet.IsValid() && !cfgNet.Contains(l.Subnet.Addr()) {
			outside = append(outside, fmt.Sprintf("%s (%s)", l.Subnet, nodeOf(l)))
		}
	}
	if len(outside) > 0 {
		problems = append(problems, fmt.Sprintf("%d peer leases are outside Network %s: %s", len(outside), cfgNet, strings.Join(outside, ", ")))
	}
	if len(problems) == 0 {
		return ok(fmt.Sprintf("this node's subnet and every lease lie inside Network %s", cfgNet), ev...)
	}
	runNet, _ := f.network()
	fix := fmt.Sprintf("use one pod CIDR everywhere (kubeadm's --pod-network-cidr, the network config's Network, subnet.env): "+
		"either put Network back to %s: %s; or, to move to %s, restart every agent (each takes a lease inside it and rewrites subnet.env) "+
		"and re-create the pods", runNet, f.etcdctl(fmt.Sprintf("put %s/config '%s'", f.Store.Prefix, configWithNetwork(*f.Config, runNet))), cfgNet)
	if configFromFile(f.Opts) {
		fix = fmt.Sprintf("use one pod CIDR everywhere: set Network in %s to the cluster's pod network (%s) and restart the agent", f.Opts.NetConfigPath, runNet)
		if f.Store.Config != nil {
			fix = fmt.Sprintf("use one pod CIDR everywhere: %s says Network %s, the store says %s; make them equal and restart the agent",
				f.Opts.NetConfigPath, cfgNet, f.Store.Config.Network)
		}
	}
	return fail(strings.Join(problems, "; "), fix, ev...)
}

// checkSubnetEnv: loom-cni learns the node's subnet from subnet.env. A
// missing file fails every pod ADD; a file that disagrees with the node's
// lease hands out addresses peers do not route to this node.
func checkSubnetEnv(f *Facts) Result {
	s := f.SubnetEnv
	if s.Err != nil {
		if errors.Is(s.Err, subnetenv.ErrNotExist) {
			return fail(fmt.Sprintf("%s does not exist: every pod ADD fails (loom-cni: plugin not available)", s.Path),
				"start the agent (it writes the file once it holds a lease), and check that -subnet-file and the CNI config's subnetFile name the same file",
				"-subnet-file "+s.Path)
		}
		return fail(fmt.Sprintf("%s is unreadable: %v", s.Path, s.Err),
			"restart the agent so it rewrites the file (it is written atomically; a hand edit or another tool broke it)", "-subnet-file "+s.Path)
	}
	e := s.Env
	ev := []string{fmt.Sprintf("%s (written %s): FLANNEL_NETWORK=%s FLANNEL_SUBNET=%s FLANNEL_MTU=%d FLANNEL_IPMASQ=%t",
		s.Path, s.ModTime.Format("2006-01-02 15:04:05"), e.Network, e.Subnet, e.MTU, e.IPMasq)}
	if !f.Store.Listed() {
		return Result{Status: OK, Summary: "subnet.env is readable (not compared with the registry: " + unreachableWhy(f) + ")", Evidence: ev}
	}
	own, haveOwn := f.ownLease()
	restart := "restart the agent: it writes subnet.env from the lease it holds"
	if !haveOwn && f.kube() {
		// No Node, no podCIDR, or one of no enabled family: the agent
		// waits, and store or network-vs-lease says why.
		return Result{Status: OK, Summary: fmt.Sprintf("subnet.env is readable (node %s has no usable podCIDR to compare with: see %s)", f.Node, CheckNetworkLease), Evidence: ev}
	}
	if !haveOwn {
		if len(f.Store.Leases) == 0 {
			return Result{Status: OK, Summary: "subnet.env is readable (registry empty: see " + CheckStore + ")", Evidence: ev}
		}
		return warn(fmt.Sprintf("node %s holds no lease in the registry; subnet.env still names %s", f.Node, e.Subnet.Masked()),
			restart+" (it re-claims "+e.Subnet.Masked().String()+" if still free); if the lease expired while the node was away, its subnet may now be another node's",
			ev...)
	}
	ev = append(ev, f.leaseRef(own))
	var problems []string
	if e.Subnet.Masked() != own.Subnet {
		problems = append(problems, fmt.Sprintf("subnet.env says %s, the node's lease is %s: new pods get addresses peers route elsewhere", e.Subnet, own.Subnet))
	}
	if e.IPMasq != f.Opts.IPMasq {
		problems = append(problems, fmt.Sprintf("FLANNEL_IPMASQ=%t but the agent runs with -ip-masq=%t", e.IPMasq, f.Opts.IPMasq))
	}
	if len(problems) > 0 {
		return fail("subnet.env is stale: "+strings.Join(problems, "; "), restart+"; nothing else should write "+s.Path, ev...)
	}
	return ok("subnet.env agrees with the node's lease", ev...)
}

// unreachableWhy says why registry comparisons were skipped.
func unreachableWhy(f *Facts) string {
	if f.kube() {
		return "Kubernetes API unreadable, see " + CheckStore
	}
	return "store unreachable, see " + CheckStore
}

// configWithNetwork renders cfg with another IPv4 network (and the subnet
// range that network implies), for a fix the user can paste.
func configWithNetwork(cfg netconf.Config, network netip.Prefix) string {
	if !network.IsValid() {
		return `{"Network":"<the pod network>"}`
	}
	cfg.Network = network
	cfg.SubnetMin, cfg.SubnetMax = netip.Addr{}, netip.Addr{}
	if cfg.SubnetLen <= network.Bits() {
		cfg.SubnetLen = 0
	}
	data, err := cfg.Marshal()
	if err != nil {
		return fmt.Sprintf(`{"Network":%q,"Backend":{"Type":%q}}`, network, cfg.Backend.Type)
	}
	return string(data)
}
