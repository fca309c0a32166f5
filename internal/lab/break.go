package lab

// Failure injection for `loom doctor` (and reliability tests): each scenario
// reproduces one fault of the seed notes the way it happens on real hosts,
// records how to undo it in <lab dir>/break.json, and names the doctor
// check that must report it. Heal, usually a separate process, replays the
// record backwards and restarts what was touched.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/doctor"
	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/subnetenv"
)

// scenario is one fault.
type scenario struct {
	name string
	doc  string // what it reproduces
	node string // where to run doctor
	// expect is what doctor must report there, by check; every other
	// check must be OK or SKIP.
	expect map[string]doctor.Status
	// firewall marks the scenarios that need the agent's firewall rules.
	firewall bool
	// datastore is the only --datastore the scenario makes sense with:
	// "etcd" for faults of the etcd registry, "kube" for faults of the
	// Kubernetes API's objects; "" for faults of the node, in both.
	datastore string
	run       func(ctx context.Context, b *breaker) error
}

// fits reports whether the scenario can be injected into a lab running
// datastore.
func (s scenario) fits(datastore string) bool { return s.datastore == "" || s.datastore == datastore }

// vagrantNAT is the address every node's nat0 gets in vagrant-nat: one
// address on every machine, like VirtualBox NAT's 10.0.2.15, but inside
// the lab's underlay plan (198.18.0.0/15).
var vagrantNAT = netip.MustParsePrefix("198.19.2.15/24")

