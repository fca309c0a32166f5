package firewall

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"sigs.k8s.io/knftables"
)

// fakes holds one fake nftables and one fake iptables per family; they are
// what New opens through the Config hooks.
type fakes struct {
	nft     [2]*knftables.Fake
	ipt     [2]*fakeIPT
	nftErr  error // returned instead of the fake nftables when set
	iptErr  error
	logs    *syncBuffer
	metrics *prometheus.Registry
}

func newFakes() *fakes {
	fk := &fakes{logs: &syncBuffer{}, metrics: prometheus.NewRegistry()}
	for _, fam := range families() {
		fk.nft[fam] = knftables.NewFake(fam.nft(), Table)
		fk.ipt[fam] = newFakeIPT()
	}
	return fk
}

// config returns a Config that opens the fakes.
func (fk *fakes) config(mode Mode, ipMasq, forward bool) Config {
	return Config{
		Mode: mode, IPMasq: ipMasq, ForwardRules: forward,
		Logger:  slog.New(slog.NewTextHandler(fk.logs, nil)),
		Metrics: fk.metrics,
		newNFT: func(fam family) (knftables.Interface, error) {
			if fk.nftErr != nil {
				return nil, fk.nftErr
			}
			return fk.nft[fam], nil
		},
		newIPT: func(fam family) (iptablesAPI, error) {
			if fk.iptErr != nil {
				return nil, fk.iptErr
			}
			return fk.ipt[fam], nil
		},
	}
}

type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func mustNew(t *testing.T, cfg Config) *Firewall {
	t.Helper()
	f, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return f
}

// syncNow runs one sync as Run would and fails t on error.
func syncNow(t *testing.T, f *Firewall) {
	t.Helper()
	ran, err := f.syncAndRecord(context.Background())
	if err != nil || !ran {
		t.Fatalf("sync: ran=%v err=%v", ran, err)
	}
}

// nftState is what a family's fake table holds, as Render spells it.
func nftState(fk *fakes, fam family) string {
	fake := fk.nft[fam]
	fake.RLock()
	defer fake.RUnlock()
	if fake.Table == nil {
		return ""
	}
	return fake.Dump()
}

func wantNFT(a Addrs, fam family, ipMasq, forward bool) string {
	network, subnet := a.of(fam)
	return renderNFT(fam, ruleTable(fam, network, subnet, ipMasq, forward), true)
}

// iptState renders the fake's rules in loom's chains and the jumps to them.
func iptState(fk *fakes, fam family) string {
	var lines []string
	for _, r := range fk.ipt[fam].rules(fam == ipv6) {
		if strings.HasPrefix(r.Chain, "LOOM-") || strings.Contains(strings.Join(r.Spec, " "), "-j LOOM-") {
			lines = append(lines, r.String())
		}
	}
	return strings.Join(lines, "\n")
}

func wantIPT(a Addrs, fam family, ipMasq, forward bool, hooks ...hook) string {
	network, subnet := a.of(fam)
	var lines []string
	// Same order as iptState: table nat then filter, chains by name.
	rs := renderIPT(fam, ruleTable(fam, network, subnet, ipMasq, forward), true, hooks...)
	for _, table := range []string{iptNAT, iptFilter} {
		for _, chain := range []string{iptForward, IPTForwardChain, IPTNATChain, iptPostrouting} {
			for _, r := range rs {
				if r.Table == table && r.Chain == chain {
					lines = append(lines, r.String())
				}
			}
		}
	}
	return strings.Join(lines, "\n")
}

