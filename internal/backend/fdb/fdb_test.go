package fdb

// Address plan: one namespace with a stub link eth0 (198.18.0.11/24,
// 2001:db8::11/64) and VXLAN devices on it: vx.1 and vx.6 (local
// 2001:db8::11: a VXLAN device sends in one family only), owned by the Kind,
// and vx.2, not owned. Peers' VTEPs are 02:00:00:00:00:0N at 198.18.0.1N or
// 2001:db8::1N.

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func vxlanDevice(t *testing.T, h *netlink.Handle, name string, vni int, under netlink.Link, local string) netlink.Link {
	t.Helper()
	vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: name}, VxlanId: vni, Port: 8472, VtepDevIndex: under.Attrs().Index}
	if local != "" {
		vx.SrcAddr = net.ParseIP(local)
	}
	if err := h.LinkAdd(vx); err != nil {
		t.Fatalf("vxlan %s: %v", name, err)
	}
	return nstest.Up(t, h, name)
}

func setup(t *testing.T) (*Kind, *netlink.Handle, netlink.Link, netlink.Link, netlink.Link) {
	t.Helper()
	n, h := nstest.NewNode(t, "fdb")
	eth0 := nstest.Stub(t, h, "eth0")
	nstest.Addr(t, h, eth0, "198.18.0.11/24", "2001:db8::11/64")
	vx1 := vxlanDevice(t, h, "vx.1", 1, eth0, "198.18.0.11")
	vx2 := vxlanDevice(t, h, "vx.2", 2, eth0, "")
	vx6 := vxlanDevice(t, h, "vx.6", 1, eth0, "2001:db8::11")
	k, err := NewKind(Config{Handle: h, NetNSPath: n.Path(), Devices: []string{"vx.1", "vx.6", "vx.missing"}})
	if err != nil {
		t.Fatal(err)
	}
	return k, h, vx1, vx2, vx6
}

func mac(last byte) net.HardwareAddr { return net.HardwareAddr{0x02, 0, 0, 0, 0, last} }

func entry(last byte, dst string) Entry {
	return Entry{Dev: "vx.1", MAC: mac(last), Dst: netip.MustParseAddr(dst)}
}

// add puts an entry in the kernel behind the Kind's back.
func add(t *testing.T, h *netlink.Handle, l netlink.Link, m net.HardwareAddr, dst string, state int, appendDst bool) {
	t.Helper()
	n := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: state,
		HardwareAddr: m, IP: net.ParseIP(dst)}
	add := h.NeighAdd
	if appendDst {
		add = h.NeighAppend
	}
	if err := add(n); err != nil {
		t.Fatalf("fdb add %s dst %s: %v", m, dst, err)
	}
}

// kernelFDB lists l's FDB entries as "mac dst state".
func kernelFDB(t *testing.T, h *netlink.Handle, l netlink.Link) []string {
	t.Helper()
	ns, err := h.NeighList(l.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, n := range ns {
		s := n.HardwareAddr.String() + " " + n.IP.String()
		if n.State&netlink.NUD_PERMANENT != 0 {
			s += " permanent"
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

func dump(t *testing.T, k *Kind) []Entry {
	t.Helper()
	owned, foreign, err := k.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if len(foreign) != 0 {
		t.Errorf("foreign %v, want none", foreign)
	}
	return owned
}

func TestKind(t *testing.T) {
	k, h, vx1, vx2, vx6 := setup(t)
	// Not owned: the all-zeros default destination, a learned entry, and
	// an entry on another device.
	add(t, h, vx1, make(net.HardwareAddr, 6), "198.18.0.99", netlink.NUD_PERMANENT, true)
	add(t, h, vx1, mac(8), "198.18.0.18", netlink.NUD_REACHABLE, false)
	add(t, h, vx2, mac(7), "198.18.0.17", netlink.NUD_PERMANENT, false)
	if got := dump(t, k); len(got) != 0 {
		t.Fatalf("dumped %v, want nothing owned yet", got)
	}

	v4, v6 := entry(2, "198.18.0.12"), entry(3, "2001:db8::13")
	v6.Dev = "vx.6"
	for _, e := range []Entry{v4, v6} {
		if err := k.Create(e); err != nil {
			t.Fatal(err)
		}
	}
	got := dump(t, k)
	for _, want := range []Entry{v4, v6} {
		if !slices.ContainsFunc(got, func(e Entry) bool { return e.Key() == want.Key() && k.Equal(want, e) }) {
			t.Errorf("dumped %v, want %v in it", got, want)
		}
	}
	if len(got) != 2 {
		t.Errorf("dumped %v, want two entries", got)
	}

	// A learned entry on a wanted MAC becomes loom's.
	if err := k.Create(entry(8, "198.18.0.28")); err != nil {
		t.Fatalf("create over a learned entry: %v", err)
	}
	moved := v4
	moved.Dst = netip.MustParseAddr("198.18.0.22")
	if err := k.Update(moved); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"00:00:00:00:00:00 198.18.0.99 permanent",
		"02:00:00:00:00:02 198.18.0.22 permanent",
		"02:00:00:00:00:08 198.18.0.28 permanent",
	}
	if got := kernelFDB(t, h, vx1); !slices.Equal(got, want) {
		t.Errorf("FDB of vx.1\n %q\nwant\n %q", got, want)
	}
	if got := kernelFDB(t, h, vx6); !slices.Equal(got, []string{"02:00:00:00:00:03 2001:db8::13 permanent"}) {
		t.Errorf("FDB of vx.6 %q, want the IPv6 entry", got)
	}

	if err := k.Delete(v6); err != nil {
		t.Fatal(err)
	}
	if err := k.Delete(v6); err != nil {
		t.Errorf("deleting an entry already gone: %v", err)
	}
	want = []string{
		"00:00:00:00:00:00 198.18.0.99 permanent",
		"02:00:00:00:00:02 198.18.0.22 permanent",
		"02:00:00:00:00:08 198.18.0.28 permanent",
	}
	if got := kernelFDB(t, h, vx1); !slices.Equal(got, want) {
		t.Errorf("FDB of vx.1\n %q\nwant\n %q", got, want)
	}
	if got := kernelFDB(t, h, vx6); len(got) != 0 {
		t.Errorf("FDB of vx.6 %q, want it empty after Delete", got)
	}
	if got := kernelFDB(t, h, vx2); !slices.Equal(got, []string{"02:00:00:00:00:07 198.18.0.17 permanent"}) {
		t.Errorf("FDB of vx.2 (not owned) is now %q", got)
	}
	if err := k.Create(Entry{Dev: "vx.missing", MAC: mac(4), Dst: netip.MustParseAddr("198.18.0.14")}); err == nil {
		t.Error("Create on a missing device succeeded")
	}
}

// recorder is a reconcile.Notifier that records what it is told.
type recorder struct {
	mu     sync.Mutex // guards keys
	keys   []Key
	wanted map[Key]bool
}

func (r *recorder) Trigger(keys ...Key) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = append(r.keys, keys...)
}

func (r *recorder) TriggerFull()     {}
func (r *recorder) Wants(k Key) bool { return r.wanted[k] }

func (r *recorder) has(k Key) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.keys, k)
}

