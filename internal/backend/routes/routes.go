// Package routes is the reconcile.Kind for IP routes: the kernel side of
// every backend that programs routes (host-gw today; vxlan's per-peer routes
// and DirectRouting later).
//
// Design notes.
//
// Kernel objects owned: unicast routes in one table (main by default) whose
// rtm_protocol is Protocol. `ip route` shows them as "proto 108". The
// protocol number is the ownership marker: the kernel stores it with the
// route, reports it in dumps and events, and honours it in deletes, so loom
// finds its routes after an agent restart without any state on disk, and a
// delete can never hit a route someone else added. Everything else in the
// table (connected routes, the default route, a CNI's or an operator's routes)
// is foreign: it is read, to see conflicts, and never changed.
//
// Identity: the kernel keeps one route per (table, destination, metric, TOS);
// loom uses no TOS, so Key is destination and metric.
//
// Events: Watch subscribes to RTNLGRP_IPV4_ROUTE and RTNLGRP_IPV6_ROUTE in
// the reconciler's namespace. netlink opens the socket inside it (briefly, on
// a locked thread) and the socket stays bound there, as do the sockets of the
// netlink.Handle the caller made with NewHandleAt: no goroutine of ours ever
// runs inside another namespace. Events become triggers: any change to a loom
// route, or to a key loom wants, asks for a partial sync of that key, so a
// route someone deletes comes back at once; a change to a connected route
// (proto kernel: an address or link changed) asks for a full sync, because
// which gateways are on-link may have changed (only on the underlay link when
// the caller names it, so pod veths coming and going cost nothing). The echo
// of our own changes (a loom route added or replaced exactly as the
// reconciler wants it) asks for nothing (reconcile.Satisfied).
//
// Scale: a sync is one dump per address family (O(routes in the table)) and
// one netlink request per changed route. A thousand peers is a thousand
// routes: one dump is a few hundred kilobytes and well under 10 ms.
//
// Kernel quirks, each handled where it bites:
//   - IPv4 routes removed because their link went down or lost its address are
//     removed without an RTM_DELROUTE: only the periodic full sync sees it.
//   - An IPv6 route added with metric 0 is stored with metric 1024, so Key
//     normalises the metric before comparing.
//   - The event socket can overflow (ENOBUFS) when a burst outruns us; the
//     library then closes the subscription. Watch re-subscribes and asks for
//     a full sync, since events were lost.
package routes

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	// Protocol is the rtm_protocol of every route loom installs: the
	// ownership marker. 108 is 'l'; it is unassigned in iproute2's
	// rt_protos and unused by flannel (boot), Calico (80), BIRD (12) and
	// the routing daemons listed there.
	Protocol netlink.RouteProtocol = 108

	// ipv6DefaultMetric is the metric the kernel stores for an IPv6 route
	// added with metric 0 (IP6_RT_PRIO_USER).
	ipv6DefaultMetric = 1024

	// eventBuffer is the receive buffer asked for the event socket, so a
	// burst (a link flap with a thousand routes) fits without ENOBUFS.
	eventBuffer = 1 << 20
)

// Key is a route's identity in its table.
type Key struct {
	Dst    netip.Prefix
	Metric int
}

// Route is a unicast route, in loom's terms. The table and the protocol are
// the Kind's; Route holds what differs from route to route.
type Route struct {
	Dst       netip.Prefix
	Gw        netip.Addr // invalid: no gateway (the destination is on the link)
	LinkIndex int
	Metric    int  // 0: the kernel's default for the family
	OnLink    bool // RTNH_F_ONLINK: the gateway need not be on a connected subnet
}

// Key returns r's identity, with the kernel's normalisations applied.
func (r Route) Key() Key {
	k := Key{Dst: r.Dst.Masked(), Metric: r.Metric}
	if k.Dst.Addr().Is6() && k.Metric == 0 {
		k.Metric = ipv6DefaultMetric
	}
	return k
}

// String renders r the way `ip route` does.
func (r Route) String() string {
	s := r.Dst.String()
	if r.Gw.IsValid() {
		s += " via " + r.Gw.String()
	}
	s += fmt.Sprintf(" dev #%d", r.LinkIndex)
	if r.Metric != 0 {
		s += fmt.Sprintf(" metric %d", r.Metric)
	}
	if r.OnLink {
		s += " onlink"
	}
	return s
}