func TestNFTablesModeSyncRepairAndChange(t *testing.T) {
	fk := newFakes()
	f := mustNew(t, fk.config(ModeNFTables, true, true))
	if f.Mode() != ModeNFTables {
		t.Fatalf("Mode = %s", f.Mode())
	}
	if ran, _ := f.syncOnce(context.Background()); ran {
		t.Fatal("a sync ran before Set")
	}
	a := dualStack()
	f.Set(a)
	syncNow(t, f)
	for _, fam := range families() {
		if got, want := nftState(fk, fam), wantNFT(a, fam, true, true); got != want {
			t.Fatalf("%s table after the first sync:\n%s\nwant:\n%s", fam, got, want)
		}
	}
	// iptables' FORWARD policy is ACCEPT: nothing in iptables.
	for _, fam := range families() {
		if got := iptState(fk, fam); got != "" {
			t.Fatalf("%s iptables rules with FORWARD policy ACCEPT:\n%s", fam, got)
		}
	}

	// A steady-state sync only reads.
	last := fk.nft[ipv4].LastTransaction
	syncNow(t, f)
	if fk.nft[ipv4].LastTransaction != last {
		t.Fatalf("a sync with nothing to change wrote:\n%s", fk.nft[ipv4].LastTransaction)
	}

	// A rule deleted by hand comes back.
	rules, err := fk.nft[ipv4].ListRules(context.Background(), NFTNATChain)
	if err != nil {
		t.Fatal(err)
	}
	tx := fk.nft[ipv4].NewTransaction()
	tx.Delete(&knftables.Rule{Chain: NFTNATChain, Handle: rules[1].Handle})
	if err := fk.nft[ipv4].Run(context.Background(), tx); err != nil {
		t.Fatal(err)
	}
	syncNow(t, f)
	if got, want := nftState(fk, ipv4), wantNFT(a, ipv4, true, true); got != want {
		t.Fatalf("after deleting a rule by hand and a sync:\n%s\nwant:\n%s", got, want)
	}
	// So does a deleted table.
	tx = fk.nft[ipv6].NewTransaction()
	tx.Delete(&knftables.Table{})
	if err := fk.nft[ipv6].Run(context.Background(), tx); err != nil {
		t.Fatal(err)
	}
	syncNow(t, f)
	if got, want := nftState(fk, ipv6), wantNFT(a, ipv6, true, true); got != want {
		t.Fatalf("after deleting the table by hand and a sync:\n%s\nwant:\n%s", got, want)
	}

	// A new subnet replaces the table in one transaction: the old rules go.
	b := a
	b.Subnet = netip.MustParsePrefix("10.244.3.0/24")
	f.Set(b)
	syncNow(t, f)
	got := nftState(fk, ipv4)
	if want := wantNFT(b, ipv4, true, true); got != want {
		t.Fatalf("after Set with a new subnet:\n%s\nwant:\n%s", got, want)
	}
	if strings.Contains(got, "10.244.1.0/24") {
		t.Fatalf("old subnet still in the table:\n%s", got)
	}
	if tx := fk.nft[ipv4].LastTransaction.String(); !strings.HasPrefix(tx, "add table ip loom\ndelete table ip loom\nadd table ip loom") {
		t.Fatalf("the change is not one whole-table replacement:\n%s", tx)
	}

	// Going single stack removes the IPv6 table.
	f.Set(v4Only())
	syncNow(t, f)
	if got := nftState(fk, ipv6); got != "" {
		t.Fatalf("IPv6 table left after going IPv4-only:\n%s", got)
	}
	if !strings.Contains(fk.logs.String(), "firewall rules removed") {
		t.Errorf("removal not logged:\n%s", fk.logs)
	}
	if n := metricValue(t, f.metrics.syncs.WithLabelValues("ok")); n != 6 {
		t.Errorf("%s{result=ok} = %v, want 6", metricSyncs, n)
	}
	if n := metricValue(t, f.metrics.mode.WithLabelValues("nftables")); n != 1 {
		t.Errorf("%s{mode=nftables} = %v, want 1", metricMode, n)
	}
}

