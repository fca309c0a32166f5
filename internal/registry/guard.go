package registry

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
)

// Guard screens peer leases before they reach the data path. The registry
// is writable by anyone with store credentials, and by hand: a lease that
// is corrupt or hostile must never become a route, a neighbour or an FDB
// entry, and must never stop the agent. A lease is skipped (and counted in
// loom_leases_skipped_total{reason}, and logged) when
//
//   - its subnet is not inside Network (or IPv6Network), or is of a family
//     the config disables (SkipOutsideNetwork);
//   - its subnet is not one the config hands out: another length (such as
//     a /22 written over live /24s), outside SubnetMin..SubnetMax
//     (SkipBadSubnet; the log names the live leases it overlaps);
//   - it is a subnet the config hands out but overlaps a lease already
//     accepted (SkipOverlap; only possible in dual stack, where two keys
//     can pair one IPv4 subnet with two IPv6 ones): the first one seen
//     keeps the addresses, so a lease written over a live node's subnet
//     cannot steal its traffic, and the other is accepted once the first
//     is removed, if nothing else stands in its way;
//   - it has no usable public address: none of an enabled family (flannel
//     writes 0.0.0.0 for "none"), or one that is loopback, unspecified,
//     multicast, broadcast, or inside the pod network itself
//     (SkipBadPublicIP).
//
// A lease that was accepted and is rewritten into a skipped one is
// withdrawn (a Removed event). Leases whose key or value does not decode
// never reach the Guard: List and Watch skip and count them
// (SkipUndecodable).
//
// Cost: the accepted and held leases are indexed by address range (see
// leaseSet), so screening one lease is O(log N) plus the leases it
// overlaps, and a list of N leases at start is O(N log N): 5,000 leases take
// a few milliseconds, where comparing every lease with every accepted one
// took 12.5 million overlap checks.
type Guard struct {
	cfg       netconf.Config
	anySubnet bool
	onSkip    func(l lease.Lease, reason, detail string)

	mu       sync.Mutex // guards the sets
	accepted leaseSet   // passed on
	held     leaseSet   // skipped only for overlapping an accepted lease
}

// GuardConfig says what a Guard accepts and whom it tells about a skip.
type GuardConfig struct {
	Network netconf.Config
	// AnySubnet accepts a subnet of any length inside Network: in
	// Kubernetes mode kube-controller-manager assigns the subnets (its
	// --node-cidr-mask-size), not SubnetLen, SubnetMin and SubnetMax.
	// Overlaps are still skipped.
	AnySubnet bool
	// OnSkip is called for every skipped lease (count it, log it with the
	// fix for the store the lease came from).
	OnSkip func(l lease.Lease, reason, detail string)
}

// NewGuard returns a screen for peer leases.
func NewGuard(c GuardConfig) *Guard {
	if c.OnSkip == nil {
		c.OnSkip = func(lease.Lease, string, string) {}
	}
	return &Guard{cfg: c.Network, anySubnet: c.AnySubnet, onSkip: c.OnSkip, accepted: newLeaseSet(), held: newLeaseSet()}
}

// Guard returns a screen for peer leases under cfg, counting into the
// registry's metrics and logging with its logger and the etcdctl fix.
func (r *Registry) Guard(cfg netconf.Config) *Guard {
	return NewGuard(GuardConfig{Network: cfg, OnSkip: func(l lease.Lease, reason, detail string) {
		r.metrics.skipped.WithLabelValues(reason).Inc()
		r.log.Warn("skipping peer lease: not programmed into the data path", "lease", l.String(), "reason", reason, "detail", detail,
			"fix", "if this lease is not a node's, delete it: etcdctl del "+r.subnets+l.Key())
	}})
}

