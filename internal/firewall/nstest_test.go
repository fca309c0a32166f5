package firewall

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/coreos/go-iptables/iptables"
	"github.com/loomnet/loom/internal/testnet"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"sigs.k8s.io/knftables"
)

// testNS is a throwaway namespace (testnet.NewNS) for kernel tests: lo up,
// IPv6 duplicate address detection off. Every rule, link and address the
// tests make lives in such namespaces.
type testNS struct {
	ns   ns.NetNS
	h    *netlink.Handle
	name string // under /run/netns
}

func newTestNS(t *testing.T, tag string) *testNS {
	t.Helper()
	n := testnet.NewNS(t, tag)
	h, err := netlink.NewHandleAt(vnetns.NsHandle(n.Fd()))
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", n.Path(), err)
	}
	t.Cleanup(h.Close)
	x := &testNS{ns: n, h: h, name: filepath.Base(n.Path())}
	x.sysctl(t, "net/ipv6/conf/all/accept_dad", "0")
	x.sysctl(t, "net/ipv6/conf/default/accept_dad", "0")
	x.up(t, "lo")
	return x
}

// do runs fn on a thread inside the namespace (and so do the nft and
// iptables it execs).
func (x *testNS) do(t *testing.T, fn func() error) {
	t.Helper()
	if err := x.ns.Do(func(ns.NetNS) error { return fn() }); err != nil {
		t.Fatalf("in %s: %v", x.name, err)
	}
}

func (x *testNS) sysctl(t *testing.T, key, value string) {
	t.Helper()
	x.do(t, func() error { return os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644) })
}

func (x *testNS) up(t *testing.T, name string) netlink.Link {
	t.Helper()
	l, err := x.h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := x.h.LinkSetUp(l); err != nil {
		t.Fatalf("set %s up in %s: %v", name, x.name, err)
	}
	return l
}

// operational waits for the link's operational state to be up: until the
// kernel's linkwatch (at most once a second) activates its queueing
// discipline, a fresh link drops what it is given.
func (x *testNS) operational(t *testing.T, name string) {
	t.Helper()
	waitFor(t, 5*time.Second, name+" operationally up", func() bool {
		l, err := x.h.LinkByName(name)
		return err == nil && l.Attrs().OperState == netlink.OperUp
	})
}

// veth connects aName in a to bName in b, both up.
func veth(t *testing.T, a *testNS, aName string, b *testNS, bName string) {
	t.Helper()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: aName}, PeerName: bName, PeerNamespace: netlink.NsFd(int(b.ns.Fd()))}
	if err := a.h.LinkAdd(v); err != nil {
		t.Fatalf("veth %s/%s: %v", aName, bName, err)
	}
	a.up(t, aName)
	b.up(t, bName)
	a.operational(t, aName)
	b.operational(t, bName)
}

func (x *testNS) addr(t *testing.T, link string, prefixes ...string) {
	t.Helper()
	l, err := x.h.LinkByName(link)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range prefixes {
		p := netip.MustParsePrefix(s)
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := x.h.AddrAdd(l, a); err != nil {
			t.Fatalf("address %s on %s in %s: %v", s, link, x.name, err)
		}
	}
}

// route adds "dst via gw" (dst "" is the default route).
func (x *testNS) route(t *testing.T, dst, gw string) {
	t.Helper()
	g := netip.MustParseAddr(gw)
	r := &netlink.Route{Gw: g.AsSlice()}
	if dst != "" {
		p := netip.MustParsePrefix(dst)
		r.Dst = &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	if err := x.h.RouteAdd(r); err != nil {
		t.Fatalf("route %q via %s in %s: %v", dst, gw, x.name, err)
	}
}

// testLogger sends a Firewall's logs to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// startFirewall runs a Firewall in x with addresses a until the returned
// stop is called (or the test ends), and waits until it is Ready.
func startFirewall(t *testing.T, x *testNS, cfg Config, a Addrs) (f *Firewall, stop func()) {
	t.Helper()
	cfg.NetNSPath = x.ns.Path()
	cfg.Logger = testLogger(t)
	f = mustNew(t, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(stop)
	f.Set(a)
	waitFor(t, 10*time.Second, "firewall Ready", f.Ready)
	return f, stop
}

// --- reading the kernel back ------------------------------------------------

// nftListTable returns `nft list table FAMILY loom` in x: per chain, the
// chain's header line ("type ... policy ...;") and rule lines, trimmed; nil
// when there is no table.
func nftListTable(t *testing.T, x *testNS, fam family) map[string][]string {
	t.Helper()
	var out []byte
	var runErr error
	x.do(t, func() error {
		out, runErr = exec.Command("nft", "list", "table", string(fam.nft()), Table).CombinedOutput()
		return nil
	})
	if runErr != nil {
		if strings.Contains(string(out), "No such file or directory") {
			return nil
		}
		t.Fatalf("nft list table: %v: %s", runErr, out)
	}
	chains := map[string][]string{}
	chain := ""
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "chain "):
			chain = strings.TrimSuffix(strings.TrimPrefix(l, "chain "), " {")
			chains[chain] = nil
		case l == "}" || l == "" || strings.HasPrefix(l, "table ") || strings.HasPrefix(l, "comment "):
			if l == "}" {
				chain = ""
			}
		case chain != "":
			chains[chain] = append(chains[chain], l)
		default:
			t.Fatalf("unexpected line %q in:\n%s", l, out)
		}
	}
	return chains
}