func TestIPTablesModeSyncRepairAndChange(t *testing.T) {
	fk := newFakes()
	f := mustNew(t, fk.config(ModeIPTables, true, true))
	a := dualStack()
	f.Set(a)
	syncNow(t, f)
	check := func(when string, a Addrs) {
		t.Helper()
		for _, fam := range families() {
			if got, want := iptState(fk, fam), wantIPT(a, fam, true, true, hookNAT, hookForward); got != want {
				t.Fatalf("%s %s:\n%s\nwant:\n%s", when, fam, got, want)
			}
		}
	}
	check("after the first sync", a)
	for _, fam := range families() {
		if nftState(fk, fam) != "" {
			t.Fatalf("iptables mode wrote an nftables table")
		}
	}

	writes := fk.ipt[ipv4].writes
	syncNow(t, f)
	if fk.ipt[ipv4].writes != writes {
		t.Fatalf("a sync with nothing to change wrote %d times", fk.ipt[ipv4].writes-writes)
	}

	// Hand edits come back: a deleted rule, a deleted jump, a foreign rule
	// appended to loom's chain.
	network, subnet := a.of(ipv4)
	podToPod := iptSpec(ruleTable(ipv4, network, subnet, true, true)[1], true)
	if err := fk.ipt[ipv4].Delete(iptNAT, IPTNATChain, podToPod...); err != nil {
		t.Fatal(err)
	}
	if err := fk.ipt[ipv6].Delete(iptFilter, iptForward, iptChains()[1].jump(IPTForwardChain)...); err != nil {
		t.Fatal(err)
	}
	if err := fk.ipt[ipv4].Append(iptFilter, IPTForwardChain, "-j", "DROP"); err != nil {
		t.Fatal(err)
	}
	syncNow(t, f)
	check("after hand edits and a sync", a)

	// A new subnet: every intermediate state of the swap gives each packet
	// either the old verdict or the new one, never a third.
	b := a
	b.Subnet = netip.MustParsePrefix("10.244.3.0/24")
	oldRules, newRules := ruleTable(ipv4, a.Network, a.Subnet, true, true), ruleTable(ipv4, b.Network, b.Subnet, true, true)
	probes := []packet{
		{src: netip.MustParseAddr("198.18.0.11"), dst: netip.MustParseAddr("10.244.1.5")}, // local before, remote after
		{src: netip.MustParseAddr("198.18.0.11"), dst: netip.MustParseAddr("10.244.3.5")}, // remote before, local after
		{src: netip.MustParseAddr("10.244.1.2"), dst: netip.MustParseAddr("203.0.113.10")},
		{src: netip.MustParseAddr("10.244.1.2"), dst: netip.MustParseAddr("10.244.2.3")},
	}
	steps := 0
	fk.ipt[ipv4].observe = func() {
		steps++
		for _, p := range probes {
			got, _ := evalIPT(t, fk.ipt[ipv4].rules(false), ipv4, p, "ACCEPT")
			if was, will := evalModel(oldRules, p), evalModel(newRules, p); got != was && got != will {
				t.Errorf("step %d: %v -> %v gets %+v, neither the old %+v nor the new %+v\n%s",
					steps, p.src, p.dst, got, was, will, iptState(fk, ipv4))
			}
		}
	}
	f.Set(b)
	syncNow(t, f)
	fk.ipt[ipv4].observe = nil
	check("after Set with a new subnet", b)
	if steps == 0 {
		t.Fatal("the swap made no writes")
	}
	if got := fk.ipt[ipv4].userChains(iptNAT); strings.Join(got, ",") != IPTNATChain {
		t.Fatalf("nat user chains after the swap: %v, want only %s", got, IPTNATChain)
	}
}

func TestIPTablesModeWithoutRandomFully(t *testing.T) {
	fk := newFakes()
	for _, fam := range families() {
		fk.ipt[fam].randomFully = false
	}
	f := mustNew(t, fk.config(ModeIPTables, true, false))
	f.Set(v4Only())
	syncNow(t, f)
	state := iptState(fk, ipv4)
	if strings.Contains(state, "--random-fully") || !strings.Contains(state, "-j MASQUERADE") {
		t.Fatalf("without --random-fully support:\n%s", state)
	}
	if !strings.Contains(fk.logs.String(), "without fully-random") {
		t.Errorf("the fallback is not logged:\n%s", fk.logs)
	}
}

// noFullyRandomNFT is a fake nftables on a kernel that refuses
// "masquerade fully-random", as nft there does: the whole transaction
// fails.
type noFullyRandomNFT struct {
	*knftables.Fake
	refused int // transactions refused so far
}

