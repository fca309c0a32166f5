package firewall

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// These tests run the real nft and iptables (iptables-nft here) in
// throwaway namespaces; they need root and never touch the test process's
// own namespace.

const kernelResync = 400 * time.Millisecond

func TestKernelNFTables(t *testing.T) {
	x := newTestNS(t, "fw-nft")
	a := dualStack()
	f, stop := startFirewall(t, x, Config{Mode: ModeNFTables, IPMasq: true, ForwardRules: true, Resync: kernelResync}, a)
	// Both tables were written with fully-random, which proves the kernel
	// takes it.
	if f.Mode() != ModeNFTables || f.fullyRandom != [2]bool{true, true} || f.randomKnown != [2]bool{true, true} {
		t.Fatalf("mode %s, fully-random %v (known %v)", f.Mode(), f.fullyRandom, f.randomKnown)
	}
	matches := func(t *testing.T, a Addrs) func() bool {
		return func() bool {
			for _, fam := range families() {
				network, subnet := a.of(fam)
				if !reflect.DeepEqual(nftListTable(t, x, fam), wantNFTListing(fam, ruleTable(fam, network, subnet, true, true))) {
					return false
				}
			}
			return true
		}
	}

	t.Run("read back", func(t *testing.T) {
		for _, fam := range families() {
			network, subnet := a.of(fam)
			rules := ruleTable(fam, network, subnet, true, true)
			if got, want := nftListTable(t, x, fam), wantNFTListing(fam, rules); !reflect.DeepEqual(got, want) {
				t.Errorf("nft list table %s %s:\n%q\nwant:\n%q", fam.nft(), Table, got, want)
			}
			if got, ok := nftCommentsIn(t, x, fam); !ok || !got.equal(wantNFTComments(rules)) {
				t.Errorf("knftables ListRules in %s: %q", fam, got)
			}
		}
		// Nothing in iptables: its FORWARD policy is ACCEPT.
		for _, fam := range families() {
			if got := mustIPTLoomState(t, x, fam); len(got) > 0 {
				t.Errorf("%s iptables rules in nftables mode: %q", fam, got)
			}
		}
	})

	t.Run("a rule deleted by hand comes back within one resync", func(t *testing.T) {
		var handle int
		x.do(t, func() error {
			out, err := exec.Command("nft", "-a", "list", "chain", "ip", Table, NFTNATChain).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			for _, l := range strings.Split(string(out), "\n") {
				if strings.Contains(l, "pod to pod") {
					_, err = fmt.Sscanf(l[strings.LastIndex(l, "# handle ")+len("# handle "):], "%d", &handle)
					return err
				}
			}
			return fmt.Errorf("no pod-to-pod rule in\n%s", out)
		})
		x.do(t, func() error {
			return exec.Command("nft", "delete", "rule", "ip", Table, NFTNATChain, "handle", fmt.Sprint(handle)).Run()
		})
		deleted := time.Now()
		if matches(t, a)() {
			t.Fatal("the rule is still there after nft delete rule")
		}
		waitFor(t, 2*kernelResync+time.Second, "rule restored", matches(t, a))
		took := time.Since(deleted)
		t.Logf("restored after %v (resync %v)", took.Round(time.Millisecond), kernelResync)
		if took > kernelResync+time.Second {
			t.Errorf("restored after %v, more than one resync (%v) plus a sync", took, kernelResync)
		}
	})

	t.Run("a flushed table comes back", func(t *testing.T) {
		x.do(t, func() error { return exec.Command("nft", "flush", "table", "ip6", Table).Run() })
		waitFor(t, 2*kernelResync+time.Second, "table restored", matches(t, a))
	})

	t.Run("a changed subnet replaces the old rules", func(t *testing.T) {
		b := a
		b.Subnet = netip.MustParsePrefix("10.244.3.0/24")
		b.IPv6Subnet = netip.MustParsePrefix("fd00:244:0:3::/64")
		f.Set(b)
		waitFor(t, 5*time.Second, "rules for the new subnet", matches(t, b))
		for _, fam := range families() {
			for _, lines := range nftListTable(t, x, fam) {
				for _, l := range lines {
					if strings.Contains(l, "10.244.1.0/24") || strings.Contains(l, "fd00:244:0:1::/64") {
						t.Errorf("old subnet left: %s", l)
					}
				}
			}
		}
	})

	t.Run("rules stay when Run stops; Cleanup removes them", func(t *testing.T) {
		stop()
		if nftListTable(t, x, ipv4) == nil {
			t.Fatal("the table went away when Run stopped")
		}
		checkCleanup(t, x)
	})
}

