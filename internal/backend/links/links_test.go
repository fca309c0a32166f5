package links

// Address plan: one namespace "node" with a stub link eth0 (a veth whose
// peer stays in the namespace) holding 198.18.0.11/24 and 2001:db8::11/64
// (nodad). The Kind owns links named vx.*; the devices use pod addresses
// 10.244.1.0/32 and fc00:0:0:1::/128.

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/vishvananda/netlink"
)

func newKind(t *testing.T) (*Kind, ns.NetNS, *netlink.Handle, netlink.Link) {
	t.Helper()
	n, h := nstest.NewNode(t, "links")
	eth0 := nstest.Stub(t, h, "eth0")
	nstest.Addr(t, h, eth0, "198.18.0.11/24", "2001:db8::11/64")
	k, err := NewKind(Config{Handle: h, NetNSPath: n.Path(), Owns: func(name string) bool { return len(name) > 3 && name[:3] == "vx." }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k, n, h, eth0
}

func device(eth0 netlink.Link) Device {
	return Device{
		Name:          "vx.1",
		VNI:           1,
		Port:          8472,
		Local:         netip.MustParseAddr("198.18.0.11"),
		UnderlayIndex: eth0.Attrs().Index,
		MAC:           net.HardwareAddr{0x02, 0x11, 0x22, 0x33, 0x44, 0x55},
		MTU:           1450,
		Addrs:         []netip.Prefix{netip.MustParsePrefix("10.244.1.0/32")},
		Up:            true,
	}
}

func dumpOne(t *testing.T, k *Kind, name string) (Device, bool) {
	t.Helper()
	owned, foreign, err := k.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if len(foreign) != 0 {
		t.Errorf("foreign %v, want none: the Kind owns its names whole", foreign)
	}
	for _, d := range owned {
		if d.Name == name {
			return d, true
		}
	}
	return Device{}, false
}

func TestCreateShape(t *testing.T) {
	k, _, h, eth0 := newKind(t)
	want := device(eth0)
	if err := k.Create(want); err != nil {
		t.Fatal(err)
	}
	got, ok := dumpOne(t, k, "vx.1")
	if !ok {
		t.Fatal("the created device is not in the dump")
	}
	if !k.Equal(want, got) {
		t.Errorf("dumped %v, want %v", got, want)
	}

	// Field by field, from the kernel, not from our own dump.
	l, err := h.LinkByName("vx.1")
	if err != nil {
		t.Fatal(err)
	}
	vx, ok := l.(*netlink.Vxlan)
	if !ok {
		t.Fatalf("link type %s, want vxlan", l.Type())
	}
	if vx.VxlanId != 1 || vx.Port != 8472 || !vx.SrcAddr.Equal(net.ParseIP("198.18.0.11")) ||
		vx.VtepDevIndex != eth0.Attrs().Index || vx.Learning || vx.GBP {
		t.Errorf("vxlan attributes id %d port %d local %s dev %d learning %v gbp %v, want 1 8472 198.18.0.11 %d false false",
			vx.VxlanId, vx.Port, vx.SrcAddr, vx.VtepDevIndex, vx.Learning, vx.GBP, eth0.Attrs().Index)
	}
	if !bytes.Equal(vx.HardwareAddr, want.MAC) || vx.MTU != 1450 || vx.Flags&net.FlagUp == 0 {
		t.Errorf("address %s mtu %d flags %v, want %s 1450 up", vx.HardwareAddr, vx.MTU, vx.Flags, want.MAC)
	}
	on, err := k.eth.feature("vx.1", FeatureTxChecksum)
	if err != nil || on {
		t.Errorf("%s on=%v (%v), want off", FeatureTxChecksum, on, err)
	}
}

func TestUpdateInPlace(t *testing.T) {
	k, _, h, eth0 := newKind(t)
	want := device(eth0)
	if err := k.Create(want); err != nil {
		t.Fatal(err)
	}
	l, err := h.LinkByName("vx.1")
	if err != nil {
		t.Fatal(err)
	}
	index := l.Attrs().Index

	// Someone changes everything that can change in place.
	if err := h.LinkSetMTU(l, 1400); err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetHardwareAddr(l, net.HardwareAddr{0x02, 0, 0, 0, 0, 9}); err != nil {
		t.Fatal(err)
	}
	if err := k.eth.setFeature("vx.1", FeatureTxChecksum, true); err != nil {
		t.Fatal(err)
	}
	if err := h.AddrDel(l, &netlink.Addr{IPNet: ipNet(want.Addrs[0])}); err != nil {
		t.Fatal(err)
	}
	nstest.Addr(t, h, l, "10.244.9.9/24", "fc00::9/64")
	if err := h.LinkSetDown(l); err != nil {
		t.Fatal(err)
	}

	have, _ := dumpOne(t, k, "vx.1")
	if k.Equal(want, have) {
		t.Fatalf("Equal(%v, %v): the changes went unnoticed", want, have)
	}
	if d := inPlaceDiff(want, have); d == "" || recreateReason(want, have) != "" {
		t.Fatalf("in-place diff %q, recreate reason %q: want only in-place changes", d, recreateReason(want, have))
	}
	if err := k.Update(want); err != nil {
		t.Fatal(err)
	}
	have, _ = dumpOne(t, k, "vx.1")
	if !k.Equal(want, have) || have.Index != index {
		t.Errorf("after Update: %v (index %d), want %v on index %d", have, have.Index, want, index)
	}
}

func TestUpdateRecreates(t *testing.T) {
	k, _, h, eth0 := newKind(t)
	if err := k.Create(device(eth0)); err != nil {
		t.Fatal(err)
	}
	for _, change := range []func(d *Device){
		func(d *Device) { d.VNI = 2 },
		func(d *Device) { d.Port = 4789 },
		func(d *Device) { d.Learning = true },
		func(d *Device) { d.GBP = true },
		func(d *Device) { d.Local = netip.MustParseAddr("2001:db8::11"); d.MTU = 1430 },
	} {
		want := device(eth0)
		change(&want)
		have, _ := dumpOne(t, k, "vx.1")
		if recreateReason(want, have) == "" {
			t.Fatalf("no recreate reason between %v and %v", want, have)
		}
		if err := k.Update(want); err != nil {
			t.Fatal(err)
		}
		if have, _ = dumpOne(t, k, "vx.1"); !k.Equal(want, have) {
			t.Errorf("after Update: %v, want %v", have, want)
		}
		if err := k.Update(device(eth0)); err != nil { // back, for the next change
			t.Fatal(err)
		}
	}

	// A link of another type on an owned name is replaced.
	if err := k.Delete(device(eth0)); err != nil {
		t.Fatal(err)
	}
	nstest.Stub(t, h, "vx.1")
	have, _ := dumpOne(t, k, "vx.1")
	if have.Type != "veth" || k.Equal(device(eth0), have) {
		t.Fatalf("dumped %v, want a veth that differs", have)
	}
	if err := k.Update(device(eth0)); err != nil {
		t.Fatal(err)
	}
	if have, _ = dumpOne(t, k, "vx.1"); !k.Equal(device(eth0), have) {
		t.Errorf("after Update: %v, want %v", have, device(eth0))
	}
}

func TestIPv6Device(t *testing.T) {
	k, _, _, eth0 := newKind(t)
	want := device(eth0)
	want.Name = "vx.6"
	want.Local = netip.MustParseAddr("2001:db8::11")
	want.MTU = 1430
	want.Addrs = []netip.Prefix{netip.MustParsePrefix("fc00:0:0:1::/128")}
	if err := k.Create(want); err != nil {
		t.Fatal(err)
	}
	if have, _ := dumpOne(t, k, "vx.6"); !k.Equal(want, have) {
		t.Errorf("dumped %v, want %v", have, want)
	}
}

func TestDeleteAndNotOwned(t *testing.T) {
	k, _, h, eth0 := newKind(t)
	nstest.Stub(t, h, "other")
	if err := k.Create(device(eth0)); err != nil {
		t.Fatal(err)
	}
	owned, _, err := k.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if len(owned) != 1 {
		t.Fatalf("owned %v, want vx.1 alone", owned)
	}
	if err := k.Delete(owned[0]); err != nil {
		t.Fatal(err)
	}
	if err := k.Delete(owned[0]); err != nil {
		t.Errorf("deleting a device already gone: %v", err)
	}
	if _, err := h.LinkByName("other"); err != nil {
		t.Errorf("a link the Kind does not own is gone: %v", err)
	}
}

// recorder is a reconcile.Notifier that records what it is told.
type recorder struct {
	mu   sync.Mutex // guards keys, full
	keys []string
	full int
}

func (r *recorder) Trigger(keys ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = append(r.keys, keys...)
}

func (r *recorder) TriggerFull() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.full++
}

func (r *recorder) Wants(string) bool { return false }

func (r *recorder) count(k string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, x := range r.keys {
		if x == k {
			n++
		}
	}
	return n
}

func (r *recorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = nil
}

func TestWatch(t *testing.T) {
	nstest.NoLeaks(t)
	k, _, h, eth0 := newKind(t)
	if err := k.Create(device(eth0)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := k.Dump(); err != nil { // learn the index, as a sync does
		t.Fatal(err)
	}
	rec := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	wait, err := k.Watch(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); wait() })

	l, err := h.LinkByName("vx.1")
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"address removed", func() error { return h.AddrDel(l, &netlink.Addr{IPNet: ipNet(netip.MustParsePrefix("10.244.1.0/32"))}) }},
		{"MTU changed", func() error { return h.LinkSetMTU(l, 1400) }},
		{"offload turned on", func() error { return k.eth.setFeature("vx.1", FeatureTxChecksum, true) }},
		{"device deleted", func() error { return h.LinkDel(l) }},
	}
	for _, s := range steps {
		rec.reset()
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.what, err)
		}
		nstest.Eventually(t, 5*time.Second, "a trigger for vx.1 after: "+s.what, func() bool { return rec.count("vx.1") > 0 })
	}

	// Links the Kind does not own trigger nothing.
	rec.reset()
	nstest.Stub(t, h, "other")
	time.Sleep(200 * time.Millisecond)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if slices.ContainsFunc(rec.keys, func(k string) bool { return k != "vx.1" }) {
		t.Errorf("triggers %v for links the Kind does not own", rec.keys)
	}
}

func TestEthtoolErrors(t *testing.T) {
	k, _, _, _ := newKind(t)
	if _, err := k.eth.feature("nonexistent", FeatureTxChecksum); err == nil {
		t.Error("reading a feature of a missing device succeeded")
	}
	if _, err := k.eth.feature("eth0", "no-such-feature"); err == nil {
		t.Error("reading an unknown feature succeeded")
	}
	if err := k.eth.ioctl("a-name-much-too-long-for-linux", make([]byte, 8)); err == nil {
		t.Error("an over-long interface name was accepted")
	}
}
