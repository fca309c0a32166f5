package firewall

import (
	"errors"
	"fmt"
	"strings"
)

// Rule is one iptables rule as loom installs it.
type Rule struct {
	IPv6  bool     // an ip6tables rule (else iptables)
	Table string   // "nat" or "filter"
	Chain string   // loom's chain, or the built-in chain for the jump into it
	Spec  []string // the rule specification, as given to iptables -A Chain
}

// String renders r as the command that appends it, e.g.
// `iptables -t nat -A LOOM-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "..." -j RETURN`.
func (r Rule) String() string {
	cmd := ipv4.iptablesCmd()
	if r.IPv6 {
		cmd = ipv6.iptablesCmd()
	}
	w := []string{cmd, "-t", r.Table, "-A", r.Chain}
	for _, s := range r.Spec {
		if strings.ContainsAny(s, " \t") {
			s = `"` + s + `"`
		}
		w = append(w, s)
	}
	return strings.Join(w, " ")
}

// iptablesAPI is the part of go-iptables' *iptables.IPTables loom uses, for
// one family. Every call execs iptables, so it must run inside the target
// namespace. The fake beside the tests implements it in memory.
type iptablesAPI interface {
	// List returns `iptables -t table -S chain`: "-P"/"-N" line, then
	// one "-A chain spec" line per rule.
	List(table, chain string) ([]string, error)
	ChainExists(table, chain string) (bool, error)
	// ClearChain flushes chain, creating it if missing.
	ClearChain(table, chain string) error
	// ClearAndDeleteChain removes chain if it exists; nothing may jump to it.
	ClearAndDeleteChain(table, chain string) error
	Exists(table, chain string, spec ...string) (bool, error)
	Append(table, chain string, spec ...string) error
	Insert(table, chain string, pos int, spec ...string) error
	// Replace replaces the rule at pos (1-based) in one kernel update.
	Replace(table, chain string, pos int, spec ...string) error
	Delete(table, chain string, spec ...string) error
	HasRandomFully() bool
}

// iptChain is one of loom's iptables chains and where it hangs.
type iptChain struct {
	hook        hook
	table       string // nat or filter
	name        string // LOOM-POSTRTG or LOOM-FWD
	staging     string // its stand-in while it is rewritten
	parent      string // the built-in chain that jumps to it
	jumpComment string
}

func iptChains() [2]iptChain {
	return [2]iptChain{
		{hook: hookNAT, table: iptNAT, name: IPTNATChain, staging: iptNATStaging, parent: iptPostrouting, jumpComment: iptNATJumpComment},
		{hook: hookForward, table: iptFilter, name: IPTForwardChain, staging: iptForwardStaging, parent: iptForward, jumpComment: iptForwardJumpComment},
	}
}

func (c iptChain) String() string { return c.table + "/" + c.name }

// jump is the spec of the rule in c.parent that jumps to target.
func (c iptChain) jump(target string) []string {
	return []string{"-m", "comment", "--comment", c.jumpComment, "-j", target}
}

// iptSpec renders r as an iptables rule specification, in the order
// `iptables -S` prints it back.
func iptSpec(r rule, fullyRandom bool) []string {
	var s []string
	s = appendIPTAddr(s, "-s", r.src)
	s = appendIPTAddr(s, "-d", r.dst)
	if r.marked {
		s = append(s, "-m", "mark", "--mark", fmt.Sprintf("%#x/%#x", kubeProxyMark, kubeProxyMark))
	}
	s = append(s, "-m", "comment", "--comment", r.comment)
	switch r.verdict {
	case verdictReturn:
		s = append(s, "-j", "RETURN")
	case verdictAccept:
		s = append(s, "-j", "ACCEPT")
	case verdictMasquerade:
		s = append(s, "-j", "MASQUERADE")
		if fullyRandom {
			s = append(s, "--random-fully")
		}
	}
	return s
}

func appendIPTAddr(s []string, flag string, m addrMatch) []string {
	if m.all() {
		return s
	}
	if m.not {
		s = append(s, "!")
	}
	return append(s, flag, m.prefix.String())
}

func iptSpecs(rules []rule, fullyRandom bool) [][]string {
	out := make([][]string, 0, len(rules))
	for _, r := range rules {
		out = append(out, iptSpec(r, fullyRandom))
	}
	return out
}

