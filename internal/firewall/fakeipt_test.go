package firewall

import (
	"fmt"
	"slices"
	"strings"
	"sync"
)

// fakeIPT is an in-memory iptables for one family: the tables nat and
// filter with their built-in chains, user chains, policies and rules, with
// iptables' refusals (deleting a chain something jumps to, jumping to a
// missing chain, deleting a missing rule). Its listing is `iptables -S`'s.
type fakeIPT struct {
	mu          sync.Mutex // guards the fields below
	tables      map[string]*fakeIPTTable
	randomFully bool
	writes      int // mutating calls so far
	// observe, if set, is called (without mu) after every mutating call,
	// so a test can look at every intermediate state.
	observe func()
}

type fakeIPTTable struct {
	builtin map[string]string     // built-in chain -> policy
	chains  map[string][][]string // chain -> rule specs, in order
}

func newFakeIPT() *fakeIPT {
	f := &fakeIPT{tables: map[string]*fakeIPTTable{}, randomFully: true}
	for table, chains := range map[string][]string{
		iptNAT:    {"PREROUTING", "INPUT", "OUTPUT", iptPostrouting},
		iptFilter: {"INPUT", iptForward, "OUTPUT"},
	} {
		t := &fakeIPTTable{builtin: map[string]string{}, chains: map[string][][]string{}}
		for _, c := range chains {
			t.builtin[c] = "ACCEPT"
			t.chains[c] = nil
		}
		f.tables[table] = t
	}
	return f
}

func (f *fakeIPT) table(name string) (*fakeIPTTable, error) {
	t, ok := f.tables[name]
	if !ok {
		return nil, fmt.Errorf("fake iptables: no table %q", name)
	}
	return t, nil
}

func (f *fakeIPT) wrote() {
	f.writes++
	obs := f.observe
	f.mu.Unlock()
	if obs != nil {
		obs()
	}
	f.mu.Lock()
}

// quoteIPT joins spec the way iptables -S prints it: comments with spaces
// in double quotes.
func quoteIPT(spec []string) string {
	w := make([]string, len(spec))
	for i, s := range spec {
		if strings.Contains(s, " ") {
			s = `"` + s + `"`
		}
		w[i] = s
	}
	return strings.Join(w, " ")
}

func (f *fakeIPT) List(table, chain string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return nil, err
	}
	rules, ok := t.chains[chain]
	if !ok {
		return nil, fmt.Errorf("fake iptables: chain `%s' in table `%s' is incompatible, use 'nft' tool", chain, table)
	}
	var out []string
	if p, ok := t.builtin[chain]; ok {
		out = append(out, "-P "+chain+" "+p)
	} else {
		out = append(out, "-N "+chain)
	}
	for _, s := range rules {
		out = append(out, "-A "+chain+" "+quoteIPT(s))
	}
	return out, nil
}

func (f *fakeIPT) ChainExists(table, chain string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return false, err
	}
	_, ok := t.chains[chain]
	return ok, nil
}

func (f *fakeIPT) ClearChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return err
	}
	t.chains[chain] = nil
	f.wrote()
	return nil
}

func (f *fakeIPT) ClearAndDeleteChain(table, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return err
	}
	if _, ok := t.chains[chain]; !ok {
		return nil
	}
	if _, ok := t.builtin[chain]; ok {
		return fmt.Errorf("fake iptables: cannot delete built-in chain %s", chain)
	}
	for name, rules := range t.chains {
		for _, s := range rules {
			if target(s) == chain {
				return fmt.Errorf("fake iptables: chain %s is referenced from %s", chain, name)
			}
		}
	}
	delete(t.chains, chain)
	f.wrote()
	return nil
}

func target(spec []string) string {
	if i := slices.Index(spec, "-j"); i >= 0 && i+1 < len(spec) {
		return spec[i+1]
	}
	return ""
}

func (f *fakeIPT) index(t *fakeIPTTable, chain string, spec []string) int {
	want := normalizeIPT(strings.Join(spec, " "))
	for i, s := range t.chains[chain] {
		if normalizeIPT(strings.Join(s, " ")) == want {
			return i
		}
	}
	return -1
}

