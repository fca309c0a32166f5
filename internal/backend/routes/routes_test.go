package routes

// Address plan: one namespace "node" with a stub link eth0 (a veth whose
// peer stays in the namespace) holding 198.18.0.11/24 and 2001:db8::11/64
// (nodad). Gateways .12/.13 and ::12 are on-link through it; nobody answers
// for them, which routes do not need. Pod subnets
// are 10.244.N.0/24 and fc00:0:0:N::/64.

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func newKind(t *testing.T) (*Kind, *netlink.Handle, netlink.Link, string) {
	t.Helper()
	n, h := nstest.NewNode(t, "routes")
	eth0 := nstest.Stub(t, h, "eth0")
	nstest.Addr(t, h, eth0, "198.18.0.11/24", "2001:db8::11/64")
	k, err := NewKind(Config{Handle: h, NetNSPath: n.Path(), UnderlayLink: eth0.Attrs().Index})
	if err != nil {
		t.Fatal(err)
	}
	return k, h, eth0, n.Path()
}

func TestKindCreateDumpUpdateDelete(t *testing.T) {
	k, h, eth0, _ := newKind(t)
	idx := eth0.Attrs().Index
	nstest.Route(t, h, "10.244.200.0/24", "198.18.0.12", eth0, unix.RTPROT_STATIC) // foreign

	v4 := Route{Dst: netip.MustParsePrefix("10.244.2.0/24"), Gw: netip.MustParseAddr("198.18.0.12"), LinkIndex: idx}
	v6 := Route{Dst: netip.MustParsePrefix("fc00:0:0:2::/64"), Gw: netip.MustParseAddr("2001:db8::12"), LinkIndex: idx}
	for _, r := range []Route{v4, v6} {
		if err := k.Create(r); err != nil {
			t.Fatal(err)
		}
	}

	owned, foreign, err := k.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if len(owned) != 2 {
		t.Fatalf("owned %v, want the two routes created", owned)
	}
	for i, want := range []Route{v4, v6} {
		// IPv6 comes back with the kernel's metric 1024: same key.
		if owned[i].Key() != want.Key() || !k.Equal(want, owned[i]) {
			t.Errorf("dumped %v (key %v), want %v (key %v)", owned[i], owned[i].Key(), want, want.Key())
		}
	}
	if !slices.ContainsFunc(foreign, func(r Route) bool { return r.Dst == netip.MustParsePrefix("10.244.200.0/24") }) {
		t.Errorf("foreign %v lacks the static route", foreign)
	}

	moved := v4
	moved.Gw = netip.MustParseAddr("198.18.0.13")
	if err := k.Update(moved); err != nil {
		t.Fatal(err)
	}
	if got := nstest.Routes(t, h)[v4.Dst]; got.Gw != moved.Gw || got.Proto != Protocol {
		t.Errorf("after update: %+v, want via %v proto %d", got, moved.Gw, Protocol)
	}

	if err := k.Delete(owned[1]); err != nil {
		t.Fatal(err)
	}
	if err := k.Delete(owned[1]); err != nil {
		t.Errorf("deleting a route already gone: %v", err)
	}
	if _, ok := nstest.Routes(t, h)[v6.Dst]; ok {
		t.Error("IPv6 route survived Delete")
	}
}

func TestKindNeverTouchesForeignRoutes(t *testing.T) {
	k, h, eth0, _ := newKind(t)
	nstest.Route(t, h, "10.244.3.0/24", "198.18.0.13", eth0, unix.RTPROT_STATIC)
	foreign := Route{Dst: netip.MustParsePrefix("10.244.3.0/24"), Gw: netip.MustParseAddr("198.18.0.13"), LinkIndex: eth0.Attrs().Index}

	if err := k.Create(Route{Dst: foreign.Dst, Gw: netip.MustParseAddr("198.18.0.12"), LinkIndex: foreign.LinkIndex}); err == nil {
		t.Error("Create over a foreign route succeeded")
	}
	// The delete request carries loom's protocol: the kernel matches no route.
	if err := k.Delete(foreign); err != nil {
		t.Errorf("Delete of a foreign route: %v", err)
	}
	got := nstest.Routes(t, h)[foreign.Dst]
	if got.Gw != foreign.Gw || got.Proto != unix.RTPROT_STATIC {
		t.Errorf("foreign route now %+v, want it untouched", got)
	}
}

// recorder is a reconcile.Notifier that records what it is told.
type recorder struct {
	mu     sync.Mutex // guards keys, full, wanted
	keys   []Key
	full   int
	wanted map[Key]bool
}