// Filter returns the events that may reach the data path: Added for
// accepted leases, Removed for accepted leases that went away or turned
// bad, and Added for held leases whose overlap went away. It is safe for
// concurrent use, but events must be given in the order they happened.
func (g *Guard) Filter(events []lease.Event) []lease.Event {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []lease.Event
	for _, ev := range events {
		key := ev.Lease.Key()
		switch ev.Type {
		case lease.Added:
			reason, detail := g.check(key, ev.Lease)
			if reason == "" {
				g.accepted.put(key, ev.Lease)
				g.held.remove(key)
				out = append(out, ev)
				continue
			}
			g.skip(*ev.Lease, reason, detail)
			if reason != SkipOverlap {
				g.held.remove(key)
			}
			if old, ok := g.accepted.remove(key); ok {
				out = append(out, lease.Event{Type: lease.Removed, Lease: old})
				out = append(out, g.releaseLocked(old)...)
			}
		case lease.Removed:
			g.held.remove(key)
			if old, ok := g.accepted.remove(key); ok {
				out = append(out, lease.Event{Type: lease.Removed, Lease: old})
				out = append(out, g.releaseLocked(old)...)
			}
		}
	}
	return out
}

// releaseLocked accepts the held leases that overlapped gone and now pass,
// in key order (when two of them overlap each other, the first in key
// order wins, and the other stays held).
func (g *Guard) releaseLocked(gone *lease.Lease) []lease.Event {
	var out []lease.Event
	for _, key := range g.held.overlapping(gone, "") {
		l, _ := g.held.get(key)
		if reason, _ := g.check(key, l); reason == "" {
			g.held.remove(key)
			g.accepted.put(key, l)
			out = append(out, lease.Event{Type: lease.Added, Lease: l})
		}
	}
	return out
}

// check returns why l (whose key is key) must be skipped ("" if it may
// pass) and the details. It records a lease skipped only for an overlap in
// g.held, and forgets a held version of it that no longer qualifies.
func (g *Guard) check(key string, l *lease.Lease) (reason, detail string) {
	for _, f := range []struct {
		subnet, network netip.Prefix
		enabled         bool
		name            string
	}{
		{l.Subnet, g.cfg.Network, g.cfg.EnableIPv4, "Network"},
		{l.IPv6Subnet, g.cfg.IPv6Network, g.cfg.EnableIPv6, "IPv6Network"},
	} {
		if !f.subnet.IsValid() {
			continue
		}
		if !f.enabled || !contains(f.network, f.subnet) {
			return SkipOutsideNetwork, fmt.Sprintf("subnet %s is not inside %s %s", f.subnet, f.name, f.network)
		}
	}
	var over []string
	for _, k := range g.accepted.overlapping(l, key) {
		other, _ := g.accepted.get(k)
		over = append(over, other.String())
	}
	slices.Sort(over)
	if !g.anySubnet && !lease.Fits(g.cfg, l.Subnet, l.IPv6Subnet) {
		detail = fmt.Sprintf("not a subnet the network config hands out (SubnetLen %d between %s and %s)", g.cfg.SubnetLen, g.cfg.SubnetMin, g.cfg.SubnetMax)
		if len(over) > 0 {
			detail += "; it overlaps " + strings.Join(over, ", ")
		}
		return SkipBadSubnet, detail
	}
	if len(over) > 0 {
		if r, _ := g.publicIPs(l.Attrs); r == "" {
			g.held.put(key, l)
		} else {
			// An older version may be held: releasing it later would
			// pass on addresses the store no longer has.
			g.held.remove(key)
		}
		return SkipOverlap, "overlaps " + strings.Join(over, ", ")
	}
	return g.publicIPs(l.Attrs)
}

// publicIPs checks the addresses peers would send the lease's traffic to.
func (g *Guard) publicIPs(a lease.Attrs) (reason, detail string) {
	// Peers reach an IPv4 subnet at PublicIP and an IPv6 one at
	// PublicIPv6 (backend legs); a lease with neither for the families
	// in use cannot be reached at all.
	if !(g.cfg.EnableIPv4 && a.PublicIP.IsValid()) && !(g.cfg.EnableIPv6 && a.PublicIPv6 != nil) {
		return SkipBadPublicIP, "no public IP of the network's family (absent, or 0.0.0.0)"
	}
	for _, ip := range []*netip.Addr{&a.PublicIP, a.PublicIPv6} {
		if ip == nil || !ip.IsValid() {
			continue
		}
		if why := g.badPublicIP(*ip); why != "" {
			return SkipBadPublicIP, fmt.Sprintf("public IP %s is %s", ip, why)
		}
	}
	return "", ""
}

