package udp

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/loomnet/loom/internal/lease"
)

// table is the forwarding table of the data path: which underlay endpoint
// serves an inner destination, and which destinations are this node's. It
// is immutable once built; the Network swaps in a new one (atomic.Pointer)
// on every peer change, so the packet path reads it without a lock.
type table struct {
	// local holds this node's own subnets, IPv4 and IPv6 (invalid when
	// unset): what the receive path delivers.
	local [2]netip.Prefix
	// fam holds the peer subnets of each family (0 IPv4, 1 IPv6) by prefix
	// length, longest first, so the first hit is the longest match.
	fam [2][]level
	// peers is the number of peers with at least one entry.
	peers int
}

// level is every peer subnet of one family and one prefix length.
type level struct {
	bits int
	to   map[netip.Prefix]netip.AddrPort
}

func family(a netip.Addr) int {
	if a.Is4() {
		return 0
	}
	return 1
}

// lookup returns the endpoint of the peer whose subnet holds dst, by
// longest prefix. A cluster has one subnet length per family, so this is
// usually one map lookup.
func (t *table) lookup(dst netip.Addr) (netip.AddrPort, bool) {
	for _, l := range t.fam[family(dst)] {
		p, _ := dst.Prefix(l.bits)
		if ep, ok := l.to[p]; ok {
			return ep, true
		}
	}
	return netip.AddrPort{}, false
}

// isLocal reports whether dst is in one of this node's subnets.
func (t *table) isLocal(dst netip.Addr) bool {
	l := t.local[family(dst)]
	return l.IsValid() && l.Contains(dst)
}

// problem is a peer, or one subnet of a peer, that gets no entry, and why.
// Each is logged once when it appears and once when it goes.
type problem struct {
	id     string // what the problem is about: lease key and subnet
	node   string
	subnet netip.Prefix
	reason string
	fix    string
	warn   bool // a warning (another backend), not an error
}

// planInput is everything plan needs.
type planInput struct {
	local     lease.Lease
	hasLocal  bool
	peers     []lease.Lease
	port      uint16
	underlay6 bool       // the underlay is IPv6: peers are reached at PublicIPv6
	self      netip.Addr // our own underlay address
}

// plan builds the forwarding table from the peer leases: each peer subnet,
// of either family, maps to the peer's underlay address of the underlay's
// family and the cluster's port. It is pure. A peer with another backend
// type is skipped (flannel's udp backend writes no BackendType, so an
// empty one counts as udp); a subnet that overlaps ours, or a peer without
// an underlay address or claiming ours, gets no entry. Problems come out
// sorted, so the output is deterministic.
func plan(in planInput) (*table, []problem) {
	t := &table{}
	if in.hasLocal {
		t.local = [2]netip.Prefix{in.local.Subnet.Masked(), in.local.IPv6Subnet.Masked()}
	}
	peers := slices.Clone(in.peers)
	slices.SortFunc(peers, func(a, b lease.Lease) int { return cmp.Compare(a.Key(), b.Key()) })

	var ps []problem
	byLen := [2]map[int]map[netip.Prefix]netip.AddrPort{{}, {}}
	for _, p := range peers {
		if in.hasLocal && isSelf(in.local, p) {
			continue
		}
		bad := func(subnet netip.Prefix, reason, fix string) {
			ps = append(ps, problem{id: p.Key() + " " + subnet.String(), node: p.Attrs.NodeName, subnet: subnet, reason: reason, fix: fix})
		}
		if bt := p.Attrs.BackendType; bt != Type && bt != "" {
			ps = append(ps, problem{id: p.Key(), node: p.Attrs.NodeName, reason: "the peer runs backend " + bt + ", not udp",
				fix: "run every node of the cluster with the same backend type", warn: true})
			continue
		}
		ip, fam := p.Attrs.PublicIP, "IPv4"
		if in.underlay6 {
			ip, fam = netip.Addr{}, "IPv6"
			if p.Attrs.PublicIPv6 != nil {
				ip = *p.Attrs.PublicIPv6
			}
		}
		added := false
		for _, subnet := range []netip.Prefix{p.Subnet, p.IPv6Subnet} {
			if !subnet.IsValid() {
				continue
			}
			subnet = subnet.Masked()
			own := t.local[family(subnet.Addr())]
			switch {
			case !ip.IsValid():
				bad(subnet, "the lease has no "+fam+" public address, and the underlay is "+fam,
					"start the peer's agent with an "+fam+" address on its -iface")
			case ip == in.self:
				bad(subnet, "the peer's public address "+ip.String()+" is this node's",
					"two nodes claim one public IP: set -iface or -public-ip on one of them")
			case own.IsValid() && own.Overlaps(subnet):
				bad(subnet, "the subnet overlaps this node's own subnet "+own.String(),
					"the registry holds two overlapping leases: delete the stale one")
			default:
				levels := byLen[family(subnet.Addr())]
				if levels[subnet.Bits()] == nil {
					levels[subnet.Bits()] = map[netip.Prefix]netip.AddrPort{}
				}
				levels[subnet.Bits()][subnet] = netip.AddrPortFrom(ip, in.port)
				added = true
			}
		}
		if added {
			t.peers++
		}
	}
	for f, levels := range byLen {
		for bits, to := range levels {
			t.fam[f] = append(t.fam[f], level{bits: bits, to: to})
		}
		slices.SortFunc(t.fam[f], func(a, b level) int { return cmp.Compare(b.bits, a.bits) })
	}
	return t, ps
}

func isSelf(local, l lease.Lease) bool {
	return l.Key() == local.Key() || (l.Attrs.NodeName != "" && l.Attrs.NodeName == local.Attrs.NodeName)
}
