package doctor

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/loomnet/loom/internal/netconf"
)

// probes are the test packets of the firewall checks, built from the
// node's subnet, a peer's subnet and the interfaces they cross.
type probes struct {
	podOut, podRemote, hostRemote, remoteIn Packet
	network, subnet                         netip.Prefix
}

func (f *Facts) firewallProbes() (probes, bool) {
	network, _ := f.network()
	subnet, _ := f.currentSubnet()
	if !network.IsValid() || !subnet.IsValid() || f.Underlay.Err != nil {
		return probes{}, false
	}
	// A peer's subnet, or any other subnet of the network.
	var remote netip.Prefix
	for _, l := range f.peerLeases() {
		if l.Subnet.IsValid() && network.Contains(l.Subnet.Addr()) && l.Subnet != subnet {
			remote = l.Subnet
			break
		}
	}
	if !remote.IsValid() {
		remote = otherSubnet(network, subnet)
	}
	outside := netip.MustParseAddr("192.0.2.10") // TEST-NET-1
	if network.Contains(outside) {
		outside = netip.MustParseAddr("198.51.100.10")
	}
	br, under := f.bridgeName(), f.Underlay.Name
	overlay := under
	switch f.backendType() {
	case netconf.BackendVXLAN:
		if !vxlanConfig(f).DirectRouting {
			overlay = vxlanDevice(f)
		}
	case netconf.BackendUDP:
		overlay = "flannel0"
	}
	pod, rpod := podAddr(subnet, 2), podAddr(remote, 2)
	return probes{
		podOut:     Packet{Name: fmt.Sprintf("pod %s -> outside %s", pod, outside), Src: pod, Dst: outside, IIf: br, OIf: under},
		podRemote:  Packet{Name: fmt.Sprintf("pod %s -> remote pod %s", pod, rpod), Src: pod, Dst: rpod, IIf: br, OIf: overlay},
		hostRemote: Packet{Name: fmt.Sprintf("node %s -> remote pod %s", f.Underlay.PublicIP, rpod), Src: f.Underlay.PublicIP, Dst: rpod, OIf: overlay, SrcLocal: true},
		remoteIn:   Packet{Name: fmt.Sprintf("remote pod %s -> pod %s", rpod, pod), Src: rpod, Dst: pod, IIf: overlay, OIf: br},
		network:    network,
		subnet:     subnet,
	}, true
}

// otherSubnet is a subnet of network of subnet's size that is not subnet.
func otherSubnet(network, subnet netip.Prefix) netip.Prefix {
	a := network.Masked().Addr()
	for range 4 {
		p := netip.PrefixFrom(a, subnet.Bits()).Masked()
		if p != subnet.Masked() && network.Contains(p.Addr()) {
			return p
		}
		next := lastAddrOf(p).Next()
		if !next.IsValid() {
			break
		}
		a = next
	}
	return subnet
}