func (g *Guard) badPublicIP(ip netip.Addr) string {
	switch {
	case ip.IsUnspecified():
		return "unspecified"
	case ip.IsLoopback():
		return "a loopback address"
	case ip.IsMulticast():
		return "a multicast address"
	case ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "the broadcast address"
	case g.cfg.EnableIPv4 && g.cfg.Network.Contains(ip), g.cfg.EnableIPv6 && g.cfg.IPv6Network.Contains(ip):
		return "inside the pod network"
	}
	return ""
}

func (g *Guard) skip(l lease.Lease, reason, detail string) { g.onSkip(l, reason, detail) }

// contains reports whether inner lies entirely inside outer.
func contains(outer, inner netip.Prefix) bool {
	return outer.IsValid() && inner.IsValid() && outer.Bits() <= inner.Bits() && outer.Contains(inner.Addr())
}

func overlaps(a, b lease.Lease) bool {
	return (a.Subnet.IsValid() && b.Subnet.IsValid() && a.Subnet.Overlaps(b.Subnet)) ||
		(a.IPv6Subnet.IsValid() && b.IPv6Subnet.IsValid() && a.IPv6Subnet.Overlaps(b.IPv6Subnet))
}

// leaseSet holds leases by key, with the subnets of each indexed by address
// range, so the members overlapping a lease are found without looking at
// the others. The two trees follow the two fields overlaps compares:
// Subnet with Subnet, IPv6Subnet with IPv6Subnet.
type leaseSet struct {
	byKey       map[string]*lease.Lease // shared with the events (lease.Event)
	subnets     spanTree                // of the members' Subnet
	ipv6Subnets spanTree                // of the members' IPv6Subnet
}

func newLeaseSet() leaseSet { return leaseSet{byKey: map[string]*lease.Lease{}} }

func (s *leaseSet) get(key string) (*lease.Lease, bool) {
	l, ok := s.byKey[key]
	return l, ok
}

// put adds l under key, replacing the member there.
func (s *leaseSet) put(key string, l *lease.Lease) {
	s.remove(key)
	s.byKey[key] = l
	s.subnets.insert(l.Subnet, key)
	s.ipv6Subnets.insert(l.IPv6Subnet, key)
}

// remove deletes the member under key and returns it.
func (s *leaseSet) remove(key string) (*lease.Lease, bool) {
	l, ok := s.byKey[key]
	if !ok {
		return l, false
	}
	delete(s.byKey, key)
	s.subnets.remove(l.Subnet, key)
	s.ipv6Subnets.remove(l.IPv6Subnet, key)
	return l, true
}

// overlapping returns the keys of the members that overlap l (as overlaps
// says), sorted, without except.
func (s *leaseSet) overlapping(l *lease.Lease, except string) []string {
	var keys []string
	add := func(k string) {
		if k != except {
			keys = append(keys, k)
		}
	}
	s.subnets.overlapping(l.Subnet, add)
	s.ipv6Subnets.overlapping(l.IPv6Subnet, add)
	slices.Sort(keys)
	return slices.Compact(keys) // a dual-stack member can overlap twice
}

// spanTree is a set of address ranges (the subnets of leases, each tagged
// with its lease's key) that finds the ranges overlapping a given one in
// O(log N + answers). It is a treap ordered by (first address, key) whose
// nodes also hold the highest last address in their subtree: a subtree
// whose highest last address is below a query's first address holds no
// overlap and is skipped, and so is everything right of a node that starts
// after the query ends. Random priorities keep it balanced whatever order
// leases arrive in (a store lists keys sorted, which would degenerate a
// plain search tree). Ranges may overlap one another: held leases do.
//
// Ranges of different families never meet: netip orders every IPv4 address
// before every IPv6 one, as Prefix.Overlaps never matches across families.
type spanTree struct{ root *span }

