package doctor

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// NFTRuleset is `nft -j list ruleset`, indexed for tracing.
type NFTRuleset struct {
	Chains []*NFTChain
	sets   map[string]nftSet // by family/table/name
	// Text maps "family table chain handle" to the rule as `nft -a list
	// ruleset` prints it, for evidence; may be empty.
	Text map[string]string
}

// NFTChain is one chain; Hook is "" for a regular chain.
type NFTChain struct {
	Family, Table, Name string
	Type, Hook, Policy  string
	Prio                int
	Rules               []NFTRule
}

// NFTRule is one rule: its expressions, raw.
type NFTRule struct {
	Handle int
	Expr   []map[string]json.RawMessage
	Text   string
}

type nftSet struct {
	elems []json.RawMessage // for a map: [key, value] pairs
}

// ParseNFTJSON reads `nft -j list ruleset` output.
func ParseNFTJSON(data []byte) (*NFTRuleset, error) {
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("decode nft -j output: %w", err)
	}
	rs := &NFTRuleset{sets: map[string]nftSet{}, Text: map[string]string{}}
	chains := map[string]*NFTChain{}
	type ruleObj struct {
		Family, Table, Chain string
		Handle               int
		Expr                 []map[string]json.RawMessage
	}
	var rules []ruleObj
	for _, obj := range doc.Nftables {
		for kind, raw := range obj {
			switch kind {
			case "chain":
				var c NFTChain
				if err := json.Unmarshal(raw, &c); err != nil {
					return nil, fmt.Errorf("decode chain: %w", err)
				}
				chains[c.Family+" "+c.Table+" "+c.Name] = &c
				rs.Chains = append(rs.Chains, &c)
			case "rule":
				var r ruleObj
				if err := json.Unmarshal(raw, &r); err != nil {
					return nil, fmt.Errorf("decode rule: %w", err)
				}
				rules = append(rules, r)
			case "set", "map":
				var s struct {
					Family, Table, Name string
					Elem                []json.RawMessage
				}
				if err := json.Unmarshal(raw, &s); err != nil {
					return nil, fmt.Errorf("decode %s: %w", kind, err)
				}
				rs.sets[s.Family+" "+s.Table+" "+s.Name] = nftSet{elems: s.Elem}
			}
		}
	}
	for _, r := range rules {
		if c := chains[r.Family+" "+r.Table+" "+r.Chain]; c != nil {
			c.Rules = append(c.Rules, NFTRule{Handle: r.Handle, Expr: r.Expr})
		}
	}
	return rs, nil
}

// AddText attaches `nft -a list ruleset` lines to the rules, by handle.
func (rs *NFTRuleset) AddText(text string) {
	var family, table, chain string
	for line := range strings.SplitSeq(text, "\n") {
		l := strings.TrimSpace(line)
		f := strings.Fields(l)
		switch {
		case len(f) >= 3 && f[0] == "table":
			family, table = f[1], f[2]
		case len(f) >= 2 && f[0] == "chain":
			chain = f[1]
		default:
			body, handle, found := strings.Cut(l, " # handle ")
			if found {
				rs.Text[family+" "+table+" "+chain+" "+handle] = body
			}
		}
	}
	for _, c := range rs.Chains {
		for i := range c.Rules {
			c.Rules[i].Text = rs.Text[fmt.Sprintf("%s %s %s %d", c.Family, c.Table, c.Name, c.Rules[i].Handle)]
		}
	}
}

// BaseChains returns the base chains on hook of the given type ("nat",
// "filter"), in priority order, of families that see IPv4 packets.
// Tables iptables-nft manages are left out when skipIPT is set: their
// rules are read (and traced) from iptables-save.
func (rs *NFTRuleset) BaseChains(hook, typ string, skipIPT bool) []*NFTChain {
	var out []*NFTChain
	for _, c := range rs.Chains {
		if c.Hook != hook || c.Type != typ || (c.Family != "ip" && c.Family != "inet") {
			continue
		}
		if skipIPT && c.Family == "ip" && slices.Contains([]string{"filter", "nat", "mangle", "raw", "security"}, c.Table) {
			continue
		}
		out = append(out, c)
	}
	slices.SortStableFunc(out, func(a, b *NFTChain) int { return a.Prio - b.Prio })
	return out
}

func (rs *NFTRuleset) chain(family, table, name string) *NFTChain {
	for _, c := range rs.Chains {
		if c.Family == family && c.Table == table && c.Name == name {
			return c
		}
	}
	return nil
}