func scenarios() []scenario {
	return []scenario{
		{name: "cidr-mismatch", datastore: "etcd", node: "n1", expect: fails(doctor.CheckNetworkLease),
			doc: "the store's Network is changed (10.224.0.0/16, kubeadm's --pod-network-cidr typo) under running agents, whose leases and rules are for 10.244.0.0/16",
			run: breakCIDR},
		{name: "cni0-stale", datastore: "etcd", node: "n1", expect: fails(doctor.CheckCNI0Address),
			doc: "n1 comes back on another subnet (its lease was lost while it was away) and cni0 keeps the old gateway",
			run: breakCNI0},
		{name: "ip-forward-off", node: "n1", expect: fails(doctor.CheckIPForward),
			doc: "net.ipv4.ip_forward turned off on n1 after the agent started (a sysctl.d file, a hardening script)",
			run: func(_ context.Context, b *breaker) error { return b.sysctl("n1", "net/ipv4/ip_forward", "0") }},
		{name: "bridge-nf-off", node: "n1", expect: map[string]doctor.Status{doctor.CheckBridgeNF: doctor.Warn},
			doc: "br_netfilter loaded but net.bridge.bridge-nf-call-iptables=0 on n1 (kube-proxy misses same-node pod traffic)",
			run: breakBridgeNF},
		{name: "vagrant-nat", datastore: "etcd", node: "n2", expect: fails(doctor.CheckPublicIP, doctor.CheckAgentReady),
			doc: "every node has nat0 with the same address " + vagrantNAT.String() + "; n1's agent uses it, n2's agent is restarted with --iface nat0 and refused",
			run: breakVagrant},
		{name: "store-down", datastore: "etcd", node: "n1", expect: fails(doctor.CheckStore),
			doc: "the store is stopped", run: func(_ context.Context, b *breaker) error { return b.stopStore() }},
		{name: "empty-registry", datastore: "etcd", node: "n1", expect: fails(doctor.CheckStore, doctor.CheckAgentReady),
			doc: "etcd loses its subnet keys while the agents are down", run: breakRegistry},
		{name: "peer-down", node: "n1", expect: map[string]doctor.Status{doctor.CheckPeerLiveness: doctor.Warn},
			doc: "n2 loses power: its agent dies without a word and its cable is pulled; its lease stays for 24 h",
			run: breakPeer},
		{name: "subnet-env-stale", datastore: "etcd", node: "n1", expect: fails(doctor.CheckSubnetEnv, doctor.CheckAgentReady),
			doc: "another tool (a leftover flanneld) rewrites n1's subnet.env with another subnet",
			run: breakSubnetEnv},
		{name: "ipam-leak", node: "n1", expect: map[string]doctor.Status{doctor.CheckIPAMLeak: doctor.Warn},
			doc: "a pod's netns is deleted without CNI DEL (runtime crash): its address stays allocated",
			run: breakLeak},
		{name: "ipam-exhausted", node: "n1", expect: map[string]doctor.Status{doctor.CheckIPAMUsage: doctor.Fail, doctor.CheckIPAMLeak: doctor.Warn},
			doc: "leaked allocations fill n1's pool (seed 003: pods cannot get an IP)", run: breakExhausted},
		{name: "mtu-mismatch", node: "n1", expect: fails(doctor.CheckMTU),
			doc: "n1's underlay MTU is lowered to 1400 (a VPN or cloud link) after the agent computed FLANNEL_MTU",
			run: func(_ context.Context, b *breaker) error { return b.setMTU("n1", "eth0", 1400) }},
		{name: "cni-config-missing", node: "n1", expect: fails(doctor.CheckCNIConfig),
			doc: "n1's CNI conflist is missing (the installer was denied by SELinux, seed 004)",
			run: func(_ context.Context, b *breaker) error {
				return b.removeFile(filepath.Join(b.l.nodeDir("n1"), "net.d", "10-loom.conflist"))
			}},
		{name: "agent-down", node: "n1", expect: fails(doctor.CheckAgentReady),
			doc: "n1's agent is stopped", run: func(_ context.Context, b *breaker) error { return b.stopAgent("n1", syscall.SIGTERM) }},
		{name: "route-conflict", node: "n1", expect: fails(doctor.CheckDatapath),
			doc: "a static route left from an earlier setup shadows half of n2's pod subnet on n1", run: breakRoute},
		{name: "no-masquerade", node: "n1", expect: fails(doctor.CheckMasquerade), firewall: true,
			doc: "loom's masquerade rule is deleted on n1 while its agent re-checks rules only daily (-iptables-resync 86400)",
			run: breakMasquerade},
		{name: "forward-drop", node: "n1", expect: fails(doctor.CheckForward), firewall: true,
			doc: "Docker sets iptables' FORWARD policy to DROP on n1, whose agent runs with -iptables-forward-rules=false (older flanneld installed no forward rules)",
			run: breakForward},
		{name: "kube-cidr-mismatch", datastore: "kube", node: "n1", expect: fails(doctor.CheckNetworkLease, doctor.CheckAgentReady),
			doc: "n1's agent is restarted with a net-conf.json whose Network (" + kubeMismatchNetwork.String() + ") does not contain its podCIDR (kubeadm's --pod-network-cidr and the ConfigMap disagree): it exits",
			run: breakKubeCIDR},
		{name: "kube-no-podcidr", datastore: "kube", node: "n1", expect: fails(doctor.CheckNetworkLease, doctor.CheckAgentReady),
			doc: "kube-controller-manager runs without --allocate-node-cidrs (stopped here) and n1 registers again: its Node has no podCIDR and its agent waits",
			run: breakKubeNoPodCIDR},
		{name: "kube-annotations-missing", datastore: "kube", node: "n1", expect: map[string]doctor.Status{doctor.CheckKubeAnnotations: doctor.Warn},
			doc: "n2's agent is stopped and someone removes the flannel annotations from its Node: the peers drop n2",
			run: breakKubeAnnotations},
		{name: "kube-network-unavailable", datastore: "kube", node: "n1", expect: fails(doctor.CheckKubeNetworkUnavailable, doctor.CheckAgentReady),
			doc: "n1's agent is stopped and its Node's NetworkUnavailable condition is True (as a cloud route controller or a new node leaves it)",
			run: breakKubeNetworkUnavailable},
	}
}

func fails(checks ...string) map[string]doctor.Status {
	m := map[string]doctor.Status{}
	for _, c := range checks {
		m[c] = doctor.Fail
	}
	return m
}

// Scenarios lists the scenarios Break knows.
func Scenarios() []string {
	var out []string
	for _, s := range scenarios() {
		out = append(out, s.name)
	}
	return out
}