// Config configures a Kind.
type Config struct {
	// Handle is a netlink handle bound to the namespace to program
	// (netlink.NewHandleAt). Required. Used from the reconciler's goroutine
	// only: a netlink.Handle is not safe for concurrent use.
	Handle *netlink.Handle
	// NetNSPath names the same namespace for the event subscription
	// (e.g. /run/netns/x); empty means the agent's own namespace.
	NetNSPath string
	// Table is the routing table to manage; 0 means main.
	Table int
	// Protocol overrides the ownership marker; 0 means Protocol. Two
	// reconcilers in one table and namespace must use different markers.
	Protocol netlink.RouteProtocol
	// UnderlayLink is the index of the link whose connected routes decide
	// which gateways are on-link: a change to one of them (an address
	// added or removed, the link going up) asks for a full sync. 0 means
	// any link, which also counts every pod veth's link-local route.
	UnderlayLink int
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Kind reads and writes loom's routes in one table of one namespace. It
// implements reconcile.Kind[Key, Route] and reconcile.Watcher[Key].
type Kind struct {
	h        *netlink.Handle
	nsPath   string
	table    int
	proto    netlink.RouteProtocol
	underlay int
	log      *slog.Logger
}

var (
	_ reconcile.Kind[Key, Route] = (*Kind)(nil)
	_ reconcile.Watcher[Key]     = (*Kind)(nil)
)

// NewKind returns a Kind for cfg.
func NewKind(cfg Config) (*Kind, error) {
	if cfg.Handle == nil {
		return nil, errors.New("routes: Config.Handle is nil: pass a netlink handle bound to the namespace to program")
	}
	k := &Kind{h: cfg.Handle, nsPath: cfg.NetNSPath, table: cfg.Table, proto: cfg.Protocol, underlay: cfg.UnderlayLink, log: cfg.Logger}
	if k.table == 0 {
		k.table = unix.RT_TABLE_MAIN
	}
	if k.proto == 0 {
		k.proto = Protocol
	}
	if k.log == nil {
		k.log = slog.Default()
	}
	return k, nil
}

// Key implements reconcile.Comparer.
func (k *Kind) Key(r Route) Key { return r.Key() }

// Equal implements reconcile.Comparer: same next hop, same device, same
// on-link flag. Destination and metric are the key.
func (k *Kind) Equal(want, have Route) bool {
	return want.Gw == have.Gw && want.LinkIndex == have.LinkIndex && want.OnLink == have.OnLink
}

// Dump lists the routes of the table, IPv4 and IPv6: owned ones carry the
// Kind's protocol.
func (k *Kind) Dump() (owned, foreign []Route, err error) {
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		nrs, err := k.h.RouteListFiltered(family, &netlink.Route{Table: k.table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			// ErrDumpInterrupted lands here too: the table changed
			// during the dump, and the next full sync tries again.
			return nil, nil, fmt.Errorf("dump %s routes of table %d: %w", familyName(family), k.table, err)
		}
		for _, nr := range nrs {
			r, ok := fromNetlink(nr)
			if !ok {
				continue
			}
			if nr.Protocol == k.proto {
				owned = append(owned, r)
			} else {
				foreign = append(foreign, r)
			}
		}
	}
	return owned, foreign, nil
}

// Create adds r. NLM_F_EXCL: if a route appeared on its key since the dump,
// this fails rather than replacing someone else's route.
func (k *Kind) Create(r Route) error {
	if err := k.h.RouteAdd(k.toNetlink(r)); err != nil {
		return fmt.Errorf("add route %v: %w", r, err)
	}
	return nil
}

// Update replaces loom's route at r's key.
func (k *Kind) Update(r Route) error {
	if err := k.h.RouteReplace(k.toNetlink(r)); err != nil {
		return fmt.Errorf("replace route %v: %w", r, err)
	}
	return nil
}

// Delete removes one of loom's routes. The request names the protocol, next
// hop and device, and the kernel deletes only a route matching all of them.
func (k *Kind) Delete(r Route) error {
	err := k.h.RouteDel(k.toNetlink(r))
	if err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("delete route %v: %w", r, err)
	}
	return nil
}

func (k *Kind) toNetlink(r Route) *netlink.Route {
	key := r.Key()
	nr := &netlink.Route{
		Dst:       &net.IPNet{IP: key.Dst.Addr().AsSlice(), Mask: net.CIDRMask(key.Dst.Bits(), key.Dst.Addr().BitLen())},
		LinkIndex: r.LinkIndex,
		Priority:  key.Metric,
		Table:     k.table,
		Protocol:  k.proto,
	}
	if r.Gw.IsValid() {
		nr.Gw = r.Gw.AsSlice()
	}
	if r.OnLink {
		nr.Flags |= int(netlink.FLAG_ONLINK)
	}
	return nr
}

