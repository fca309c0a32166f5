package firewall

// Address plan for every test in this package:
//
//	                 IPv4                      IPv6
//	pod network      10.244.0.0/16             fd00:244::/56
//	this node        10.244.1.0/24 (gw .1)     fd00:244:0:1::/64 (gw ::1)
//	other node       10.244.2.0/24             fd00:244:0:2::/64
//	changed subnet   10.244.3.0/24             fd00:244:0:3::/64
//	underlay         198.18.0.0/24 (node .11,  2001:db8:18::/64 (node ::11,
//	                 internet gateway .1)      gateway ::1)
//	"internet" host  203.0.113.10              2001:db8:113::10

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"sigs.k8s.io/knftables"
)

func dualStack() Addrs {
	return Addrs{
		Network:     netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:      netip.MustParsePrefix("10.244.1.0/24"),
		IPv6Network: netip.MustParsePrefix("fd00:244::/56"),
		IPv6Subnet:  netip.MustParsePrefix("fd00:244:0:1::/64"),
	}
}

func v4Only() Addrs {
	a := dualStack()
	a.IPv6Network, a.IPv6Subnet = netip.Prefix{}, netip.Prefix{}
	return a
}

// packet is what the evaluators look at.
type packet struct {
	src, dst netip.Addr
	mark     uint32
}

// outcome is loom's decision for a packet: masquerade it or not (nat
// postrouting), accept it or leave it to the rest of the ruleset (filter
// forward).
type outcome struct {
	masquerade bool
	accept     bool
}

// --- evaluator 1: the rule table itself -------------------------------

func (m addrMatch) matches(a netip.Addr) bool {
	return m.all() || m.prefix.Contains(a) != m.not
}

func (r rule) matches(p packet) bool {
	return (!r.marked || p.mark&kubeProxyMark == kubeProxyMark) && r.src.matches(p.src) && r.dst.matches(p.dst)
}

func evalModel(rules []rule, p packet) outcome {
	var out outcome
	for _, r := range onHook(rules, hookNAT) {
		if r.matches(p) {
			out.masquerade = r.verdict == verdictMasquerade
			break
		}
	}
	for _, r := range onHook(rules, hookForward) {
		if r.matches(p) {
			out.accept = r.verdict == verdictAccept
			break
		}
	}
	return out
}

// --- evaluator 2: nftables text, loaded into knftables' Fake -----------

// parseNFT loads fam's lines of an nft dump (Render's text) into a Fake.
func parseNFT(t *testing.T, text string, fam family) *knftables.Fake {
	t.Helper()
	var lines []string
	for _, l := range strings.Split(text, "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[2] == string(fam.nft()) {
			lines = append(lines, l)
		}
	}
	fake := knftables.NewFake(fam.nft(), Table)
	if err := fake.ParseDump(strings.Join(lines, "\n")); err != nil {
		t.Fatalf("parse %s dump: %v\n%s", fam, err, text)
	}
	return fake
}

func evalNFT(t *testing.T, fake *knftables.Fake, fam family, p packet) outcome {
	t.Helper()
	var out outcome
	if fake.Table == nil {
		return out
	}
	for _, ch := range fake.Table.Chains {
		if ch.Hook == nil {
			t.Fatalf("chain %s is not a base chain: loom's table has only base chains", ch.Name)
		}
		v := runNFTChain(t, ch.Rules, fam, p)
		switch *ch.Hook {
		case knftables.PostroutingHook:
			out.masquerade = v == "masquerade"
		case knftables.ForwardHook:
			out.accept = v == "accept"
		default:
			t.Fatalf("chain %s on unexpected hook %s", ch.Name, *ch.Hook)
		}
	}
	return out
}

func runNFTChain(t *testing.T, rules []*knftables.Rule, fam family, p packet) string {
	for _, r := range rules {
		if v, ok := matchNFT(t, r.Rule, fam, p); ok && v != "" {
			return v
		}
	}
	return ""
}