// ScenarioHelp describes every scenario, one per line, for usage texts.
func ScenarioHelp() string {
	var b strings.Builder
	for _, s := range scenarios() {
		only := ""
		if s.datastore != "" {
			only = ", --datastore " + s.datastore + " only"
		}
		fmt.Fprintf(&b, "  %-24s %s (doctor on %s%s)\n", s.name, s.doc, s.node, only)
	}
	return b.String()
}

func findScenario(name string) (scenario, error) {
	for _, s := range scenarios() {
		if s.name == name {
			return s, nil
		}
	}
	return scenario{}, fmt.Errorf("unknown scenario %q: use one of %s", name, strings.Join(Scenarios(), ", "))
}

// Break injects scenario into the lab. The lab must be healthy (not broken
// already); what Break changed is recorded as it goes, so `heal` undoes
// even a Break that failed halfway.
func (l *Lab) Break(ctx context.Context, name string) error {
	sc, err := findScenario(name)
	if err != nil {
		return err
	}
	if !sc.fits(l.Opts.Datastore) {
		return fmt.Errorf("scenario %s needs a lab with --datastore %s, and lab %s runs --datastore %s: pick another scenario (`loom lab break` lists them) or bring up a lab with `loom lab up --datastore %s`",
			name, sc.datastore, l.Opts.Name, l.Opts.Datastore, sc.datastore)
	}
	if st, err := l.loadBreak(); err == nil {
		return fmt.Errorf("lab %s is already broken (%s): run `loom lab heal --name %s` first", l.Opts.Name, st.Scenario, l.Opts.Name)
	}
	b := &breaker{l: l, st: &breakState{Scenario: name, Node: sc.node, Overrides: map[string][]string{}, Extra: map[string][]string{}}}
	if err := b.save(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := sc.run(ctx, b); err != nil {
		return fmt.Errorf("break %s: %w (undo with `loom lab heal --name %s`)", name, err, l.Opts.Name)
	}
	return nil
}

// breakState is <lab dir>/break.json.
type breakState struct {
	Scenario  string
	Node      string              // where doctor sees the fault
	Overrides map[string][]string // agent flags in force on a node, for DoctorArgv
	Extra     map[string][]string // agent arguments added after those, e.g. --iptables-forward-rules=false
	Undo      []undoStep          // replayed last to first
}

func (l *Lab) breakPath() string { return filepath.Join(l.dir(), "break.json") }

func (l *Lab) loadBreak() (*breakState, error) {
	data, err := os.ReadFile(l.breakPath())
	if err != nil {
		return nil, err
	}
	var st breakState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("read %s: %w", l.breakPath(), err)
	}
	return &st, nil
}

// breaker performs a scenario's changes, recording the undo of each
// before or right after making it.
type breaker struct {
	l  *Lab
	st *breakState
}

func (b *breaker) save() error {
	data, err := json.MarshalIndent(b.st, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(b.l.breakPath(), data, 0o644)
}

func (b *breaker) record(u undoStep) error {
	b.st.Undo = append(b.st.Undo, u)
	return b.save()
}

func (b *breaker) sysctl(node, key, value string) error {
	ns, err := b.l.NSOf(node)
	if err != nil {
		return err
	}
	old, err := readSysctl(ns, key)
	if err != nil {
		return err
	}
	if err := b.record(undoStep{Op: opSysctl, NS: ns, Key: key, Value: old}); err != nil {
		return err
	}
	return netns.WriteSysctl(ns, key, value)
}

func readSysctl(ns, key string) (string, error) {
	var v string
	err := netns.Do(ns, func() error {
		data, err := os.ReadFile(filepath.Join("/proc/sys", key))
		v = strings.TrimSpace(string(data))
		return err
	})
	return v, err
}

func (b *breaker) setMTU(node, link string, mtu int) error {
	ns, err := b.l.NSOf(node)
	if err != nil {
		return err
	}
	h, err := openHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	lk, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", link, ns, err)
	}
	if err := b.record(undoStep{Op: opMTU, NS: ns, Key: link, Value: fmt.Sprint(lk.Attrs().MTU)}); err != nil {
		return err
	}
	return h.LinkSetMTU(lk, mtu)
}

