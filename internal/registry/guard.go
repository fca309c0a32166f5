package registry

import (
	"fmt"
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
type Guard struct {
	cfg       netconf.Config
	anySubnet bool
	onSkip    func(l lease.Lease, reason, detail string)

	mu       sync.Mutex             // guards the maps
	accepted map[string]lease.Lease // passed on, by key
	held     map[string]lease.Lease // skipped only for overlapping an accepted lease
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
	return &Guard{cfg: c.Network, anySubnet: c.AnySubnet, onSkip: c.OnSkip, accepted: map[string]lease.Lease{}, held: map[string]lease.Lease{}}
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
			reason, detail := g.check(ev.Lease)
			if reason == "" {
				g.accepted[key] = ev.Lease
				delete(g.held, key)
				out = append(out, ev)
				continue
			}
			g.skip(ev.Lease, reason, detail)
			if reason != SkipOverlap {
				delete(g.held, key)
			}
			if old, ok := g.accepted[key]; ok {
				delete(g.accepted, key)
				out = append(out, lease.Event{Type: lease.Removed, Lease: old})
				out = append(out, g.releaseLocked(old)...)
			}
		case lease.Removed:
			delete(g.held, key)
			if old, ok := g.accepted[key]; ok {
				delete(g.accepted, key)
				out = append(out, lease.Event{Type: lease.Removed, Lease: old})
				out = append(out, g.releaseLocked(old)...)
			}
		}
	}
	return out
}

// releaseLocked accepts the held leases that overlapped gone and now pass.
func (g *Guard) releaseLocked(gone lease.Lease) []lease.Event {
	var out []lease.Event
	for key, l := range g.held {
		if !overlaps(l, gone) {
			continue
		}
		if reason, _ := g.check(l); reason == "" {
			delete(g.held, key)
			g.accepted[key] = l
			out = append(out, lease.Event{Type: lease.Added, Lease: l})
		}
	}
	return out
}

// check returns why l must be skipped ("" if it may pass) and the details.
// It records a lease skipped only for an overlap in g.held.
func (g *Guard) check(l lease.Lease) (reason, detail string) {
	key := l.Key()
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
	for k, other := range g.accepted {
		if k != key && overlaps(l, other) {
			over = append(over, other.String())
		}
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
			g.held[key] = l
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