func TestKernelIPTables(t *testing.T) {
	x := newTestNS(t, "fw-ipt")
	a := dualStack()
	f, stop := startFirewall(t, x, Config{Mode: ModeIPTables, IPMasq: true, ForwardRules: true, Resync: kernelResync}, a)
	if f.Mode() != ModeIPTables || !f.fullyRandom[ipv4] {
		t.Fatalf("mode %s, fully-random %v", f.Mode(), f.fullyRandom)
	}
	want := func(a Addrs) [2][]string {
		_, rs := Render(ModeIPTables, a, true, true)
		return [2][]string{wantIPTState(rs, ipv4), wantIPTState(rs, ipv6)}
	}
	matches := func(a Addrs) func() bool {
		return func() bool {
			w := want(a)
			for _, fam := range families() {
				got, err := iptLoomState(x, fam)
				if err != nil || !slices.Equal(got, w[fam]) {
					return false
				}
			}
			return true
		}
	}

	t.Run("read back", func(t *testing.T) {
		w := want(a)
		for _, fam := range families() {
			if got := mustIPTLoomState(t, x, fam); !slices.Equal(got, w[fam]) {
				t.Errorf("%s read back:\n%s\nwant:\n%s", fam, strings.Join(got, "\n"), strings.Join(w[fam], "\n"))
			}
		}
		// The exact text iptables prints, comments quoted.
		save := strings.Join(iptSave(t, x, ipv4, iptNAT), "\n")
		for _, line := range []string{
			`-A POSTROUTING -m comment --comment "loom masquerade" -j LOOM-POSTRTG`,
			`-A LOOM-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "pods 10.244.0.0/16 to outside: masquerade" -j MASQUERADE --random-fully`,
		} {
			if !strings.Contains(save, line) {
				t.Errorf("iptables -t nat -S lacks %s:\n%s", line, save)
			}
		}
		for _, fam := range families() {
			if nftListTable(t, x, fam) != nil {
				t.Errorf("iptables mode made an nftables table loom")
			}
		}
	})

	t.Run("a rule deleted by hand comes back within one resync", func(t *testing.T) {
		network, subnet := a.of(ipv4)
		spec := iptSpec(ruleTable(ipv4, network, subnet, true, true)[1], true)
		x.do(t, func() error {
			ipt, err := openIPT(ipv4)
			if err != nil {
				return err
			}
			return ipt.Delete(iptNAT, IPTNATChain, spec...)
		})
		deleted := time.Now()
		if matches(a)() {
			t.Fatal("the rule is still there after iptables -D")
		}
		waitFor(t, 2*kernelResync+time.Second, "rule restored", matches(a))
		took := time.Since(deleted)
		t.Logf("restored after %v (resync %v)", took.Round(time.Millisecond), kernelResync)
		if took > kernelResync+time.Second {
			t.Errorf("restored after %v, more than one resync (%v) plus a sync", took, kernelResync)
		}
	})

	t.Run("a deleted jump comes back", func(t *testing.T) {
		x.do(t, func() error {
			ipt, err := openIPT(ipv6)
			if err != nil {
				return err
			}
			return ipt.Delete(iptFilter, iptForward, iptChains()[1].jump(IPTForwardChain)...)
		})
		waitFor(t, 2*kernelResync+time.Second, "jump restored", matches(a))
	})

	t.Run("a changed subnet replaces the old rules", func(t *testing.T) {
		b := a
		b.Subnet = netip.MustParsePrefix("10.244.3.0/24")
		b.IPv6Subnet = netip.MustParsePrefix("fd00:244:0:3::/64")
		f.Set(b)
		waitFor(t, 5*time.Second, "rules for the new subnet", matches(b))
		for _, fam := range families() {
			for _, table := range []string{iptNAT, iptFilter} {
				for _, l := range iptSave(t, x, fam, table) {
					if strings.Contains(l, "10.244.1.0/24") || strings.Contains(l, "fd00:244:0:1::/64") || strings.Contains(l, "-NEW") {
						t.Errorf("left after the change: %s", l)
					}
				}
			}
		}
	})

	t.Run("rules stay when Run stops; Cleanup removes them", func(t *testing.T) {
		stop()
		if len(mustIPTLoomState(t, x, ipv4)) == 0 {
			t.Fatal("the rules went away when Run stopped")
		}
		checkCleanup(t, x)
	})
}