func (r *recorder) snapshot() []Key {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.keys)
}

func (r *recorder) clear() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = nil
}

func TestWatch(t *testing.T) {
	nstest.NoLeaks(t)
	k, h, vx1, vx2, _ := setup(t)
	own := entry(2, "198.18.0.12")
	rec := &recorder{wanted: map[Key]bool{own.Key(): true}}
	dump(t, k) // as a sync does: the Kind learns the devices' indexes
	if err := k.Create(own); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	wait, err := k.Watch(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); wait() })

	// Someone deletes a loom entry: a partial sync of its key.
	if err := h.NeighDel(&netlink.Neigh{LinkIndex: vx1.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
		HardwareAddr: own.MAC, IP: own.Dst.AsSlice()}); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the deleted entry", func() bool { return rec.has(own.Key()) })

	// Someone adds a permanent entry on an owned device: a trigger (a full
	// or partial sync removes it as unwanted).
	add(t, h, vx1, mac(5), "198.18.0.15", netlink.NUD_PERMANENT, false)
	nstest.Eventually(t, 5*time.Second, "trigger for the new permanent entry", func() bool { return rec.has(entry(5, "198.18.0.15").Key()) })

	// Entries elsewhere, or the zero MAC: nothing.
	rec.clear()
	add(t, h, vx2, mac(7), "198.18.0.17", netlink.NUD_PERMANENT, false)
	add(t, h, vx1, make(net.HardwareAddr, 6), "198.18.0.99", netlink.NUD_PERMANENT, true)
	time.Sleep(200 * time.Millisecond)
	if got := rec.snapshot(); len(got) != 0 {
		t.Errorf("unrelated entries triggered %v", got)
	}
}

// wanter is a recorder that also says what is wanted, as a Reconciler does.
type wanter struct {
	*recorder
	want map[Key]Entry
}

func (w wanter) Wanted(k Key) (Entry, bool) {
	e, ok := w.want[k]
	return e, ok
}

// The echo of loom's own change (its entry added exactly as wanted) asks
// for nothing; the entry pointed elsewhere, or deleted, does.
func TestWatchIgnoresOwnEcho(t *testing.T) {
	nstest.NoLeaks(t)
	k, h, vx1, _, _ := setup(t)
	want, marker := entry(6, "198.18.0.16"), entry(7, "198.18.0.17")
	rec := wanter{&recorder{wanted: map[Key]bool{want.Key(): true, marker.Key(): true}}, map[Key]Entry{want.Key(): want}}
	dump(t, k)
	ctx, cancel := context.WithCancel(context.Background())
	wait, err := k.Watch(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); wait() })

	for _, e := range []Entry{want, marker} {
		if err := k.Create(e); err != nil {
			t.Fatal(err)
		}
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the marker", func() bool { return rec.has(marker.Key()) })
	if rec.has(want.Key()) {
		t.Fatal("the echo of creating the wanted entry triggered a sync")
	}
	if err := k.Update(entry(6, "198.18.0.26")); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the changed entry", func() bool { return rec.has(want.Key()) })
	rec.clear()
	if err := h.NeighDel(&netlink.Neigh{LinkIndex: vx1.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
		HardwareAddr: want.MAC, IP: net.ParseIP("198.18.0.26")}); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the deleted entry", func() bool { return rec.has(want.Key()) })
}