func (c *NFTChain) String() string {
	return fmt.Sprintf("table %s %s chain %s", c.Family, c.Table, c.Name)
}

func (r NFTRule) describe(c *NFTChain) string {
	if r.Text != "" {
		return fmt.Sprintf("%s: %s", c, r.Text)
	}
	return fmt.Sprintf("%s handle %d", c, r.Handle)
}

// TraceNFT runs p through base chain c.
func (rs *NFTRuleset) TraceNFT(c *NFTChain, p Packet) Trace {
	var tr Trace
	v, rule := rs.run(c, p, &tr, 0)
	if v == Continue || v == Return {
		if c.Policy == "drop" {
			return Trace{Verdict: Drop, Rule: fmt.Sprintf("%s policy drop", c), Unsure: tr.Unsure}
		}
		v, rule = Continue, fmt.Sprintf("%s policy %s", c, c.Policy)
	}
	tr.Verdict, tr.Rule = v, rule
	return tr
}

func (rs *NFTRuleset) run(c *NFTChain, p Packet, tr *Trace, depth int) (Verdict, string) {
	if depth > maxDepth {
		return Continue, ""
	}
rules:
	for _, r := range c.Rules {
		for _, e := range r.Expr {
			for kind, raw := range e {
				switch kind {
				case "match":
					switch rs.evalMatch(c, raw, p) {
					case no:
						continue rules
					case unknown:
						tr.unsure(r.describe(c))
						continue rules
					}
				case "masquerade", "snat":
					return Masquerade, r.describe(c)
				case "dnat", "redirect":
					return DNAT, r.describe(c)
				case "accept":
					return Accept, r.describe(c)
				case "drop", "reject":
					return Drop, r.describe(c)
				case "return":
					return Return, r.describe(c)
				case "jump", "goto":
					v, rule := rs.jump(c, raw, p, tr, depth)
					if v != Continue && v != Return {
						return v, rule
					}
					if kind == "goto" {
						return Return, rule
					}
				case "vmap":
					v, rule, t := rs.vmap(c, raw, p, tr, depth)
					if t == unknown {
						tr.unsure(r.describe(c))
						continue rules
					}
					if t == yes && v != Continue {
						if v == Return || rule == "" {
							rule = r.describe(c)
						}
						return v, rule
					}
				case "xt":
					tr.unsure(r.describe(c)) // an iptables-nft match or target
					continue rules
				}
				// counter, log, meta/ct set, mangle, limit...: no verdict.
			}
		}
	}
	return Continue, ""
}

func (rs *NFTRuleset) jump(c *NFTChain, raw json.RawMessage, p Packet, tr *Trace, depth int) (Verdict, string) {
	var j struct{ Target string }
	if json.Unmarshal(raw, &j) != nil {
		return Continue, ""
	}
	next := rs.chain(c.Family, c.Table, j.Target)
	if next == nil {
		return Continue, ""
	}
	return rs.run(next, p, tr, depth+1)
}

// vmap evaluates a verdict map; the tri says whether a key matched.
func (rs *NFTRuleset) vmap(c *NFTChain, raw json.RawMessage, p Packet, tr *Trace, depth int) (Verdict, string, tri) {
	var vm struct {
		Key  json.RawMessage
		Data json.RawMessage
	}
	if json.Unmarshal(raw, &vm) != nil {
		return Continue, "", unknown
	}
	elems, ok := rs.setElems(c, vm.Data)
	if !ok {
		return Continue, "", unknown
	}
	key, ok := evalLeft(vm.Key, p)
	if !ok {
		return Continue, "", unknown
	}
	for _, el := range elems {
		var pair []json.RawMessage
		if json.Unmarshal(el, &pair) != nil || len(pair) != 2 {
			continue
		}
		switch elemMatch(key, pair[0]) {
		case unknown:
			return Continue, "", unknown
		case no:
			continue
		}
		var verdict map[string]json.RawMessage
		if json.Unmarshal(pair[1], &verdict) != nil {
			return Continue, "", unknown
		}
		for kind, arg := range verdict {
			switch kind {
			case "accept":
				return Accept, "", yes
			case "drop":
				return Drop, "", yes
			case "return":
				return Return, "", yes
			case "jump", "goto":
				v, rule := rs.jump(c, arg, p, tr, depth)
				if kind == "goto" && (v == Continue || v == Return) {
					return Return, rule, yes
				}
				return v, rule, yes
			}
		}
		return Continue, "", yes
	}
	return Continue, "", no
}