// TestKernelAutoForwardDrop: with iptables' FORWARD policy DROP (as Docker
// sets it), auto mode adds LOOM-FWD to iptables beside the nftables table.
func TestKernelAutoForwardDrop(t *testing.T) {
	x := newTestNS(t, "fw-drop")
	setForwardPolicy(t, x, "DROP")
	a := dualStack()
	f, stop := startFirewall(t, x, Config{Mode: ModeAuto, IPMasq: true, ForwardRules: true, Resync: kernelResync}, a)
	if f.Mode() != ModeNFTables {
		t.Fatalf("auto picked %s", f.Mode())
	}
	_, fwd := Render(ModeAuto, a, true, true)
	for _, fam := range families() {
		if got, want := mustIPTLoomState(t, x, fam), wantIPTState(fwd, fam); !slices.Equal(got, want) {
			t.Errorf("%s iptables with FORWARD DROP:\n%s\nwant:\n%s", fam, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		network, subnet := a.of(fam)
		if got, want := nftListTable(t, x, fam), wantNFTListing(fam, ruleTable(fam, network, subnet, true, true)); !reflect.DeepEqual(got, want) {
			t.Errorf("%s nftables table:\n%q\nwant:\n%q", fam, got, want)
		}
	}
	// Back to ACCEPT: the iptables accept goes.
	setForwardPolicy(t, x, "ACCEPT")
	waitFor(t, 2*kernelResync+time.Second, "LOOM-FWD removed", func() bool {
		v4, err4 := iptLoomState(x, ipv4)
		v6, err6 := iptLoomState(x, ipv6)
		return err4 == nil && err6 == nil && len(v4) == 0 && len(v6) == 0
	})
	setForwardPolicy(t, x, "DROP")
	waitFor(t, 2*kernelResync+time.Second, "LOOM-FWD back", func() bool {
		got, err := iptLoomState(x, ipv4)
		return err == nil && slices.Equal(got, wantIPTState(fwd, ipv4))
	})
	stop()
	checkCleanup(t, x)
}

func setForwardPolicy(t *testing.T, x *testNS, policy string) {
	t.Helper()
	x.do(t, func() error {
		for _, fam := range families() {
			ipt, err := openIPT(fam)
			if err != nil {
				return err
			}
			if err := ipt.ChangePolicy(iptFilter, iptForward, policy); err != nil {
				return err
			}
		}
		return nil
	})
}

// checkCleanup runs Cleanup twice in x and checks that nothing of loom's is
// left in nftables or iptables, of either family.
func checkCleanup(t *testing.T, x *testNS) {
	t.Helper()
	for i := range 2 {
		if err := Cleanup(context.Background(), Config{NetNSPath: x.ns.Path()}); err != nil {
			t.Fatalf("Cleanup #%d: %v", i+1, err)
		}
		var ruleset []byte
		x.do(t, func() error {
			var err error
			ruleset, err = exec.Command("nft", "list", "ruleset").CombinedOutput()
			return err
		})
		if strings.Contains(string(ruleset), "table ip loom") || strings.Contains(string(ruleset), "table ip6 loom") || strings.Contains(string(ruleset), "LOOM-") {
			t.Fatalf("after Cleanup #%d:\n%s", i+1, ruleset)
		}
		for _, fam := range families() {
			for _, table := range []string{iptNAT, iptFilter} {
				for _, l := range iptSave(t, x, fam, table) {
					if strings.Contains(l, "LOOM-") || strings.Contains(l, "loom") {
						t.Fatalf("after Cleanup #%d, %s %s: %s", i+1, fam, table, l)
					}
				}
			}
		}
	}
}

// TestKernelReadOnlyCallsCreateNothing: New (which probes nft and iptables)
// and Cleanup in a namespace loom never used leave its ruleset empty: they
// create no table, not even iptables-nft's empty nat and filter tables.
func TestKernelReadOnlyCallsCreateNothing(t *testing.T) {
	x := newTestNS(t, "fw-fresh")
	for _, mode := range []Mode{ModeAuto, ModeNFTables, ModeIPTables} {
		if _, err := New(Config{Mode: mode, IPMasq: true, ForwardRules: true, NetNSPath: x.ns.Path(), Logger: testLogger(t)}); err != nil {
			t.Fatalf("New(%s): %v", mode, err)
		}
	}
	for range 2 {
		if err := Cleanup(context.Background(), Config{NetNSPath: x.ns.Path()}); err != nil {
			t.Fatalf("Cleanup: %v", err)
		}
	}
	var ruleset []byte
	x.do(t, func() error {
		var err error
		ruleset, err = exec.Command("nft", "list", "ruleset").CombinedOutput()
		return err
	})
	if len(strings.TrimSpace(string(ruleset))) > 0 {
		t.Fatalf("ruleset after New and Cleanup in a fresh namespace:\n%s", ruleset)
	}
}
