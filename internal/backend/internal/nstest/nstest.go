// Package nstest builds small network topologies for backend tests, inside
// namespaces made by testnet.NewNS: every link, address and route it creates
// lives in those namespaces, never in the test process's own.
package nstest

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/testnet"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NewNode returns a fresh namespace with lo up and IPv6 duplicate address
// detection off (addresses, link-local ones included, are usable at once),
// and a netlink handle bound to it.
func NewNode(t testing.TB, tag string) (ns.NetNS, *netlink.Handle) {
	t.Helper()
	n := testnet.NewNS(t, tag)
	h := Handle(t, n)
	Sysctl(t, n, "net/ipv6/conf/all/accept_dad", "0")
	Sysctl(t, n, "net/ipv6/conf/default/accept_dad", "0")
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	return n, h
}

// Handle returns a netlink handle bound to n, closed when t ends.
func Handle(t testing.TB, n ns.NetNS) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(netns.NsHandle(n.Fd()))
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", n.Path(), err)
	}
	t.Cleanup(h.Close)
	return h
}

// Sysctl writes /proc/sys/<key> inside n. /proc/sys/net belongs to the
// namespace of the thread that opens it, so the write runs on a thread
// locked inside n.
func Sysctl(t testing.TB, n ns.NetNS, key, value string) {
	t.Helper()
	err := n.Do(func(ns.NetNS) error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644)
	})
	if err != nil {
		t.Fatalf("sysctl %s=%s in %s: %v", key, value, n.Path(), err)
	}
}

// Veth creates a veth pair, aName in a and bName in b, both up. The pair is
// created by a's handle, so it never exists outside the test's namespaces.
func Veth(t testing.TB, a ns.NetNS, ha *netlink.Handle, aName string, b ns.NetNS, hb *netlink.Handle, bName string) (netlink.Link, netlink.Link) {
	t.Helper()
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: aName},
		PeerName:      bName,
		PeerNamespace: netlink.NsFd(int(b.Fd())),
	}
	if err := ha.LinkAdd(v); err != nil {
		t.Fatalf("veth %s/%s: %v", aName, bName, err)
	}
	Up(t, ha, aName)
	Up(t, hb, bName)
	return Operational(t, ha, aName), Operational(t, hb, bName)
}

// Stub creates a link to hang addresses and routes on: a veth pair with
// both ends in one namespace, both up, so the link has carrier. (The kernels
// this runs on may lack the dummy driver.) It returns the end named name;
// the other is name+"p".
func Stub(t testing.TB, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
	if err := h.LinkAdd(v); err != nil {
		t.Fatalf("veth %s: %v", name, err)
	}
	Up(t, h, name+"p")
	Up(t, h, name)
	return Operational(t, h, name)
}

// Bridge creates a bridge, up, with a fixed MAC (a bridge with an automatic
// MAC takes its lowest port's and changes it as ports join, which makes
// peers' ARP entries stale) and multicast snooping off, and enslaves ports.
func Bridge(t testing.TB, h *netlink.Handle, name string, mac string, ports ...netlink.Link) netlink.Link {
	t.Helper()
	hw, err := net.ParseMAC(mac)
	if err != nil {
		t.Fatal(err)
	}
	off := false
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, HardwareAddr: hw}, MulticastSnooping: &off}
	if err := h.LinkAdd(br); err != nil {
		t.Fatalf("bridge %s: %v", name, err)
	}
	l := Up(t, h, name)
	for _, p := range ports {
		if err := h.LinkSetMaster(p, l); err != nil {
			t.Fatalf("enslave %s to %s: %v", p.Attrs().Name, name, err)
		}
	}
	return l
}

// Up sets the named link up and returns it.
func Up(t testing.TB, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatalf("set %s up: %v", name, err)
	}
	return l
}

// Operational waits until the named link's operational state is up and
// returns it. A link set up (with carrier) drops every packet until the
// kernel's linkwatch worker, which runs at most once a second, activates its
// queueing discipline and sets the operational state; a test that sends at
// once loses its first SYN and waits a second for the retransmission.
func Operational(t testing.TB, h *netlink.Handle, name string) netlink.Link {
	t.Helper()
	var l netlink.Link
	Eventually(t, 5*time.Second, name+" operationally up", func() bool {
		var err error
		if l, err = h.LinkByName(name); err != nil {
			t.Fatal(err)
		}
		return l.Attrs().OperState == netlink.OperUp
	})
	return l
}

// Addr adds addresses ("198.18.0.11/24", "2001:db8::11/64") to l. IPv6
// addresses get IFA_F_NODAD, so they are usable at once.
func Addr(t testing.TB, h *netlink.Handle, l netlink.Link, prefixes ...string) {
	t.Helper()
	for _, s := range prefixes {
		p := netip.MustParsePrefix(s)
		a := &netlink.Addr{IPNet: IPNet(p)}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(l, a); err != nil {
			t.Fatalf("address %s on %s: %v", s, l.Attrs().Name, err)
		}
	}
}

// IPNet converts p, keeping its address (not masked).
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Route adds a route "dst via gw dev l" with the given protocol.
func Route(t testing.TB, h *netlink.Handle, dst, gw string, l netlink.Link, proto netlink.RouteProtocol) {
	t.Helper()
	d := netip.MustParsePrefix(dst)
	r := &netlink.Route{Dst: IPNet(d), LinkIndex: l.Attrs().Index, Protocol: proto}
	if gw != "" {
		r.Gw = netip.MustParseAddr(gw).AsSlice()
	}
	if err := h.RouteAdd(r); err != nil {
		t.Fatalf("route %s via %s: %v", dst, gw, err)
	}
}

// KernelRoute is a route as a test compares it: "dst via gw dev name proto N".
type KernelRoute struct {
	Dst   netip.Prefix
	Gw    netip.Addr
	Link  int
	Proto netlink.RouteProtocol
}

// Routes lists the main table's unicast routes, both families, keyed by
// destination.
func Routes(t testing.TB, h *netlink.Handle) map[netip.Prefix]KernelRoute {
	t.Helper()
	out := make(map[netip.Prefix]KernelRoute)
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := h.RouteList(nil, fam)
		if err != nil {
			t.Fatalf("list routes: %v", err)
		}
		for _, r := range rs {
			if r.Dst == nil {
				continue
			}
			a, _ := netip.AddrFromSlice(r.Dst.IP)
			bits, _ := r.Dst.Mask.Size()
			gw, _ := netip.AddrFromSlice(r.Gw)
			p := netip.PrefixFrom(a.Unmap(), bits)
			out[p] = KernelRoute{Dst: p, Gw: gw.Unmap(), Link: r.LinkIndex, Proto: r.Protocol}
		}
	}
	return out
}

// Eventually polls cond every 10 ms until it holds or timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// LogBuffer collects log output for assertions; safe for concurrent use.
type LogBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Lines returns the logged lines containing every one of words.
func (b *LogBuffer) Lines(words ...string) []string {
	var out []string
	for _, line := range strings.Split(b.String(), "\n") {
		ok := line != ""
		for _, w := range words {
			ok = ok && strings.Contains(line, w)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// NoLeaks fails t if, after its cleanups, more goroutines run than when
// NoLeaks was called (waiting a little for them to finish). Call it first,
// so its check runs last.
func NoLeaks(t testing.TB) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<16)
				t.Errorf("%d goroutines after the test, %d before:\n%s",
					runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}