// wantNFTListing is what nftListTable should return for rules.
func wantNFTListing(fam family, rules []rule) map[string][]string {
	if len(rules) == 0 {
		return nil
	}
	want := map[string][]string{}
	for _, h := range nftHooks() {
		rs := onHook(rules, h)
		if len(rs) == 0 {
			continue
		}
		name := nftBaseChain(h).Name
		header := "type nat hook postrouting priority srcnat; policy accept;"
		if h == hookForward {
			header = "type filter hook forward priority filter; policy accept;"
		}
		want[name] = []string{header}
		for _, r := range rs {
			want[name] = append(want[name], nftRuleText(fam, r, true)+` comment "`+r.comment+`"`)
		}
	}
	return want
}

// nftCommentsIn reads the table through knftables, as the sync does.
func nftCommentsIn(t *testing.T, x *testNS, fam family) (nftComments, bool) {
	t.Helper()
	var have nftComments
	var exists bool
	x.do(t, func() error {
		nft, err := knftables.New(fam.nft(), Table)
		if err != nil {
			return err
		}
		have, exists, err = readNFT(context.Background(), nft)
		return err
	})
	return have, exists
}

// ipt opens go-iptables for fam; use it only inside x.do.
func openIPT(fam family) (*iptables.IPTables, error) {
	return iptables.New(iptables.IPFamily(fam.proto()), iptables.Timeout(5))
}

// iptSave returns `iptables -t TABLE -S` of fam in x: one listing of the
// whole table, consistent even while a sync is rewriting chains.
func iptSave(t *testing.T, x *testNS, fam family, table string) []string {
	t.Helper()
	var out []byte
	x.do(t, func() error {
		var err error
		out, err = exec.Command(fam.iptablesCmd(), "-t", table, "-S").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s -t %s -S: %v: %s", fam.iptablesCmd(), table, err, out)
		}
		return nil
	})
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// iptLoomState reads back with go-iptables, normalized, the rules of
// loom's chains of fam and the jumps to them, in `iptables -S` order: table
// nat then filter, built-in chain before loom's. It does not fail the test,
// so it can be polled while a sync rewrites the chains.
func iptLoomState(x *testNS, fam family) ([]string, error) {
	var out []string
	err := x.ns.Do(func(ns.NetNS) error {
		ipt, err := openIPT(fam)
		if err != nil {
			return err
		}
		for _, c := range iptChains() {
			for _, chain := range []string{c.parent, c.name} {
				ok, err := ipt.ChainExists(c.table, chain)
				if err != nil {
					return err
				}
				if !ok {
					continue
				}
				lines, err := ipt.List(c.table, chain)
				if err != nil {
					return err
				}
				for _, l := range lines {
					if strings.HasPrefix(l, "-A ") && strings.Contains(l, "LOOM-") {
						out = append(out, normalizeIPT(l))
					}
				}
			}
		}
		return nil
	})
	return out, err
}

func mustIPTLoomState(t *testing.T, x *testNS, fam family) []string {
	t.Helper()
	s, err := iptLoomState(x, fam)
	if err != nil {
		t.Fatalf("read back %s iptables in %s: %v", fam, x.name, err)
	}
	return s
}

// wantIPTState is iptLoomState for rendered rules.
func wantIPTState(rs []Rule, fam family) []string {
	var out []string
	for _, c := range iptChains() {
		for _, chain := range []string{c.parent, c.name} {
			for _, r := range rs {
				if r.IPv6 == (fam == ipv6) && r.Table == c.table && r.Chain == chain {
					out = append(out, iptLine(r.Chain, r.Spec))
				}
			}
		}
	}
	return out
}
