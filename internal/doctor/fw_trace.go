package doctor

import (
	"net/netip"
	"strings"
)

// Doctor judges firewall rules by their effect, not their text: it traces a
// few test packets (pod to outside, pod to remote pod, ...) through the
// rules the kernel holds, in iptables and in nftables, and reads off whether
// each is masqueraded or dropped. So it finds loom's own rules missing, a
// rule written for another CIDR, and someone else's rule that NATs pod
// traffic, whoever wrote them and in whatever shape.

// Packet is a test packet: the first packet of a new TCP flow.
type Packet struct {
	Name     string // what it stands for, e.g. "pod -> outside"
	Src, Dst netip.Addr
	IIf, OIf string // "" for locally generated (IIf) packets
	Mark     uint32
	SrcLocal bool // Src is an address of this node
	DstLocal bool // Dst is an address of this node
}

// Verdict is what a chain did with a packet.
type Verdict int

// Verdicts. Continue means the chain ended without deciding (a user chain
// returned, or a base chain fell off its end with policy accept).
const (
	Continue Verdict = iota
	Accept
	Drop
	Masquerade // MASQUERADE or SNAT
	DNAT
	Return
)

func (v Verdict) String() string {
	return [...]string{"continue", "accept", "drop", "masquerade", "dnat", "return"}[v]
}

// Trace is the outcome of one packet through one hook of one ruleset.
type Trace struct {
	Verdict Verdict
	Rule    string // the rule that decided, or "policy drop of ..."
	// Unsure lists rules whose matches doctor cannot evaluate; the trace
	// assumed they did not match.
	Unsure []string
}

func (t *Trace) unsure(rule string) {
	for _, u := range t.Unsure {
		if u == rule {
			return
		}
	}
	t.Unsure = append(t.Unsure, rule)
}

// tri is a three-valued match result.
type tri int

const (
	no tri = iota
	yes
	unknown
)

func triOf(b bool) tri {
	if b {
		return yes
	}
	return no
}

func (t tri) not() tri {
	switch t {
	case yes:
		return no
	case no:
		return yes
	}
	return unknown
}

// and combines match results of one rule: all must hold.
func and(a, b tri) tri {
	if a == no || b == no {
		return no
	}
	if a == unknown || b == unknown {
		return unknown
	}
	return yes
}

// ifaceMatch matches an interface name against a pattern with iptables'
// trailing "+" or nftables' trailing "*" wildcard.
func ifaceMatch(pattern, name string) bool {
	if p, ok := strings.CutSuffix(pattern, "+"); ok {
		return strings.HasPrefix(name, p)
	}
	if p, ok := strings.CutSuffix(pattern, "*"); ok {
		return strings.HasPrefix(name, p)
	}
	return pattern == name
}

// parsePrefixOrAddr reads "10.244.0.0/16" or "10.244.1.2".
func parsePrefixOrAddr(s string) (netip.Prefix, bool) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), true
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), true
	}
	return netip.Prefix{}, false
}