func (n *noFullyRandomNFT) refuse(tx *knftables.Transaction) error {
	if strings.Contains(tx.String(), "fully-random") {
		n.refused++
		return errors.New("Error: Could not process rule: Operation not supported")
	}
	return nil
}

func (n *noFullyRandomNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	if err := n.refuse(tx); err != nil {
		return err
	}
	return n.Fake.Run(ctx, tx)
}

func (n *noFullyRandomNFT) Check(ctx context.Context, tx *knftables.Transaction) error {
	if err := n.refuse(tx); err != nil {
		return err
	}
	return n.Fake.Check(ctx, tx)
}

// In nftables mode the first write tries fully-random; where the kernel
// refuses it, the table is written with plain masquerade in the same sync,
// the fallback is logged, and later writes do not try again.
func TestNFTablesModeWithoutFullyRandom(t *testing.T) {
	fk := newFakes()
	nft := &noFullyRandomNFT{Fake: fk.nft[ipv4]}
	cfg := fk.config(ModeNFTables, true, true)
	cfg.newNFT = func(fam family) (knftables.Interface, error) {
		if fam == ipv4 {
			return nft, nil
		}
		return fk.nft[fam], nil
	}
	f := mustNew(t, cfg)
	a := v4Only()
	f.Set(a)
	syncNow(t, f)
	if !f.Ready() {
		t.Fatal("not Ready after the fallback")
	}
	got := nftState(fk, ipv4)
	if want := renderNFT(ipv4, ruleTable(ipv4, a.Network, a.Subnet, true, true), false); got != want {
		t.Fatalf("table without fully-random support:\n%s\nwant:\n%s", got, want)
	}
	if !strings.Contains(fk.logs.String(), "without fully-random") {
		t.Errorf("the fallback is not logged:\n%s", fk.logs)
	}
	refused := nft.refused
	b := a
	b.Subnet = netip.MustParsePrefix("10.244.9.0/24")
	f.Set(b)
	syncNow(t, f)
	if nft.refused != refused {
		t.Errorf("fully-random tried again after it was refused (%d refusals, then %d)", refused, nft.refused)
	}
	if got, want := nftState(fk, ipv4), renderNFT(ipv4, ruleTable(ipv4, b.Network, b.Subnet, true, true), false); got != want {
		t.Fatalf("table after a new subnet:\n%s\nwant:\n%s", got, want)
	}
}

// TestForwardDropAddsIPTablesAccept: in nftables and auto mode, Docker's
// FORWARD policy DROP gets LOOM-FWD in iptables, and it goes again when the
// policy is back to ACCEPT.
func TestForwardDropAddsIPTablesAccept(t *testing.T) {
	for _, mode := range []Mode{ModeNFTables, ModeAuto} {
		t.Run(string(mode), func(t *testing.T) {
			fk := newFakes()
			for _, fam := range families() {
				fk.ipt[fam].setPolicy(iptFilter, iptForward, "DROP")
			}
			f := mustNew(t, fk.config(mode, true, true))
			a := dualStack()
			f.Set(a)
			syncNow(t, f)
			for _, fam := range families() {
				if got, want := iptState(fk, fam), wantIPT(a, fam, true, true, hookForward); got != want {
					t.Fatalf("%s with FORWARD policy DROP:\n%s\nwant:\n%s", fam, got, want)
				}
				if got, want := nftState(fk, fam), wantNFT(a, fam, true, true); got != want {
					t.Fatalf("%s nftables table:\n%s\nwant:\n%s", fam, got, want)
				}
				// The combination forwards pod traffic.
				p := packet{src: netip.MustParseAddr("10.244.1.2"), dst: netip.MustParseAddr("203.0.113.10")}
				if fam == ipv6 {
					p = packet{src: netip.MustParseAddr("fd00:244:0:1::2"), dst: netip.MustParseAddr("2001:db8:113::10")}
				}
				if _, fwd := evalIPT(t, fk.ipt[fam].rules(fam == ipv6), fam, p, fk.ipt[fam].policy(iptFilter, iptForward)); !fwd {
					t.Fatalf("%s: iptables still drops pod traffic", fam)
				}
			}
			if !strings.Contains(fk.logs.String(), "FORWARD policy changed") {
				t.Errorf("not logged:\n%s", fk.logs)
			}
			// A hand-deleted jump comes back.
			if err := fk.ipt[ipv4].Delete(iptFilter, iptForward, iptChains()[1].jump(IPTForwardChain)...); err != nil {
				t.Fatal(err)
			}
			syncNow(t, f)
			if got, want := iptState(fk, ipv4), wantIPT(a, ipv4, true, true, hookForward); got != want {
				t.Fatalf("jump not restored:\n%s\nwant:\n%s", got, want)
			}
			// Policy back to ACCEPT: LOOM-FWD is not needed any more.
			for _, fam := range families() {
				fk.ipt[fam].setPolicy(iptFilter, iptForward, "ACCEPT")
			}
			syncNow(t, f)
			for _, fam := range families() {
				if got := iptState(fk, fam); got != "" {
					t.Fatalf("%s: LOOM-FWD left with policy ACCEPT:\n%s", fam, got)
				}
			}
		})
	}
}

