package agent

// The firewall is set up beside the lease claim and the data path, not
// before them: these tests check the hand-over of the lease's addresses
// to a firewall that is set up before or after the lease arrives, and what
// /readyz says meanwhile. The rules are the real nft's, in a throwaway
// namespace (loomt-agfw-*); the test process's own namespace is never
// touched.
//
// Address plan: pod network 10.244.0.0/16, node subnets 10.244.N.0/24.

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/loomnet/loom/internal/firewall"
	"github.com/loomnet/loom/internal/testnet"
)

func subnetAddrs(n int) firewall.Addrs {
	return firewall.Addrs{
		Network: netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:  netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", n)),
	}
}

// nftTable is `nft list table ip loom` in netns, "" when there is none.
func nftTable(t *testing.T, netns ns.NetNS) string {
	t.Helper()
	var out []byte
	err := netns.Do(func(ns.NetNS) error {
		var err error
		out, err = exec.Command("nft", "list", "table", "ip", firewall.Table).CombinedOutput()
		return err
	})
	if err != nil {
		return ""
	}
	return string(out)
}

// startFirewall runs a.runFirewall in netns until the test ends.
func startFirewall(t *testing.T, a *agent, netns ns.NetNS) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- a.runFirewall(ctx, firewall.Config{
			Mode: firewall.ModeNFTables, IPMasq: true, ForwardRules: true,
			Resync: time.Second, NetNSPath: netns.Path(), Logger: a.log,
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("runFirewall after its context ended: %v, want nil", err)
		}
	})
}

// waitFirewall waits until the readiness check passes and the table is
// about subnet.
func waitFirewall(t *testing.T, a *agent, netns ns.NetNS, subnet netip.Prefix) {
	t.Helper()
	var err error
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if err = a.firewallReady(); err == nil && strings.Contains(nftTable(t, netns), subnet.String()) {
			return
		}
	}
	t.Fatalf("firewall not ready with rules for %s: readiness %v; table:\n%s", subnet, err, nftTable(t, netns))
}

func TestFirewallTakesTheLease(t *testing.T) {
	t.Run("lease before the firewall is set up", func(t *testing.T) {
		netns := testnet.NewNS(t, "agfw")
		a := &agent{log: slog.New(slog.NewTextHandler(t.Output(), nil))}
		if err := a.firewallReady(); err == nil || !strings.Contains(err.Error(), "no subnet lease") {
			t.Fatalf("readiness before the lease: %v", err)
		}
		a.setFirewallAddrs(subnetAddrs(1))
		if err := a.firewallReady(); err == nil || !strings.Contains(err.Error(), "probing nftables and iptables") {
			t.Fatalf("readiness while the firewall is set up: %v", err)
		}
		if got := nftTable(t, netns); got != "" {
			t.Fatalf("rules before the firewall was set up:\n%s", got)
		}
		startFirewall(t, a, netns)
		waitFirewall(t, a, netns, subnetAddrs(1).Subnet)

		// A new lease (the old one was lost and another subnet came) is
		// the firewall's at once.
		a.setFirewallAddrs(subnetAddrs(2))
		waitFirewall(t, a, netns, subnetAddrs(2).Subnet)
		if got := nftTable(t, netns); strings.Contains(got, subnetAddrs(1).Subnet.String()) {
			t.Fatalf("rules of the old lease left:\n%s", got)
		}
	})

	// Leases handed over while the firewall is being set up: whichever
	// order the hand-over and the set-up take, the last lease wins.
	t.Run("leases during the set-up", func(t *testing.T) {
		netns := testnet.NewNS(t, "agfw")
		a := &agent{log: slog.New(slog.NewTextHandler(t.Output(), nil))}
		startFirewall(t, a, netns)
		const last = 40
		for n := 1; n <= last; n++ {
			a.setFirewallAddrs(subnetAddrs(n))
			time.Sleep(2 * time.Millisecond)
		}
		waitFirewall(t, a, netns, subnetAddrs(last).Subnet)
	})
}

// A firewall that cannot be set up is an error of runFirewall, which Run
// stops the agent with, and /readyz never turns green for it.
func TestFirewallSetUpError(t *testing.T) {
	a := &agent{log: slog.New(slog.DiscardHandler)}
	a.setFirewallAddrs(subnetAddrs(1))
	err := a.runFirewall(context.Background(), firewall.Config{Mode: "pf"})
	if err == nil || !strings.Contains(err.Error(), `"pf"`) {
		t.Fatalf("runFirewall with mode pf: %v, want an error naming the mode", err)
	}
	if err := a.firewallReady(); err == nil {
		t.Fatal("firewall ready although it could not be set up")
	}
}