func (f *fakeIPT) checkAdd(t *fakeIPTTable, table, chain string, spec []string) error {
	if _, ok := t.chains[chain]; !ok {
		return fmt.Errorf("fake iptables: no chain %s in %s", chain, table)
	}
	switch j := target(spec); j {
	case "", "RETURN", "ACCEPT", "DROP", "MASQUERADE":
	default:
		if _, ok := t.chains[j]; !ok {
			return fmt.Errorf("fake iptables: jump to missing chain %s", j)
		}
	}
	return nil
}

func (f *fakeIPT) Exists(table, chain string, spec ...string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return false, err
	}
	if _, ok := t.chains[chain]; !ok {
		return false, fmt.Errorf("fake iptables: no chain %s in %s", chain, table)
	}
	// Like iptables -C: a jump to a missing chain is an error (exit 2),
	// not "no such rule".
	if err := f.checkAdd(t, table, chain, spec); err != nil {
		return false, err
	}
	return f.index(t, chain, spec) >= 0, nil
}

func (f *fakeIPT) Append(table, chain string, spec ...string) error {
	return f.Insert(table, chain, 0, spec...)
}

// Insert inserts at pos (1-based); pos 0 appends.
func (f *fakeIPT) Insert(table, chain string, pos int, spec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return err
	}
	if err := f.checkAdd(t, table, chain, spec); err != nil {
		return err
	}
	rules := t.chains[chain]
	if pos == 0 {
		pos = len(rules) + 1
	}
	if pos < 1 || pos > len(rules)+1 {
		return fmt.Errorf("fake iptables: index %d out of range in %s", pos, chain)
	}
	t.chains[chain] = slices.Insert(rules, pos-1, slices.Clone(spec))
	f.wrote()
	return nil
}

func (f *fakeIPT) Replace(table, chain string, pos int, spec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return err
	}
	if err := f.checkAdd(t, table, chain, spec); err != nil {
		return err
	}
	if pos < 1 || pos > len(t.chains[chain]) {
		return fmt.Errorf("fake iptables: index %d out of range in %s", pos, chain)
	}
	t.chains[chain][pos-1] = slices.Clone(spec)
	f.wrote()
	return nil
}

func (f *fakeIPT) Delete(table, chain string, spec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, err := f.table(table)
	if err != nil {
		return err
	}
	i := f.index(t, chain, spec)
	if i < 0 {
		return fmt.Errorf("fake iptables: Bad rule (does a matching rule exist in that chain?)")
	}
	t.chains[chain] = slices.Delete(t.chains[chain], i, i+1)
	f.wrote()
	return nil
}

func (f *fakeIPT) HasRandomFully() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.randomFully
}

// setPolicy sets a built-in chain's policy, as `iptables -P` (Docker) does.
func (f *fakeIPT) setPolicy(table, chain, policy string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.tables[table].builtin[chain] = policy
}

// rules returns the fake's whole state as Rules, for the packet evaluator
// and for comparisons.
func (f *fakeIPT) rules(ipv6 bool) []Rule {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Rule
	for _, table := range []string{iptNAT, iptFilter} {
		t := f.tables[table]
		names := make([]string, 0, len(t.chains))
		for c := range t.chains {
			names = append(names, c)
		}
		slices.Sort(names)
		for _, c := range names {
			for _, s := range t.chains[c] {
				out = append(out, Rule{IPv6: ipv6, Table: table, Chain: c, Spec: slices.Clone(s)})
			}
		}
	}
	return out
}

// userChains lists the user chains of table.
func (f *fakeIPT) userChains(table string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for c := range f.tables[table].chains {
		if _, ok := f.tables[table].builtin[c]; !ok {
			out = append(out, c)
		}
	}
	slices.Sort(out)
	return out
}

func (f *fakeIPT) policy(table, chain string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.tables[table].builtin[chain]
}

var _ iptablesAPI = (*fakeIPT)(nil)