// renderIPT lists fam's iptables rules for the hooks in hooks: each loom
// chain's rules, then the jump into it.
func renderIPT(fam family, rules []rule, fullyRandom bool, hooks ...hook) []Rule {
	var out []Rule
	for _, c := range iptChains() {
		rs := onHook(rules, c.hook)
		if len(rs) == 0 || !containsHook(hooks, c.hook) {
			continue
		}
		for _, s := range iptSpecs(rs, fullyRandom) {
			out = append(out, Rule{IPv6: fam == ipv6, Table: c.table, Chain: c.name, Spec: s})
		}
		out = append(out, Rule{IPv6: fam == ipv6, Table: c.table, Chain: c.parent, Spec: c.jump(c.name)})
	}
	return out
}

func containsHook(hs []hook, h hook) bool {
	for _, x := range hs {
		if x == h {
			return true
		}
	}
	return false
}

// normalizeIPT makes an `iptables -S` line comparable with one built from a
// spec: iptables quotes comments with spaces, a spec does not.
func normalizeIPT(line string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(line, `"`, "")), " ")
}

func iptLine(chain string, spec []string) string {
	return normalizeIPT("-A " + chain + " " + strings.Join(spec, " "))
}

// sameIPTRules reports whether the listing of chain holds exactly want.
func sameIPTRules(listing []string, chain string, want [][]string) bool {
	var have []string
	for _, l := range listing {
		if strings.HasPrefix(l, "-A ") {
			have = append(have, normalizeIPT(l))
		}
	}
	if len(have) != len(want) {
		return false
	}
	for i, s := range want {
		if have[i] != iptLine(chain, s) {
			return false
		}
	}
	return true
}

// ensureIPTChain makes c hold exactly want (not empty) and be jumped to from
// c.parent, replacing it without a gap when it is in use (see the package
// doc). It reports whether it wrote anything.
func ensureIPTChain(ipt iptablesAPI, c iptChain, want [][]string) (changed bool, err error) {
	listing, err := ipt.List(c.table, c.name)
	if err != nil {
		// A missing chain fails to list too; tell the two apart.
		exists, cerr := ipt.ChainExists(c.table, c.name)
		if cerr != nil || exists {
			return false, fmt.Errorf("list chain %s: %w", c, err)
		}
		listing = nil
	}
	// iptables -C of a jump to a missing chain fails (exit 2) rather than
	// answer "no"; no such jump can exist anyway.
	jumped := false
	if listing != nil {
		if jumped, err = ipt.Exists(c.table, c.parent, c.jump(c.name)...); err != nil {
			return false, fmt.Errorf("check the jump from %s to %s: %w", c.parent, c, err)
		}
	}
	same := listing != nil && sameIPTRules(listing, c.name, want)
	switch {
	case same:
	case !jumped:
		// Nothing jumps to the chain: write it in place.
		if err := fillIPTChain(ipt, c.table, c.name, want); err != nil {
			return false, err
		}
	default:
		if err := swapIPTChain(ipt, c, want); err != nil {
			return true, err
		}
	}
	if !jumped {
		if err := ipt.Insert(c.table, c.parent, 1, c.jump(c.name)...); err != nil {
			return true, fmt.Errorf("add the jump from %s to %s: %w", c.parent, c, err)
		}
		// A sync interrupted in the middle of a swap leaves the jump on
		// the staging chain; the real one is back in front of it now.
		if _, err := removeIPTChain(ipt, c, c.staging); err != nil {
			return true, err
		}
	}
	return !same || !jumped, nil
}

// fillIPTChain makes chain (created if missing) hold exactly specs.
func fillIPTChain(ipt iptablesAPI, table, chain string, specs [][]string) error {
	if err := ipt.ClearChain(table, chain); err != nil {
		return fmt.Errorf("flush chain %s/%s: %w", table, chain, err)
	}
	for _, s := range specs {
		if err := ipt.Append(table, chain, s...); err != nil {
			return fmt.Errorf("append to %s/%s: %w", table, chain, err)
		}
	}
	return nil
}

