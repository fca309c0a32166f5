package neigh

// Address plan: one namespace with a stub link eth0 (198.18.0.11/24) and two
// VXLAN devices on it: vx.1 (owned by the Kind) and vx.2 (not). Neighbours
// are peer subnets' first addresses 10.244.N.0 and fc00:0:0:N::.

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
)

func vxlanDevice(t *testing.T, h *netlink.Handle, name string, vni int, under netlink.Link) netlink.Link {
	t.Helper()
	if err := h.LinkAdd(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: name}, VxlanId: vni, Port: 8472, VtepDevIndex: under.Attrs().Index}); err != nil {
		t.Fatalf("vxlan %s: %v", name, err)
	}
	return nstest.Up(t, h, name)
}

func setup(t *testing.T) (*Kind, *netlink.Handle, netlink.Link, netlink.Link) {
	t.Helper()
	n, h := nstest.NewNode(t, "neigh")
	eth0 := nstest.Stub(t, h, "eth0")
	nstest.Addr(t, h, eth0, "198.18.0.11/24")
	vx1 := vxlanDevice(t, h, "vx.1", 1, eth0)
	vx2 := vxlanDevice(t, h, "vx.2", 2, eth0)
	k, err := NewKind(Config{Handle: h, NetNSPath: n.Path(), Devices: []string{"vx.1", "vx.missing"}})
	if err != nil {
		t.Fatal(err)
	}
	return k, h, vx1, vx2
}

func mac(last byte) net.HardwareAddr { return net.HardwareAddr{0x02, 0, 0, 0, 0, last} }

func entry(ip string, last byte) Neigh {
	return Neigh{Dev: "vx.1", IP: netip.MustParseAddr(ip), MAC: mac(last)}
}

// kernelEntry reads the entry at ip on l from the kernel.
func kernelEntry(t *testing.T, h *netlink.Handle, l netlink.Link, ip string) (netlink.Neigh, bool) {
	t.Helper()
	a := netip.MustParseAddr(ip)
	family := netlink.FAMILY_V4
	if a.Is6() {
		family = netlink.FAMILY_V6
	}
	ns, err := h.NeighList(l.Attrs().Index, family)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if b, _ := netip.AddrFromSlice(n.IP); b.Unmap() == a {
			return n, true
		}
	}
	return netlink.Neigh{}, false
}