// fromNetlink converts a kernel route; ok is false for routes loom cannot
// express (no destination family, MPLS).
func fromNetlink(nr netlink.Route) (r Route, ok bool) {
	switch {
	case nr.Dst != nil:
		a, ok := netip.AddrFromSlice(nr.Dst.IP)
		if !ok {
			return Route{}, false
		}
		bits, _ := nr.Dst.Mask.Size()
		r.Dst = netip.PrefixFrom(a.Unmap(), bits)
	case nr.Family == netlink.FAMILY_V4:
		r.Dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0) // the default route
	case nr.Family == netlink.FAMILY_V6:
		r.Dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	default:
		return Route{}, false
	}
	if gw, ok := netip.AddrFromSlice(nr.Gw); ok {
		r.Gw = gw.Unmap()
	}
	r.LinkIndex = nr.LinkIndex
	r.Metric = nr.Priority
	r.OnLink = nr.Flags&int(netlink.FLAG_ONLINK) != 0
	return r, true
}

func familyName(f int) string {
	if f == netlink.FAMILY_V6 {
		return "IPv6"
	}
	return "IPv4"
}

// Watch implements reconcile.Watcher: it subscribes to route events in the
// Kind's namespace and turns them into triggers (see the package notes).
func (k *Kind) Watch(ctx context.Context, n reconcile.Notifier[Key]) (wait func(), err error) {
	sub, err := k.subscribe(ctx)
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		k.watch(ctx, n, sub)
	}()
	return func() { <-done }, nil
}

// subscription is one netlink event socket: updates arrive on ch until stop
// is closed, after which ch is closed by the library's reader goroutine.
type subscription struct {
	ch   chan netlink.RouteUpdate
	stop chan struct{}
}

func (k *Kind) subscribe(ctx context.Context) (subscription, error) {
	nsh := netns.None()
	if k.nsPath != "" {
		h, err := netns.GetFromPath(k.nsPath)
		if err != nil {
			return subscription{}, fmt.Errorf("open namespace %s: %w", k.nsPath, err)
		}
		// The socket is created inside the namespace and stays there;
		// the handle is needed only while it is opened.
		defer h.Close()
		nsh = h
	}
	s := subscription{ch: make(chan netlink.RouteUpdate, 256), stop: make(chan struct{})}
	err := netlink.RouteSubscribeWithOptions(s.ch, s.stop, netlink.RouteSubscribeOptions{
		Namespace:         &nsh,
		ReceiveBufferSize: eventBuffer,
		ErrorCallback: func(err error) {
			if ctx.Err() == nil { // closing the socket at shutdown is not news
				k.log.Warn("route event subscription", "err", err)
			}
		},
	})
	if err != nil {
		close(s.stop)
		return subscription{}, fmt.Errorf("subscribe to route events in %s: %w", nsName(k.nsPath), err)
	}
	return s, nil
}

func nsName(path string) string {
	if path == "" {
		return "the agent's namespace"
	}
	return path
}

func (k *Kind) watch(ctx context.Context, n reconcile.Notifier[Key], sub subscription) {
	backoff := 100 * time.Millisecond
	for {
		select {
		case u, ok := <-sub.ch:
			if ok {
				k.notify(n, u)
				continue
			}
			// The library closed the subscription: the socket failed,
			// typically ENOBUFS after a burst. Events were lost.
			n.TriggerFull()
			for {
				var err error
				if sub, err = k.subscribe(ctx); err == nil {
					break
				}
				k.log.Error("re-subscribe to route events; the periodic resync still runs", "err", err, "retry_in", backoff)
				select {
				case <-ctx.Done():
					return
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, 10*time.Second)
			}
			backoff = 100 * time.Millisecond
			n.TriggerFull() // cover the gap before the new socket existed
		case <-ctx.Done():
			close(sub.stop)
			// Drain until the library's reader exits, so it never
			// blocks forever on a send nobody receives.
			for range sub.ch {
			}
			return
		}
	}
}

// notify turns one route event into a trigger.
func (k *Kind) notify(n reconcile.Notifier[Key], u netlink.RouteUpdate) {
	if u.Table != k.table {
		return
	}
	r, ok := fromNetlink(u.Route)
	if !ok {
		return
	}
	key := r.Key()
	switch {
	case u.Type == unix.RTM_NEWROUTE && u.Protocol == k.proto && reconcile.Satisfied(n, k, r):
		// The kernel now holds the route loom wants, as loom's: the
		// echo of our own change, nothing to do.
	case u.Protocol == k.proto, n.Wants(key):
		n.Trigger(key)
	case u.Protocol == unix.RTPROT_KERNEL && (k.underlay == 0 || u.LinkIndex == k.underlay):
		n.TriggerFull()
	}
}