// swapIPTChain rewrites c, which c.parent jumps to, so that every packet
// meets either the old rules or the new ones: the new rules go to the
// staging chain, the jump is switched to it in one -R, the real chain is
// rewritten while unused, the jump is switched back and the staging chain
// removed.
func swapIPTChain(ipt iptablesAPI, c iptChain, want [][]string) error {
	if err := fillIPTChain(ipt, c.table, c.staging, want); err != nil {
		return err
	}
	if err := repointIPTJump(ipt, c, c.name, c.staging); err != nil {
		return err
	}
	if err := fillIPTChain(ipt, c.table, c.name, want); err != nil {
		return err
	}
	if err := repointIPTJump(ipt, c, c.staging, c.name); err != nil {
		return err
	}
	_, err := removeIPTChain(ipt, c, c.staging)
	return err
}

// repointIPTJump replaces, in place, the jump from c.parent to from by a
// jump to to. (The rule number is read just before -R uses it; another
// writer inserting into c.parent in between is the accepted race.) If the
// jump cannot be found in the listing, the new jump is inserted first and
// the old one deleted after.
func repointIPTJump(ipt iptablesAPI, c iptChain, from, to string) error {
	listing, err := ipt.List(c.table, c.parent)
	if err != nil {
		return fmt.Errorf("list %s/%s: %w", c.table, c.parent, err)
	}
	want := iptLine(c.parent, c.jump(from))
	n := 0
	for _, l := range listing {
		if !strings.HasPrefix(l, "-A ") {
			continue
		}
		n++
		if normalizeIPT(l) == want {
			if err := ipt.Replace(c.table, c.parent, n, c.jump(to)...); err != nil {
				return fmt.Errorf("switch the jump from %s/%s to %s: %w", c.table, c.parent, to, err)
			}
			return nil
		}
	}
	if err := ipt.Insert(c.table, c.parent, 1, c.jump(to)...); err != nil {
		return fmt.Errorf("add the jump from %s/%s to %s: %w", c.table, c.parent, to, err)
	}
	if err := ipt.Delete(c.table, c.parent, c.jump(from)...); err != nil {
		return fmt.Errorf("delete the jump from %s/%s to %s: %w", c.table, c.parent, from, err)
	}
	return nil
}

// removeIPTChain deletes every jump from c.parent to chain, then chain.
func removeIPTChain(ipt iptablesAPI, c iptChain, chain string) (changed bool, err error) {
	exists, err := ipt.ChainExists(c.table, chain)
	if err != nil {
		return false, fmt.Errorf("check chain %s/%s: %w", c.table, chain, err)
	}
	if !exists { // and so no jump to it either
		return false, nil
	}
	jump := c.jump(chain)
	for range 100 { // duplicates are possible; a bound keeps a broken iptables from looping
		ok, err := ipt.Exists(c.table, c.parent, jump...)
		if err != nil {
			return changed, fmt.Errorf("check the jump from %s/%s to %s: %w", c.table, c.parent, chain, err)
		}
		if !ok {
			break
		}
		if err := ipt.Delete(c.table, c.parent, jump...); err != nil {
			return changed, fmt.Errorf("delete the jump from %s/%s to %s: %w", c.table, c.parent, chain, err)
		}
		changed = true
	}
	if err := ipt.ClearAndDeleteChain(c.table, chain); err != nil {
		return changed, fmt.Errorf("delete chain %s/%s: %w", c.table, chain, err)
	}
	return true, nil
}

// removeIPT removes c and its staging chain with their jumps.
func removeIPT(ipt iptablesAPI, c iptChain) (changed bool, err error) {
	a, err1 := removeIPTChain(ipt, c, c.staging)
	b, err2 := removeIPTChain(ipt, c, c.name)
	return a || b, errors.Join(err1, err2)
}

// forwardPolicyDrop reports whether iptables' FORWARD policy is DROP.
// Listing does not create the filter table on iptables-nft.
func forwardPolicyDrop(ipt iptablesAPI) (bool, error) {
	listing, err := ipt.List(iptFilter, iptForward)
	if err != nil {
		return false, fmt.Errorf("read the FORWARD policy: %w", err)
	}
	for _, l := range listing {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "-P" && f[1] == iptForward {
			return f[2] == "DROP", nil
		}
	}
	return false, nil
}