// matchNFT evaluates one rule in the subset of nft syntax loom writes. It
// fails the test on any other word, so the evaluator cannot silently skip a
// match.
func matchNFT(t *testing.T, text string, fam family, p packet) (verdict string, matched bool) {
	t.Helper()
	w := strings.Fields(text)
	for i := 0; i < len(w); {
		switch w[i] {
		case "meta": // meta mark & MASK == VALUE
			if i+5 >= len(w) || w[i+1] != "mark" || w[i+2] != "&" || w[i+4] != "==" {
				t.Fatalf("nft evaluator: cannot read %q", text)
			}
			mask, err1 := strconv.ParseUint(w[i+3], 0, 32)
			val, err2 := strconv.ParseUint(w[i+5], 0, 32)
			if err1 != nil || err2 != nil {
				t.Fatalf("nft evaluator: mark in %q: %v %v", text, err1, err2)
			}
			if uint64(p.mark)&mask != val {
				return "", false
			}
			i += 6
		case "ip", "ip6":
			if w[i] != fam.payload() {
				t.Fatalf("nft evaluator: %q in the %s table", text, fam.nft())
			}
			var a netip.Addr
			switch w[i+1] {
			case "saddr":
				a = p.src
			case "daddr":
				a = p.dst
			default:
				t.Fatalf("nft evaluator: cannot read %q", text)
			}
			i += 2
			neg := w[i] == "!="
			if neg {
				i++
			}
			pfx, err := netip.ParsePrefix(w[i])
			if err != nil {
				t.Fatalf("nft evaluator: %q: %v", text, err)
			}
			i++
			if pfx.Contains(a) == neg {
				return "", false
			}
		case "return", "accept":
			if i != len(w)-1 {
				t.Fatalf("nft evaluator: words after the verdict in %q", text)
			}
			return w[i], true
		case "masquerade":
			if rest := w[i+1:]; len(rest) > 1 || (len(rest) == 1 && rest[0] != "fully-random") {
				t.Fatalf("nft evaluator: cannot read %q", text)
			}
			return "masquerade", true
		default:
			t.Fatalf("nft evaluator: unknown word %q in %q", w[i], text)
		}
	}
	return "", true
}

// --- evaluator 3: iptables rules ----------------------------------------

// evalIPT runs p through fam's rules of the nat POSTROUTING and filter
// FORWARD built-in chains (their policies ACCEPT, and FORWARD's
// forwardPolicy). forwarded says whether the packet leaves FORWARD.
func evalIPT(t *testing.T, rules []Rule, fam family, p packet, forwardPolicy string) (out outcome, forwarded bool) {
	t.Helper()
	chains := map[string]map[string][][]string{iptNAT: {}, iptFilter: {}}
	for _, r := range rules {
		if r.IPv6 != (fam == ipv6) {
			continue
		}
		chains[r.Table][r.Chain] = append(chains[r.Table][r.Chain], r.Spec)
	}
	out.masquerade = runIPTChain(t, chains[iptNAT], iptPostrouting, p, 0) == "MASQUERADE"
	v := runIPTChain(t, chains[iptFilter], iptForward, p, 0)
	out.accept = v == "ACCEPT"
	forwarded = v == "ACCEPT" || (v == "" && forwardPolicy == "ACCEPT")
	return out, forwarded
}

func runIPTChain(t *testing.T, chains map[string][][]string, name string, p packet, depth int) string {
	t.Helper()
	if depth > 8 {
		t.Fatalf("iptables evaluator: jump loop at %s", name)
	}
	for _, s := range chains[name] {
		target, ok := matchIPT(t, s, p)
		if !ok {
			continue
		}
		switch target {
		case "RETURN":
			return ""
		case "ACCEPT", "DROP", "MASQUERADE":
			return target
		case "":
		default:
			if v := runIPTChain(t, chains, target, p, depth+1); v != "" {
				return v
			}
		}
	}
	return ""
}