func TestModeSelection(t *testing.T) {
	notFound := fmt.Errorf("could not find nftables binary: %w", errExecNotFound())
	tests := []struct {
		name           string
		mode           Mode
		nftErr, iptErr error
		want           Mode
		wantErr        string
	}{
		{name: "auto prefers nftables", mode: ModeAuto, want: ModeNFTables},
		{name: "empty is auto", mode: "", want: ModeNFTables},
		{name: "auto falls back to iptables", mode: ModeAuto, nftErr: notFound, want: ModeIPTables},
		{name: "auto with neither", mode: ModeAuto, nftErr: notFound, iptErr: errors.New("no iptables"), wantErr: "neither nftables"},
		{name: "nftables required", mode: ModeNFTables, nftErr: notFound, wantErr: "firewall mode nftables: nftables is not usable"},
		{name: "nftables without iptables", mode: ModeNFTables, iptErr: errors.New("no iptables"), want: ModeNFTables},
		{name: "iptables required", mode: ModeIPTables, iptErr: errors.New("no iptables"), wantErr: "firewall mode iptables: iptables is not usable"},
		{name: "unknown mode", mode: "ipfw", wantErr: `firewall mode "ipfw" is not valid`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fk := newFakes()
			fk.nftErr, fk.iptErr = tt.nftErr, tt.iptErr
			f, err := New(fk.config(tt.mode, true, true))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("New: %v, want an error containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if f.Mode() != tt.want {
				t.Fatalf("Mode = %s, want %s", f.Mode(), tt.want)
			}
			// Whatever was picked, a sync works with what is there.
			f.Set(v4Only())
			syncNow(t, f)
		})
	}
}

// TestSwitchingModesRemovesTheOtherBackend: the first sync removes what the
// other backend left behind (an agent restarted with another mode).
func TestSwitchingModesRemovesTheOtherBackend(t *testing.T) {
	fk := newFakes()
	a := v4Only()
	old := mustNew(t, fk.config(ModeIPTables, true, true))
	old.Set(a)
	syncNow(t, old)
	if iptState(fk, ipv4) == "" {
		t.Fatal("iptables mode installed nothing")
	}
	f := mustNew(t, func() Config {
		c := fk.config(ModeNFTables, true, true)
		c.Metrics = nil // the first Firewall holds the registry's names
		return c
	}())
	f.Set(a)
	syncNow(t, f)
	if got := iptState(fk, ipv4); got != "" {
		t.Fatalf("iptables leftovers after switching to nftables:\n%s", got)
	}
	back := mustNew(t, func() Config {
		c := fk.config(ModeIPTables, true, true)
		c.Metrics = nil
		return c
	}())
	back.Set(a)
	syncNow(t, back)
	if got := nftState(fk, ipv4); got != "" {
		t.Fatalf("nftables leftovers after switching to iptables:\n%s", got)
	}
}