type span struct {
	first, last netip.Addr
	key         string
	maxLast     netip.Addr // the highest last in this subtree
	prio        uint64
	left, right *span
}

// before orders spans by first address, then key.
func (a *span) before(first netip.Addr, key string) bool {
	if c := a.first.Compare(first); c != 0 {
		return c < 0
	}
	return a.key < key
}

func (a *span) fix() {
	a.maxLast = a.last
	for _, c := range []*span{a.left, a.right} {
		if c != nil && c.maxLast.Compare(a.maxLast) > 0 {
			a.maxLast = c.maxLast
		}
	}
}

// insert adds p's range tagged key; an invalid p is not indexed.
func (t *spanTree) insert(p netip.Prefix, key string) {
	if !p.IsValid() {
		return
	}
	first, last := rangeOf(p)
	n := &span{first: first, last: last, key: key, maxLast: last, prio: rand.Uint64()}
	t.root = insertSpan(t.root, n)
}

func insertSpan(t, n *span) *span {
	if t == nil {
		return n
	}
	if n.prio > t.prio {
		n.left, n.right = splitSpans(t, n.first, n.key)
		n.fix()
		return n
	}
	if t.before(n.first, n.key) {
		t.right = insertSpan(t.right, n)
	} else {
		t.left = insertSpan(t.left, n)
	}
	t.fix()
	return t
}

// splitSpans splits t into the spans ordered before (first, key) and the
// others.
func splitSpans(t *span, first netip.Addr, key string) (lo, hi *span) {
	if t == nil {
		return nil, nil
	}
	if t.before(first, key) {
		t.right, hi = splitSpans(t.right, first, key)
		t.fix()
		return t, hi
	}
	lo, t.left = splitSpans(t.left, first, key)
	t.fix()
	return lo, t
}

func mergeSpans(lo, hi *span) *span {
	switch {
	case lo == nil:
		return hi
	case hi == nil:
		return lo
	case lo.prio > hi.prio:
		lo.right = mergeSpans(lo.right, hi)
		lo.fix()
		return lo
	}
	hi.left = mergeSpans(lo, hi.left)
	hi.fix()
	return hi
}

// remove deletes p's range tagged key, if present.
func (t *spanTree) remove(p netip.Prefix, key string) {
	if !p.IsValid() {
		return
	}
	first, _ := rangeOf(p)
	t.root = removeSpan(t.root, first, key)
}

func removeSpan(t *span, first netip.Addr, key string) *span {
	switch {
	case t == nil:
		return nil
	case t.first == first && t.key == key:
		return mergeSpans(t.left, t.right)
	case t.before(first, key):
		t.right = removeSpan(t.right, first, key)
	default:
		t.left = removeSpan(t.left, first, key)
	}
	t.fix()
	return t
}

// overlapping calls fn with the key of every range overlapping p's, in
// order.
func (t *spanTree) overlapping(p netip.Prefix, fn func(key string)) {
	if !p.IsValid() {
		return
	}
	first, last := rangeOf(p)
	visitSpans(t.root, first, last, fn)
}

func visitSpans(t *span, first, last netip.Addr, fn func(string)) {
	if t == nil || t.maxLast.Less(first) {
		return
	}
	visitSpans(t.left, first, last, fn)
	if last.Less(t.first) {
		return // this span and everything right of it start after the query
	}
	if !t.last.Less(first) {
		fn(t.key)
	}
	visitSpans(t.right, first, last, fn)
}

// rangeOf returns the first and the last address of p.
func rangeOf(p netip.Prefix) (first, last netip.Addr) {
	first = p.Masked().Addr()
	if first.Is4() {
		a := first.As4()
		setHostBits(a[:], p.Bits())
		return first, netip.AddrFrom4(a)
	}
	a := first.As16()
	setHostBits(a[:], p.Bits())
	return first, netip.AddrFrom16(a)
}

// setHostBits sets every bit of a after the first bits.
func setHostBits(a []byte, bits int) {
	for i := range a {
		switch n := bits - 8*i; {
		case n <= 0:
			a[i] = 0xff
		case n < 8:
			a[i] |= 0xff >> n
		}
	}
}