// matchIPT evaluates one rule spec in the subset of iptables syntax loom
// writes, failing on anything else.
func matchIPT(t *testing.T, spec []string, p packet) (target string, matched bool) {
	t.Helper()
	neg := false
	matched = true
	for i := 0; i < len(spec); i++ {
		switch spec[i] {
		case "!":
			neg = true
			continue
		case "-s", "-d":
			a := p.src
			if spec[i] == "-d" {
				a = p.dst
			}
			i++
			pfx, err := netip.ParsePrefix(spec[i])
			if err != nil {
				t.Fatalf("iptables evaluator: %v: %v", spec, err)
			}
			if pfx.Contains(a) == neg {
				matched = false
			}
		case "-m":
			i++
			switch spec[i] {
			case "mark": // --mark VALUE/MASK
				if spec[i+1] != "--mark" {
					t.Fatalf("iptables evaluator: %v", spec)
				}
				i += 2
				v, m, _ := strings.Cut(spec[i], "/")
				val, err1 := strconv.ParseUint(v, 0, 32)
				mask, err2 := strconv.ParseUint(m, 0, 32)
				if err1 != nil || err2 != nil {
					t.Fatalf("iptables evaluator: mark in %v", spec)
				}
				if (uint64(p.mark)&mask == val) == neg {
					matched = false
				}
			case "comment":
				if spec[i+1] != "--comment" {
					t.Fatalf("iptables evaluator: %v", spec)
				}
				i += 2
			default:
				t.Fatalf("iptables evaluator: unknown match %q in %v", spec[i], spec)
			}
		case "-j":
			i++
			target = spec[i]
			if rest := spec[i+1:]; len(rest) > 1 || (len(rest) == 1 && rest[0] != "--random-fully") {
				t.Fatalf("iptables evaluator: cannot read %v", spec)
			}
			i = len(spec)
		default:
			t.Fatalf("iptables evaluator: unknown word %q in %v", spec[i], spec)
		}
		neg = false
	}
	return target, matched
}

// --- the table ---------------------------------------------------------