func TestCleanupFake(t *testing.T) {
	fk := newFakes()
	for _, fam := range families() {
		fk.ipt[fam].setPolicy(iptFilter, iptForward, "DROP")
	}
	f := mustNew(t, fk.config(ModeNFTables, true, true))
	f.Set(dualStack())
	syncNow(t, f)
	// Leftovers of iptables mode too, and of an interrupted swap.
	for _, fam := range families() {
		ipt := fk.ipt[fam]
		c := iptChains()[0]
		if err := fillIPTChain(ipt, c.table, c.name, [][]string{{"-j", "RETURN"}}); err != nil {
			t.Fatal(err)
		}
		if err := fillIPTChain(ipt, c.table, c.staging, [][]string{{"-j", "RETURN"}}); err != nil {
			t.Fatal(err)
		}
		if err := ipt.Insert(c.table, c.parent, 1, c.jump(c.staging)...); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if err := Cleanup(context.Background(), fk.config(ModeAuto, false, false)); err != nil {
			t.Fatalf("Cleanup: %v", err)
		}
		for _, fam := range families() {
			if got := nftState(fk, fam); got != "" {
				t.Fatalf("%s nftables after Cleanup:\n%s", fam, got)
			}
			if got := iptState(fk, fam); got != "" {
				t.Fatalf("%s iptables after Cleanup:\n%s", fam, got)
			}
			for _, table := range []string{iptNAT, iptFilter} {
				if got := fk.ipt[fam].userChains(table); len(got) > 0 {
					t.Fatalf("%s %s chains after Cleanup: %v", fam, table, got)
				}
			}
		}
	}
	// No tools at all: nothing can have been installed.
	fk.nftErr = fmt.Errorf("could not find nftables binary: %w", errExecNotFound())
	fk.iptErr = fmt.Errorf("iptables: %w", errExecNotFound())
	if err := Cleanup(context.Background(), fk.config(ModeAuto, false, false)); err != nil {
		t.Fatalf("Cleanup without tools: %v", err)
	}
}

// TestRunLifecycle: Run does nothing before Set, syncs at once after Set,
// repairs within one Resync, and leaves the rules when its context ends.
func TestRunLifecycle(t *testing.T) {
	fk := newFakes()
	cfg := fk.config(ModeNFTables, true, true)
	cfg.Resync = 50 * time.Millisecond
	f := mustNew(t, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()

	time.Sleep(3 * cfg.Resync)
	if f.Ready() || nftState(fk, ipv4) != "" {
		t.Fatal("Run acted before Set")
	}
	a := v4Only()
	f.Set(a)
	waitFor(t, time.Second, "Ready after Set", f.Ready)
	if got, want := nftState(fk, ipv4), wantNFT(a, ipv4, true, true); got != want {
		t.Fatalf("table:\n%s\nwant:\n%s", got, want)
	}
	tx := fk.nft[ipv4].NewTransaction()
	tx.Flush(&knftables.Chain{Name: NFTNATChain})
	if err := fk.nft[ipv4].Run(context.Background(), tx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*cfg.Resync, "flushed chain restored", func() bool {
		return nftState(fk, ipv4) == wantNFT(a, ipv4, true, true)
	})
	// Bad addresses: not ready, and the rules stay as they were.
	f.Set(Addrs{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.224.0.0/24")})
	waitFor(t, time.Second, "not Ready with a subnet outside the network", func() bool { return !f.Ready() })
	if got, want := nftState(fk, ipv4), wantNFT(a, ipv4, true, true); got != want {
		t.Fatalf("rules changed on invalid addresses:\n%s", got)
	}
	if !strings.Contains(fk.logs.String(), "not inside Network") {
		t.Errorf("the invalid addresses are not logged:\n%s", fk.logs)
	}
	f.Set(a)
	waitFor(t, time.Second, "Ready again", f.Ready)

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	if got, want := nftState(fk, ipv4), wantNFT(a, ipv4, true, true); got != want {
		t.Fatalf("rules changed when Run stopped:\n%s", got)
	}
}

func metricValue(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

func errExecNotFound() error { return &exec.Error{Name: "nft", Err: exec.ErrNotFound} }

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