func lastAddrOf(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// hookResult is the combined effect of every ruleset on one hook.
type hookResult struct {
	verdict Verdict
	rule    string
	unsure  []string
}

// natPostrouting traces p through every source-NAT chain the kernel runs:
// iptables' nat POSTROUTING and each nftables nat chain on postrouting.
// The packet is masqueraded when any of them masquerades it.
func (f *Facts) natPostrouting(p Packet) hookResult {
	return f.traceHook(p, "nat", "POSTROUTING", "postrouting", "nat", Masquerade)
}

// forwardFilter traces p through every forward filter chain; it is
// dropped when any of them drops it (an accept in one table cannot
// override a drop in another: both hooks must accept).
func (f *Facts) forwardFilter(p Packet) hookResult {
	return f.traceHook(p, "filter", "FORWARD", "forward", "filter", Drop)
}

func (f *Facts) traceHook(p Packet, iptTable, iptChain, hook, typ string, decisive Verdict) hookResult {
	res := hookResult{verdict: Accept}
	var traces []Trace
	fw := f.Firewall
	if fw.IPT != nil {
		traces = append(traces, fw.IPT.TraceIPT(iptTable, iptChain, p))
	}
	if fw.NFT != nil {
		for _, c := range fw.NFT.BaseChains(hook, typ, fw.IPT != nil) {
			traces = append(traces, fw.NFT.TraceNFT(c, p))
		}
	}
	for _, t := range traces {
		res.unsure = append(res.unsure, t.Unsure...)
		if t.Verdict == decisive && res.verdict != decisive {
			res.verdict, res.rule = decisive, t.Rule
		}
	}
	if res.verdict != decisive && decisive == Masquerade {
		res.verdict = Continue
	}
	return res
}

func (f *Facts) firewallUnreadable() (Result, bool) {
	fw := f.Firewall
	if fw.IPT == nil && fw.NFT == nil {
		return warn("cannot read the firewall", "install nftables (nft) or iptables on the node, and run doctor as root",
			fmt.Sprintf("iptables-save: %v", fw.IPTErr), fmt.Sprintf("nft -j list ruleset: %v", fw.NFTErr)), true
	}
	return Result{}, false
}

// checkMasquerade: pods reach the outside only when their traffic leaves
// with the node's address; pod-to-pod traffic inside Network must keep its
// source (no NAT); node-to-remote-pod traffic is masqueraded so replies come
// back. Each is judged by tracing a packet through the kernel's rules, so
// a rule written for another CIDR (kubeadm --pod-network-cidr ≠ Network)
// shows as "not masqueraded", and a foreign rule NATing pod traffic as
// over-masquerading.
func checkMasquerade(f *Facts) Result {
	if r, bad := f.firewallUnreadable(); bad {
		return r
	}
	pr, found := f.firewallProbes()
	if !found {
		return skip("needs the node's subnet, the network and the underlay (see %s, %s)", CheckSubnetEnv, CheckPublicIP)
	}
	out := f.natPostrouting(pr.podOut)
	pp := f.natPostrouting(pr.podRemote)
	host := f.natPostrouting(pr.hostRemote)
	ev := []string{
		fmt.Sprintf("%s: %s", pr.podOut.Name, describeNAT(out)),
		fmt.Sprintf("%s: %s", pr.podRemote.Name, describeNAT(pp)),
		fmt.Sprintf("%s: %s", pr.hostRemote.Name, describeNAT(host)),
	}
	for _, u := range dedupe(append(append(out.unsure, pp.unsure...), host.unsure...)) {
		ev = append(ev, "assumed not to match (cannot evaluate): "+u)
	}
	restart := fmt.Sprintf("restart the agent: it installs its masquerade rules at start and re-checks them every -iptables-resync (%s)", f.Opts.IPTablesResync)
	if !pr.network.Contains(pr.subnet.Addr()) {
		// Seed 000: the rules are right for the network, the pods are not
		// in it. Fixing rules by hand only hides that.
		ev = append(ev, masqueradeRules(f)...)
		return fail(fmt.Sprintf("this node's pods (%s) are outside the pod network %s the rules are written for: their traffic to the outside is %s, to other pods %s",
			pr.subnet, pr.network, describeNAT(out), describeNAT(pp)),
			"give the node a subnet inside "+pr.network.String()+" (see "+CheckNetworkLease+"); an iptables rule added by hand for "+pr.subnet.String()+" only hides the mismatch", ev...)
	}
	if pp.verdict == Masquerade {
		return fail(fmt.Sprintf("pod-to-pod traffic inside %s is masqueraded (source addresses lost, network policy and logs see the node): %s", pr.network, pp.rule),
			"delete that rule ("+deleteRuleHint(pp.rule)+"): no NAT inside the pod network", ev...)
	}
	if !f.Opts.IPMasq {
		return ok("-ip-masq is off: loom masquerades nothing (pods reach the outside only if the network routes "+pr.network.String()+")", ev...)
	}
	if out.verdict != Masquerade {
		ev = append(ev, masqueradeRules(f)...)
		return fail(fmt.Sprintf("traffic from this node's pods (%s) to the outside is not masqueraded: replies never come back", pr.subnet),
			restart+"; if masquerade rules exist only for another CIDR (listed above), the pod network was configured twice and differently (see "+CheckNetworkLease+")", ev...)
	}
	if host.verdict != Masquerade {
		return warn("traffic from this node to pods on other nodes is not masqueraded", restart, ev...)
	}
	return ok(fmt.Sprintf("masquerade as loom intends: pods to the outside NATed, inside %s not", pr.network), ev...)
}

func describeNAT(h hookResult) string {
	if h.verdict == Masquerade {
		return "masqueraded by " + h.rule
	}
	return "not NATed"
}

func deleteRuleHint(rule string) string {
	if strings.HasPrefix(rule, "-A ") {
		return "iptables -t nat -D " + strings.TrimPrefix(rule, "-A ")
	}
	return "nft -a list ruleset, then nft delete rule <family> <table> <chain> handle <n>"
}

// masqueradeRules lists every masquerade rule in the kernel, for evidence.
func masqueradeRules(f *Facts) []string {
	var out []string
	if ipt := f.Firewall.IPT; ipt != nil {
		if t := ipt.Tables["nat"]; t != nil {
			for _, c := range t.Chains {
				for _, r := range c.Rules {
					if r.Target == "MASQUERADE" || r.Target == "SNAT" {
						out = append(out, "present: "+r.Text)
					}
				}
			}
		}
	}
	if nft := f.Firewall.NFT; nft != nil {
		for _, c := range nft.Chains {
			for _, r := range c.Rules {
				for _, e := range r.Expr {
					if _, m := e["masquerade"]; m {
						out = append(out, "present: "+r.describe(c))
					}
				}
			}
		}
	}
	if len(out) == 0 {
		out = append(out, "no masquerade rule in iptables or nftables")
	}
	return out
}

func dedupe(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

// checkForward: forwarded pod traffic must pass every forward hook. Docker
// sets iptables' FORWARD policy to DROP; then pod traffic between nodes and
// to the outside dies unless something accepts the pod network (loom does,
// with -iptables-forward-rules, the default).
func checkForward(f *Facts) Result {
	if r, bad := f.firewallUnreadable(); bad {
		return r
	}
	pr, found := f.firewallProbes()
	if !found {
		return skip("needs the node's subnet, the network and the underlay (see %s, %s)", CheckSubnetEnv, CheckPublicIP)
	}
	var ev, dropped, unsure []string
	var first hookResult
	for _, p := range []Packet{pr.podRemote, pr.remoteIn, pr.podOut} {
		h := f.forwardFilter(p)
		unsure = append(unsure, h.unsure...)
		if h.verdict == Drop {
			ev = append(ev, fmt.Sprintf("%s: dropped by %s", p.Name, h.rule))
			dropped = append(dropped, p.Name)
			if first.rule == "" {
				first = h
			}
			continue
		}
		ev = append(ev, p.Name+": forwarded")
	}
	if ipt := f.Firewall.IPT; ipt != nil {
		if t := ipt.Tables["filter"]; t != nil && t.Chains["FORWARD"] != nil {
			ev = append(ev, fmt.Sprintf("iptables filter :FORWARD %s", t.Chains["FORWARD"].Policy))
		}
	}
	for _, u := range dedupe(unsure) {
		ev = append(ev, "assumed not to match (cannot evaluate): "+u)
	}
	if len(dropped) > 0 {
		fix := fmt.Sprintf("restart the agent, or wait for its next -iptables-resync (%s): with -iptables-forward-rules (the default) it accepts %s in iptables' FORWARD too when the policy is DROP; or run iptables -P FORWARD ACCEPT (Docker sets DROP)",
			f.Opts.IPTablesResync, pr.network)
		if !f.Opts.IPTablesForwardRules {
			fix = "the agent runs with -iptables-forward-rules=false: turn it on, or add: iptables -A FORWARD -s " + pr.network.String() + " -j ACCEPT; iptables -A FORWARD -d " + pr.network.String() + " -j ACCEPT"
		}
		return fail(fmt.Sprintf("forwarded pod traffic is dropped (%s): %s", strings.Join(dropped, "; "), first.rule), fix, ev...)
	}
	return ok("forwarded pod traffic is accepted", ev...)
}