func (r *recorder) Trigger(keys ...Key) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = append(r.keys, keys...)
}

func (r *recorder) TriggerFull() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.full++
}

func (r *recorder) Wants(k Key) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.wanted[k]
}

func (r *recorder) triggered(k Key) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.keys, k)
}

func (r *recorder) fulls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.full
}

func TestWatchTriggers(t *testing.T) {
	nstest.NoLeaks(t)
	k, h, eth0, _ := newKind(t)
	wanted := Route{Dst: netip.MustParsePrefix("10.244.4.0/24"), Gw: netip.MustParseAddr("198.18.0.14"), LinkIndex: eth0.Attrs().Index}
	rec := &recorder{wanted: map[Key]bool{wanted.Key(): true}}

	ctx, cancel := context.WithCancel(context.Background())
	wait, err := k.Watch(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); wait() })

	// Someone deletes a loom route: a partial sync of its key.
	own := Route{Dst: netip.MustParsePrefix("fc00:0:0:2::/64"), Gw: netip.MustParseAddr("2001:db8::12"), LinkIndex: eth0.Attrs().Index}
	if err := k.Create(own); err != nil {
		t.Fatal(err)
	}
	if err := h.RouteDel(k.toNetlink(own)); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the deleted loom route", func() bool { return rec.triggered(own.Key()) })

	// A foreign route appears on a key loom wants: a partial sync of it.
	nstest.Route(t, h, "10.244.4.0/24", "198.18.0.13", eth0, unix.RTPROT_STATIC)
	nstest.Eventually(t, 5*time.Second, "trigger for the wanted key", func() bool { return rec.triggered(wanted.Key()) })

	// An address on the underlay adds a connected route: a full sync.
	before := rec.fulls()
	nstest.Addr(t, h, eth0, "198.19.0.11/24")
	nstest.Eventually(t, 5*time.Second, "full sync for a connected-route change", func() bool { return rec.fulls() > before })

	// A route of no interest triggers nothing.
	rec.mu.Lock()
	n := len(rec.keys)
	rec.mu.Unlock()
	nstest.Route(t, h, "10.244.250.0/24", "198.18.0.13", eth0, unix.RTPROT_STATIC)
	time.Sleep(200 * time.Millisecond)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.keys) != n {
		t.Errorf("an unrelated foreign route triggered %v", rec.keys[n:])
	}
}

// wanter is a recorder that also says what is wanted, as a Reconciler does.
type wanter struct {
	*recorder
	want map[Key]Route
}

func (w wanter) Wanted(k Key) (Route, bool) {
	r, ok := w.want[k]
	return r, ok
}

// The echo of loom's own change (its route added exactly as wanted) asks
// for nothing; the route deleted, or replaced by a different one, does.
func TestWatchIgnoresOwnEcho(t *testing.T) {
	nstest.NoLeaks(t)
	k, h, eth0, _ := newKind(t)
	want := Route{Dst: netip.MustParsePrefix("10.244.6.0/24"), Gw: netip.MustParseAddr("198.18.0.16"), LinkIndex: eth0.Attrs().Index}
	rec := wanter{&recorder{wanted: map[Key]bool{want.Key(): true}}, map[Key]Route{want.Key(): want}}
	ctx, cancel := context.WithCancel(context.Background())
	wait, err := k.Watch(ctx, rec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); wait() })

	if err := k.Create(want); err != nil {
		t.Fatal(err)
	}
	// A marker after it: once its trigger is in, the echo has been seen.
	marker := Route{Dst: netip.MustParsePrefix("10.244.7.0/24"), Gw: netip.MustParseAddr("198.18.0.17"), LinkIndex: eth0.Attrs().Index}
	if err := k.Create(marker); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the marker", func() bool { return rec.triggered(marker.Key()) })
	if rec.triggered(want.Key()) {
		t.Fatal("the echo of creating the wanted route triggered a sync")
	}

	changed := want
	changed.Gw = netip.MustParseAddr("198.18.0.26")
	if err := k.Update(changed); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the changed route", func() bool { return rec.triggered(want.Key()) })
	rec.mu.Lock()
	rec.keys = nil
	rec.mu.Unlock()
	if err := h.RouteDel(k.toNetlink(changed)); err != nil {
		t.Fatal(err)
	}
	nstest.Eventually(t, 5*time.Second, "trigger for the deleted route", func() bool { return rec.triggered(want.Key()) })
}
