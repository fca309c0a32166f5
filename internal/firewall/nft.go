package firewall

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"sigs.k8s.io/knftables"
)

// nftRuleText renders r in nft syntax, spelled the way `nft list` prints it
// back (so the two can be compared by eye and by test).
func nftRuleText(fam family, r rule, fullyRandom bool) string {
	var w []string
	if r.marked {
		w = append(w, fmt.Sprintf("meta mark & 0x%08x == 0x%08x", kubeProxyMark, kubeProxyMark))
	}
	w = appendNFTAddr(w, fam, "saddr", r.src)
	w = appendNFTAddr(w, fam, "daddr", r.dst)
	switch r.verdict {
	case verdictReturn:
		w = append(w, "return")
	case verdictAccept:
		w = append(w, "accept")
	case verdictMasquerade:
		w = append(w, "masquerade")
		if fullyRandom {
			w = append(w, "fully-random")
		}
	}
	return strings.Join(w, " ")
}

func appendNFTAddr(w []string, fam family, dir string, m addrMatch) []string {
	if m.all() {
		return w
	}
	w = append(w, fam.payload(), dir)
	if m.not {
		w = append(w, "!=")
	}
	return append(w, m.prefix.String())
}

// nftBaseChain is the base chain of Table that holds the rules of h.
func nftBaseChain(h hook) *knftables.Chain {
	if h == hookNAT {
		return &knftables.Chain{
			Name:     NFTNATChain,
			Type:     knftables.PtrTo(knftables.NATType),
			Hook:     knftables.PtrTo(knftables.PostroutingHook),
			Priority: knftables.PtrTo(knftables.SNATPriority),
		}
	}
	return &knftables.Chain{
		Name:     NFTForwardChain,
		Type:     knftables.PtrTo(knftables.FilterType),
		Hook:     knftables.PtrTo(knftables.ForwardHook),
		Priority: knftables.PtrTo(knftables.FilterPriority),
		Policy:   knftables.PtrTo(knftables.AcceptPolicy),
	}
}

// nftHooks lists the hooks in the order their chains are written.
func nftHooks() [2]hook { return [2]hook{hookNAT, hookForward} }

// writeNFT adds to tx the replacement of fam's table by one holding rules:
// the old table (if any) is deleted and the new one written in the same
// transaction, so the kernel swaps them atomically. With no rules the table
// is just deleted.
func writeNFT(tx *knftables.Transaction, fam family, rules []rule, fullyRandom bool) {
	// "add" makes the "delete" valid whether or not the table exists.
	tx.Add(&knftables.Table{})
	tx.Delete(&knftables.Table{})
	if len(rules) == 0 {
		return
	}
	tx.Add(&knftables.Table{Comment: knftables.PtrTo(tableComment)})
	for _, h := range nftHooks() {
		rs := onHook(rules, h)
		if len(rs) == 0 {
			continue
		}
		c := nftBaseChain(h)
		tx.Add(c)
		for _, r := range rs {
			tx.Add(&knftables.Rule{
				Chain:   c.Name,
				Rule:    nftRuleText(fam, r, fullyRandom),
				Comment: knftables.PtrTo(r.comment),
			})
		}
	}
}

// nftComments is how the sync recognises a table: per chain, the comments
// of its rules in order.
type nftComments map[string][]string

func wantNFTComments(rules []rule) nftComments {
	want := nftComments{}
	for _, h := range nftHooks() {
		for _, r := range onHook(rules, h) {
			name := nftBaseChain(h).Name
			want[name] = append(want[name], r.comment)
		}
	}
	return want
}

// readNFT reads the comments of the rules in fam's table; exists is false
// when there is no table. It costs one `nft list table`.
func readNFT(ctx context.Context, nft knftables.Interface) (have nftComments, exists bool, err error) {
	rules, err := nft.ListRules(ctx, "")
	if knftables.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("list table %s: %w", Table, err)
	}
	have = nftComments{}
	for _, r := range rules {
		c := ""
		if r.Comment != nil {
			c = *r.Comment
		}
		have[r.Chain] = append(have[r.Chain], c)
	}
	return have, true, nil
}

func (c nftComments) equal(o nftComments) bool {
	if len(c) != len(o) {
		return false
	}
	for k, v := range c {
		if w, ok := o[k]; !ok || !slices.Equal(v, w) {
			return false
		}
	}
	return true
}

// syncNFT makes fam's table hold exactly rules (no table when there are
// none) and reports whether it had to write.
func syncNFT(ctx context.Context, nft knftables.Interface, fam family, rules []rule, fullyRandom bool) (changed bool, err error) {
	have, exists, err := readNFT(ctx, nft)
	if err != nil {
		return false, err
	}
	if len(rules) == 0 && !exists {
		return false, nil
	}
	if len(rules) > 0 && exists && have.equal(wantNFTComments(rules)) {
		return false, nil
	}
	tx := nft.NewTransaction()
	writeNFT(tx, fam, rules, fullyRandom)
	if err := nft.Run(ctx, tx); err != nil {
		what := "replace"
		if len(rules) == 0 {
			what = "delete"
		}
		return false, fmt.Errorf("%s nftables table %s %s: %w", what, fam.nft(), Table, err)
	}
	return true, nil
}

// nftFullyRandom checks, without changing anything, whether nft and the
// kernel accept "masquerade fully-random" in fam. known is false when they
// refuse a plain masquerade too: nft is failing for another reason, and
// the answer is not known yet.
func nftFullyRandom(ctx context.Context, nft knftables.Interface) (ok, known bool) {
	if nftCheckMasquerade(ctx, nft, "masquerade fully-random") == nil {
		return true, true
	}
	return false, nftCheckMasquerade(ctx, nft, "masquerade") == nil
}

// nftCheckMasquerade dry-runs a nat chain holding rule in Table.
func nftCheckMasquerade(ctx context.Context, nft knftables.Interface, rule string) error {
	tx := nft.NewTransaction()
	tx.Add(&knftables.Table{})
	tx.Add(nftBaseChain(hookNAT))
	tx.Add(&knftables.Rule{Chain: NFTNATChain, Rule: rule})
	return nft.Check(ctx, tx)
}

// renderNFT is the text of fam's table holding rules, as knftables' Fake
// dumps it ("add table ...", "add chain ...", "add rule ..." lines); empty
// when there are no rules.
func renderNFT(fam family, rules []rule, fullyRandom bool) string {
	fake := knftables.NewFake(fam.nft(), Table)
	tx := fake.NewTransaction()
	writeNFT(tx, fam, rules, fullyRandom)
	if err := fake.Run(context.Background(), tx); err != nil {
		// Unreachable unless ruleTable builds an invalid transaction,
		// which the golden tests would show.
		return fmt.Sprintf("# ERROR: render %s %s: %v\n", fam.nft(), Table, err)
	}
	return fake.Dump()
}