func dump(t *testing.T, k *Kind) []Neigh {
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
	k, h, vx1, vx2 := setup(t)
	// Not owned: a permanent entry on another device, and a cache entry
	// on an owned one.
	for _, n := range []*netlink.Neigh{
		{LinkIndex: vx2.Attrs().Index, IP: net.ParseIP("10.244.7.0"), HardwareAddr: mac(7), State: netlink.NUD_PERMANENT},
		{LinkIndex: vx1.Attrs().Index, IP: net.ParseIP("10.244.8.0"), HardwareAddr: mac(8), State: netlink.NUD_STALE},
	} {
		if err := h.NeighAdd(n); err != nil {
			t.Fatal(err)
		}
	}
	if got := dump(t, k); len(got) != 0 {
		t.Fatalf("dumped %v, want nothing owned yet", got)
	}

	v4, v6 := entry("10.244.2.0", 2), entry("fc00:0:0:2::", 2)
	for _, n := range []Neigh{v4, v6} {
		if err := k.Create(n); err != nil {
			t.Fatal(err)
		}
	}
	got := dump(t, k)
	if len(got) != 2 || !slices.ContainsFunc(got, func(n Neigh) bool { return n.Key() == v4.Key() && k.Equal(v4, n) }) ||
		!slices.ContainsFunc(got, func(n Neigh) bool { return n.Key() == v6.Key() && k.Equal(v6, n) }) {
		t.Fatalf("dumped %v, want %v and %v", got, v4, v6)
	}
	if kn, ok := kernelEntry(t, h, vx1, "10.244.2.0"); !ok || kn.State != netlink.NUD_PERMANENT || kn.HardwareAddr.String() != mac(2).String() {
		t.Errorf("kernel entry %+v, want 10.244.2.0 lladdr %s permanent", kn, mac(2))
	}

	// A cache entry on a wanted key is replaced by Create.
	cached := entry("10.244.8.0", 9)
	if err := k.Create(cached); err != nil {
		t.Fatalf("create over a cache entry: %v", err)
	}
	if kn, _ := kernelEntry(t, h, vx1, "10.244.8.0"); kn.State != netlink.NUD_PERMANENT || kn.HardwareAddr.String() != mac(9).String() {
		t.Errorf("kernel entry %+v, want lladdr %s permanent", kn, mac(9))
	}

	moved := v4
	moved.MAC = mac(3)
	if err := k.Update(moved); err != nil {
		t.Fatal(err)
	}
	if kn, _ := kernelEntry(t, h, vx1, "10.244.2.0"); kn.HardwareAddr.String() != mac(3).String() {
		t.Errorf("after Update: %+v, want lladdr %s", kn, mac(3))
	}

	if err := k.Delete(v6); err != nil {
		t.Fatal(err)
	}
	if err := k.Delete(v6); err != nil {
		t.Errorf("deleting an entry already gone: %v", err)
	}
	if _, ok := kernelEntry(t, h, vx1, "fc00:0:0:2::"); ok {
		t.Error("IPv6 entry survived Delete")
	}
	if _, ok := kernelEntry(t, h, vx2, "10.244.7.0"); !ok {
		t.Error("an entry on a device the Kind does not own is gone")
	}

	// A device that does not exist has no entries and takes none.
	if err := k.Create(Neigh{Dev: "vx.missing", IP: netip.MustParseAddr("10.244.4.0"), MAC: mac(4)}); err == nil {
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
	k, h, vx1, vx2 := setup(t)
	wanted := entry("10.244.5.0", 5)
	own := entry("10.244.2.0", 2)
	rec := &recorder{wanted: map[Key]bool{wanted.Key(): true, own.Key(): true}}
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
	if err := h.NeighDel(&netlink.Neigh{LinkIndex: vx1.Attrs().Index, IP: net.ParseIP("10.244.2.0")}); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the deleted entry", func() bool { return rec.has(own.Key()) })

	// The kernel starts resolving a wanted key by itself: a trigger too.
	if err := h.NeighAdd(&netlink.Neigh{LinkIndex: vx1.Attrs().Index, IP: net.ParseIP("10.244.5.0"), HardwareAddr: mac(1), State: netlink.NUD_STALE}); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the wanted key", func() bool { return rec.has(wanted.Key()) })

	// Entries elsewhere, or cache entries on keys nobody wants: nothing.
	rec.clear()
	for _, n := range []*netlink.Neigh{
		{LinkIndex: vx2.Attrs().Index, IP: net.ParseIP("10.244.7.0"), HardwareAddr: mac(7), State: netlink.NUD_PERMANENT},
		{LinkIndex: vx1.Attrs().Index, IP: net.ParseIP("10.244.8.0"), HardwareAddr: mac(8), State: netlink.NUD_STALE},
	} {
		if err := h.NeighAdd(n); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if got := rec.snapshot(); len(got) != 0 {
		t.Errorf("unrelated entries triggered %v", got)
	}
}

// wanter is a recorder that also says what is wanted, as a Reconciler does.
type wanter struct {
	*recorder
	want map[Key]Neigh
}

func (w wanter) Wanted(k Key) (Neigh, bool) {
	n, ok := w.want[k]
	return n, ok
}

// The echo of loom's own change (its entry added exactly as wanted) asks
// for nothing; the entry with another MAC, or deleted, does.
func TestWatchIgnoresOwnEcho(t *testing.T) {
	nstest.NoLeaks(t)
	k, h, vx1, _ := setup(t)
	want, marker := entry("10.244.6.0", 6), entry("10.244.7.0", 7)
	rec := wanter{&recorder{wanted: map[Key]bool{want.Key(): true, marker.Key(): true}}, map[Key]Neigh{want.Key(): want}}
	dump(t, k)
	ctx, cancel := context.WithCancel(context.Background())
	wait, err := k.Watch(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); wait() })

	for _, n := range []Neigh{want, marker} {
		if err := k.Create(n); err != nil {
			t.Fatal(err)
		}
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the marker", func() bool { return rec.has(marker.Key()) })
	if rec.has(want.Key()) {
		t.Fatal("the echo of creating the wanted entry triggered a sync")
	}
	if err := k.Update(entry("10.244.6.0", 9)); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the changed entry", func() bool { return rec.has(want.Key()) })
	rec.clear()
	if err := h.NeighDel(&netlink.Neigh{LinkIndex: vx1.Attrs().Index, IP: net.ParseIP("10.244.6.0")}); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the deleted entry", func() bool { return rec.has(want.Key()) })
}
