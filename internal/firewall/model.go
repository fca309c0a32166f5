package firewall

import (
	"fmt"
	"net/netip"

	"github.com/coreos/go-iptables/iptables"
	"sigs.k8s.io/knftables"
)

// Addrs are the addresses the rules are about. A family is programmed when
// its network is set; Subnet (this node's lease) must then lie inside it.
type Addrs struct {
	Network, Subnet         netip.Prefix // IPv4 pod network and this node's subnet
	IPv6Network, IPv6Subnet netip.Prefix // the same for IPv6; zero when single stack
}

// Validate reports the first address that cannot be programmed, naming the
// field, its value and the fix.
func (a Addrs) Validate() error {
	if !a.Network.IsValid() && !a.IPv6Network.IsValid() {
		return fmt.Errorf("firewall addresses: neither Network nor IPv6Network is set: set the pod network of at least one family")
	}
	for _, fam := range families() {
		network, subnet := a.of(fam)
		nf, sf := fam.field()
		switch {
		case !network.IsValid() && subnet.IsValid():
			return fmt.Errorf("firewall addresses: %s %s is set but %s is not: set %s too", sf, subnet, nf, nf)
		case !network.IsValid():
			continue
		case network.Addr().Is4() != (fam == ipv4) || network.Addr().Is4In6():
			return fmt.Errorf("firewall addresses: %s %s is not an %s prefix", nf, network, fam)
		case !subnet.IsValid():
			return fmt.Errorf("firewall addresses: %s is not set but %s %s is: set it to this node's subnet", sf, nf, network)
		case subnet.Addr().Is4() != (fam == ipv4) || subnet.Addr().Is4In6():
			return fmt.Errorf("firewall addresses: %s %s is not an %s prefix", sf, subnet, fam)
		case subnet.Bits() < network.Bits() || !network.Contains(subnet.Addr()):
			return fmt.Errorf("firewall addresses: %s %s is not inside %s %s: the node's lease must come from the network", sf, subnet, nf, network)
		}
	}
	return nil
}

// of returns the (masked) network and subnet of fam.
func (a Addrs) of(fam family) (network, subnet netip.Prefix) {
	if fam == ipv4 {
		return a.Network.Masked(), a.Subnet.Masked()
	}
	return a.IPv6Network.Masked(), a.IPv6Subnet.Masked()
}

// family is an IP family. Everything that differs between IPv4 and IPv6 is
// a method here, so the rest of the package is one code path.
type family uint8

const (
	ipv4 family = iota
	ipv6
)

// families lists the families in the order they are synced and rendered.
func families() [2]family { return [2]family{ipv4, ipv6} }

func (f family) String() string {
	if f == ipv4 {
		return "IPv4"
	}
	return "IPv6"
}

// field names the Addrs fields of f, for error messages.
func (f family) field() (network, subnet string) {
	if f == ipv4 {
		return "Network", "Subnet"
	}
	return "IPv6Network", "IPv6Subnet"
}

// nft is the nftables family of f's table.
func (f family) nft() knftables.Family {
	if f == ipv4 {
		return knftables.IPv4Family
	}
	return knftables.IPv6Family
}

// payload is the nftables protocol keyword for address matches ("ip saddr").
func (f family) payload() string { return string(f.nft()) }

// proto is f for go-iptables.
func (f family) proto() iptables.Protocol {
	if f == ipv4 {
		return iptables.ProtocolIPv4
	}
	return iptables.ProtocolIPv6
}

// iptablesCmd is the binary that manages f's iptables rules.
func (f family) iptablesCmd() string {
	if f == ipv4 {
		return "iptables"
	}
	return "ip6tables"
}

// multicast is f's multicast range, never masqueraded.
func (f family) multicast() netip.Prefix {
	if f == ipv4 {
		return netip.PrefixFrom(netip.AddrFrom4([4]byte{224}), 4)
	}
	return netip.PrefixFrom(netip.AddrFrom16([16]byte{0xff}), 8)
}

// hook is where a rule sits: one nftables base chain, one iptables chain.
type hook uint8

const (
	hookNAT     hook = iota + 1 // nat postrouting
	hookForward                 // filter forward
)

// verdict is what a rule does with a packet it matches.
type verdict uint8

const (
	verdictReturn     verdict = iota + 1 // stop evaluating loom's chain: no NAT by loom
	verdictMasquerade                    // source NAT to the outgoing interface's address
	verdictAccept                        // let the packet be forwarded
)

// addrMatch matches a source or destination address. The zero value matches
// every address.
type addrMatch struct {
	prefix netip.Prefix
	not    bool // match addresses outside prefix
}

func in(p netip.Prefix) addrMatch    { return addrMatch{prefix: p} }
func notIn(p netip.Prefix) addrMatch { return addrMatch{prefix: p, not: true} }

// all reports whether m matches every address.
func (m addrMatch) all() bool { return !m.prefix.IsValid() }

// rule is one rule of the rule table, independent of the renderer.
type rule struct {
	hook     hook
	marked   bool // match packets carrying kubeProxyMark
	src, dst addrMatch
	verdict  verdict
	// comment is unique within the hook and names the prefixes the rule is
	// about; the nftables sync recognises rules by it.
	comment string
}

// ruleTable is THE rule table: every rule loom wants for one family, in
// order, hook by hook. It is empty when network is not set. A missing subnet
// (which Validate refuses) drops the two host rules rather than render a
// rule that masquerades node-to-local-pod traffic.
func ruleTable(fam family, network, subnet netip.Prefix, ipMasq, forward bool) []rule {
	if !network.IsValid() {
		return nil
	}
	var rs []rule
	if ipMasq {
		rs = append(rs,
			rule{hook: hookNAT, marked: true, verdict: verdictReturn,
				comment: "kube-proxy marked (0x4000): left to kube-proxy"},
			rule{hook: hookNAT, src: in(network), dst: in(network), verdict: verdictReturn,
				comment: fmt.Sprintf("pod to pod in %s: keep the source", network)},
			rule{hook: hookNAT, src: in(network), dst: notIn(fam.multicast()), verdict: verdictMasquerade,
				comment: fmt.Sprintf("pods %s to outside: masquerade", network)},
		)
		if subnet.IsValid() {
			rs = append(rs,
				rule{hook: hookNAT, src: notIn(network), dst: in(subnet), verdict: verdictReturn,
					comment: fmt.Sprintf("to local pods %s: keep the source", subnet)},
				rule{hook: hookNAT, src: notIn(network), dst: in(network), verdict: verdictMasquerade,
					comment: fmt.Sprintf("host to remote pods in %s: masquerade so replies return", network)},
			)
		}
	}
	if forward {
		rs = append(rs,
			rule{hook: hookForward, src: in(network), verdict: verdictAccept,
				comment: fmt.Sprintf("forward from pods %s", network)},
			rule{hook: hookForward, dst: in(network), verdict: verdictAccept,
				comment: fmt.Sprintf("forward to pods %s", network)},
		)
	}
	return rs
}

// onHook returns the rules of rs on h, in order.
func onHook(rs []rule, h hook) []rule {
	var out []rule
	for _, r := range rs {
		if r.hook == h {
			out = append(out, r)
		}
	}
	return out
}