// TestPacketVerdicts runs packets through the rule table, its nftables
// rendering and its iptables rendering: all three must give the expected
// verdict for every row, family and config.
func TestPacketVerdicts(t *testing.T) {
	addr := netip.MustParseAddr
	type endpoints struct{ src, dst string }
	rows := []struct {
		name       string
		v4, v6     endpoints
		mark       uint32
		masquerade bool // with IPMasq on
		accept     bool // with ForwardRules on
	}{
		{name: "pod to pod same node", v4: endpoints{"10.244.1.2", "10.244.1.3"}, v6: endpoints{"fd00:244:0:1::2", "fd00:244:0:1::3"}, accept: true},
		{name: "pod to pod cross node", v4: endpoints{"10.244.1.2", "10.244.2.3"}, v6: endpoints{"fd00:244:0:1::2", "fd00:244:0:2::3"}, accept: true},
		{name: "pod to internet", v4: endpoints{"10.244.1.2", "203.0.113.10"}, v6: endpoints{"fd00:244:0:1::2", "2001:db8:113::10"}, masquerade: true, accept: true},
		{name: "pod to multicast", v4: endpoints{"10.244.1.2", "224.0.0.251"}, v6: endpoints{"fd00:244:0:1::2", "ff02::fb"}, accept: true},
		{name: "host to remote pod", v4: endpoints{"198.18.0.11", "10.244.2.3"}, v6: endpoints{"2001:db8:18::11", "fd00:244:0:2::3"}, masquerade: true, accept: true},
		{name: "host to local pod", v4: endpoints{"198.18.0.11", "10.244.1.3"}, v6: endpoints{"2001:db8:18::11", "fd00:244:0:1::3"}, accept: true},
		{name: "internet to local pod", v4: endpoints{"203.0.113.10", "10.244.1.3"}, v6: endpoints{"2001:db8:113::10", "fd00:244:0:1::3"}, accept: true},
		// flannel's "! -s Network -d Network MASQUERADE": anything from
		// outside the pod network that this node routes to a remote pod.
		{name: "internet via this node to remote pod", v4: endpoints{"203.0.113.10", "10.244.2.3"}, v6: endpoints{"2001:db8:113::10", "fd00:244:0:2::3"}, masquerade: true, accept: true},
		{name: "kube-proxy marked pod to internet", v4: endpoints{"10.244.1.2", "203.0.113.10"}, v6: endpoints{"fd00:244:0:1::2", "2001:db8:113::10"}, mark: 0x4000, accept: true},
		{name: "kube-proxy mark among other bits", v4: endpoints{"10.244.1.2", "203.0.113.10"}, v6: endpoints{"fd00:244:0:1::2", "2001:db8:113::10"}, mark: 0x4001, accept: true},
		{name: "other mark pod to internet", v4: endpoints{"10.244.1.2", "203.0.113.10"}, v6: endpoints{"fd00:244:0:1::2", "2001:db8:113::10"}, mark: 0x8000, masquerade: true, accept: true},
		{name: "kube-proxy marked host to remote pod", v4: endpoints{"198.18.0.11", "10.244.2.3"}, v6: endpoints{"2001:db8:18::11", "fd00:244:0:2::3"}, mark: 0x4000, accept: true},
		{name: "host to internet", v4: endpoints{"198.18.0.11", "203.0.113.10"}, v6: endpoints{"2001:db8:18::11", "2001:db8:113::10"}},
	}
	configs := []struct {
		name           string
		ipMasq, fwdOn  bool
		addrs          Addrs
		familiesTested []family
	}{
		{name: "masquerade and forward", ipMasq: true, fwdOn: true, addrs: dualStack(), familiesTested: []family{ipv4, ipv6}},
		{name: "masquerade only", ipMasq: true, addrs: dualStack(), familiesTested: []family{ipv4, ipv6}},
		{name: "forward only (ip-masq off)", fwdOn: true, addrs: dualStack(), familiesTested: []family{ipv4, ipv6}},
		{name: "neither", addrs: dualStack(), familiesTested: []family{ipv4, ipv6}},
		{name: "IPv4 only", ipMasq: true, fwdOn: true, addrs: v4Only(), familiesTested: []family{ipv4}},
	}
	for _, cfg := range configs {
		t.Run(cfg.name, func(t *testing.T) {
			nftText, nftFwd := Render(ModeNFTables, cfg.addrs, cfg.ipMasq, cfg.fwdOn)
			_, iptRules := Render(ModeIPTables, cfg.addrs, cfg.ipMasq, cfg.fwdOn)
			for _, fam := range cfg.familiesTested {
				network, subnet := cfg.addrs.of(fam)
				model := ruleTable(fam, network, subnet, cfg.ipMasq, cfg.fwdOn)
				fake := parseNFT(t, nftText, fam)
				for _, row := range rows {
					ep := row.v4
					if fam == ipv6 {
						ep = row.v6
					}
					p := packet{src: addr(ep.src), dst: addr(ep.dst), mark: row.mark}
					want := outcome{masquerade: row.masquerade && cfg.ipMasq, accept: row.accept && cfg.fwdOn}
					name := fam.String() + "/" + row.name
					if got := evalModel(model, p); got != want {
						t.Errorf("%s: rule table gives %+v, want %+v", name, got, want)
					}
					if got := evalNFT(t, fake, fam, p); got != want {
						t.Errorf("%s: nftables rendering gives %+v, want %+v", name, got, want)
					}
					got, fwdAccept := evalIPT(t, iptRules, fam, p, "ACCEPT")
					if got != want {
						t.Errorf("%s: iptables rendering gives %+v, want %+v", name, got, want)
					}
					if !fwdAccept {
						t.Errorf("%s: iptables FORWARD with policy ACCEPT dropped the packet", name)
					}
					// Docker's FORWARD policy DROP: the packet is forwarded
					// only if loom accepts it in iptables too. In nftables
					// mode the nftables forward chain (policy accept) and
					// iptables' FORWARD with LOOM-FWD must both pass it.
					_, iptFwd := evalIPT(t, iptRules, fam, p, "DROP")
					nftOut, nftModeIPTFwd := evalIPT(t, nftFwd, fam, p, "DROP")
					if nftOut.masquerade {
						t.Errorf("%s: the iptables part of nftables mode masquerades", name)
					}
					if iptFwd != want.accept || nftModeIPTFwd != want.accept {
						t.Errorf("%s: under FORWARD policy DROP forwarded = %v (iptables mode), %v (nftables mode); want %v",
							name, iptFwd, nftModeIPTFwd, want.accept)
					}
				}
			}
			if len(cfg.familiesTested) == 1 {
				if strings.Contains(nftText, "ip6 ") {
					t.Errorf("IPv4-only config renders IPv6 rules:\n%s", nftText)
				}
				for _, r := range iptRules {
					if r.IPv6 {
						t.Errorf("IPv4-only config renders IPv6 rule %s", r)
					}
				}
			}
		})
	}
}