// writeFile replaces path, recording its old content (or its absence).
func (b *breaker) writeFile(path string, data []byte) error {
	if err := b.recordFile(path); err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o644)
}

func (b *breaker) removeFile(path string) error {
	if err := b.recordFile(path); err != nil {
		return err
	}
	return os.Remove(path)
}

func (b *breaker) recordFile(path string) error {
	old, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return b.record(undoStep{Op: opFile, Key: path, Value: "absent"})
	case err != nil:
		return err
	}
	return b.record(undoStep{Op: opFile, Key: path, Data: old})
}

func (b *breaker) stopAgent(node string, sig syscall.Signal) error {
	if err := b.record(undoStep{Op: opRestartAgent, Key: node}); err != nil {
		return err
	}
	return b.l.StopAgent(node, sig)
}

// restartAgentWith restarts node's agent with flag overrides in force
// until heal restarts it with the lab's flags.
func (b *breaker) restartAgentWith(node string, overrides ...string) error {
	if err := b.stopAgent(node, syscall.SIGTERM); err != nil {
		return err
	}
	b.st.Overrides[node] = overrides
	if err := b.save(); err != nil {
		return err
	}
	return b.l.StartAgentWith(node, overrides...)
}

// restartAgentExtra restarts node's agent with arguments added to the
// lab's, such as a boolean flag turned off (--flag=false), which the
// "--flag", "value" overrides cannot express.
func (b *breaker) restartAgentExtra(node string, extra ...string) error {
	n, err := b.l.Node(node)
	if err != nil {
		return err
	}
	if err := b.stopAgent(node, syscall.SIGTERM); err != nil {
		return err
	}
	b.st.Extra[node] = extra
	if err := b.save(); err != nil {
		return err
	}
	args := append(b.l.AgentArgs(node), extra...)
	return b.l.record("agent-"+node, n.NS, filepath.Join(b.l.nodeDir(node), "agent.log"), args...)
}

func (b *breaker) stopStore() error {
	if err := b.record(undoStep{Op: opStartStore}); err != nil {
		return err
	}
	return b.l.StopStore(syscall.SIGTERM)
}

// etcd returns a client of the lab's store (every member with --store
// cluster, over TLS), dialling from the router's namespace. Close it.
func (l *Lab) etcd() (*clientv3.Client, error) {
	cfg, err := l.etcdConfig()
	if err != nil {
		return nil, err
	}
	return clientv3.New(cfg)
}

const registryPrefix = "/coreos.com/network"

// nodeSubnet reads node's subnet.env.
func (l *Lab) nodeSubnet(node string) (subnetenv.Env, error) {
	return subnetenv.Read(l.SubnetFile(node))
}

// freeSubnet picks a /24 of the lab network that no lease holds.
func (l *Lab) freeSubnet(ctx context.Context, cli *clientv3.Client) (netip.Prefix, error) {
	resp, err := cli.Get(ctx, registryPrefix+"/subnets/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return netip.Prefix{}, err
	}
	var used []string
	for _, kv := range resp.Kvs {
		used = append(used, filepath.Base(string(kv.Key)))
	}
	for i := 250; i > 100; i-- {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24)
		if !slices.Contains(used, fmt.Sprintf("10.244.%d.0-24", i)) {
			return p, nil
		}
	}
	return netip.Prefix{}, errors.New("no free subnet between 10.244.101.0/24 and 10.244.250.0/24")
}

// leaseKeyOf finds the key of node's lease.
func leaseKeyOf(ctx context.Context, cli *clientv3.Client, node string) (string, error) {
	resp, err := cli.Get(ctx, registryPrefix+"/subnets/", clientv3.WithPrefix())
	if err != nil {
		return "", err
	}
	for _, kv := range resp.Kvs {
		var v struct{ NodeName string }
		if json.Unmarshal(kv.Value, &v) == nil && v.NodeName == node {
			return string(kv.Key), nil
		}
	}
	return "", fmt.Errorf("no lease of node %s in the registry", node)
}
