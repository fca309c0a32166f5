package lease

// Subnet allocation: which subnet a node without a lease gets.
//
// The candidates are the subnets of length SubnetLen from SubnetMin to
// SubnetMax. With both families enabled, candidate i pairs the i-th IPv4
// subnet with the i-th IPv6 subnet, the way flannel pairs them, so a loom
// node's dual-stack key is a function of one index and two nodes racing for
// one index collide on one etcd key.
//
// A /8 split into /30s is four million candidates and an IPv6 range can be
// far larger, so the candidates are never materialised. Each taken lease
// blocks an interval of candidate indices; the merged intervals say how many
// candidates are free, and the k-th free one (k uniform) is found by walking
// them. That is O(L log L) for L taken leases, uniform over the free
// candidates, and deterministic for a seeded rand. Indices are uint64: a
// range of more than 2^64-1 subnets (only possible in IPv6) is cut to its
// first 2^64-1.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"slices"

	"github.com/loomnet/loom/internal/netconf"
)

// ErrNoFreeSubnet is matched (errors.Is) by the error Allocate returns when
// every candidate subnet is taken.
var ErrNoFreeSubnet = errors.New("no free subnet")

// NoFreeSubnetError is the exhaustion error, with the counts an operator
// needs to decide between widening the range and removing stale leases.
type NoFreeSubnetError struct {
	Network, IPv6Network       netip.Prefix // IPv6Network is set when IPv6 is enabled
	Min, Max, IPv6Min, IPv6Max netip.Addr
	Leased, Reserved           int // taken entries that block at least one candidate
}

func (e *NoFreeSubnetError) Error() string {
	var s string
	switch {
	case e.Network.IsValid() && e.IPv6Network.IsValid():
		s = fmt.Sprintf("no free subnet in %s between %s and %s paired with %s between %s and %s",
			e.Network, e.Min, e.Max, e.IPv6Network, e.IPv6Min, e.IPv6Max)
	case e.Network.IsValid():
		s = fmt.Sprintf("no free subnet in %s between %s and %s", e.Network, e.Min, e.Max)
	default:
		s = fmt.Sprintf("no free subnet in %s between %s and %s", e.IPv6Network, e.IPv6Min, e.IPv6Max)
	}
	return fmt.Sprintf("%s (%d leased, %d reserved)", s, e.Leased, e.Reserved)
}

// Is makes errors.Is(err, ErrNoFreeSubnet) true.
func (e *NoFreeSubnetError) Is(target error) bool { return target == ErrNoFreeSubnet }

// Allocate picks a random free subnet (and its IPv6 partner when IPv6 is
// enabled) from cfg's range. Every entry of taken blocks the candidates it
// overlaps, whether it is a live lease or a reservation. A nil rnd uses the
// runtime's random source; pass a seeded one for repeatable picks.
func Allocate(cfg netconf.Config, taken []Lease, rnd *rand.Rand) (v4, v6 netip.Prefix, err error) {
	var fams []span
	if cfg.EnableIPv4 {
		s, err := newSpan(cfg.Network, cfg.SubnetLen, cfg.SubnetMin, cfg.SubnetMax)
		if err != nil {
			return v4, v6, fmt.Errorf("allocate an IPv4 subnet: %w", err)
		}
		fams = append(fams, s)
	}
	if cfg.EnableIPv6 {
		s, err := newSpan(cfg.IPv6Network, cfg.IPv6SubnetLen, cfg.IPv6SubnetMin, cfg.IPv6SubnetMax)
		if err != nil {
			return v4, v6, fmt.Errorf("allocate an IPv6 subnet: %w", err)
		}
		fams = append(fams, s)
	}
	if len(fams) == 0 {
		return v4, v6, errors.New("allocate a subnet: neither IPv4 nor IPv6 is enabled in the network config")
	}
	n := fams[0].n
	for _, f := range fams[1:] {
		n = min(n, f.n) // pairs by index: the shorter range bounds both
	}

	var blocked []interval
	leased, reserved := 0, 0
	for _, l := range taken {
		hit := false
		for _, f := range fams {
			p := l.Subnet
			if f.is6 {
				p = l.IPv6Subnet
			}
			if iv, ok := f.indexRange(p, n); ok {
				blocked = append(blocked, iv)
				hit = true
			}
		}
		switch {
		case !hit:
		case l.Reserved():
			reserved++
		default:
			leased++
		}
	}
	blocked = merge(blocked)
	free := n
	for _, iv := range blocked {
		free -= iv.hi - iv.lo + 1
	}
	if free == 0 {
		e := &NoFreeSubnetError{Leased: leased, Reserved: reserved}
		for _, f := range fams {
			if f.is6 {
				e.IPv6Network, e.IPv6Min, e.IPv6Max = f.network, f.min, f.max
			} else {
				e.Network, e.Min, e.Max = f.network, f.min, f.max
			}
		}
		return v4, v6, e
	}

	var k uint64
	if rnd != nil {
		k = rnd.Uint64N(free)
	} else {
		k = rand.Uint64N(free)
	}
	// Turn "the k-th free index" into an index by stepping over every
	// blocked interval at or below it.
	i := k
	for _, iv := range blocked {
		if i < iv.lo {
			break
		}
		i += iv.hi - iv.lo + 1
	}
	for _, f := range fams {
		if f.is6 {
			v6 = f.subnet(i)
		} else {
			v4 = f.subnet(i)
		}
	}
	return v4, v6, nil
}

// Fits reports whether a lease on v4 and v6 is valid under cfg: each enabled
// family has a subnet of the configured length between SubnetMin and
// SubnetMax, and a disabled family has none. The registry uses it to decide
// whether a node's old lease survives a config change.
func Fits(cfg netconf.Config, v4, v6 netip.Prefix) bool {
	return fitsFamily(cfg.EnableIPv4, v4, cfg.SubnetLen, cfg.SubnetMin, cfg.SubnetMax, false) &&
		fitsFamily(cfg.EnableIPv6, v6, cfg.IPv6SubnetLen, cfg.IPv6SubnetMin, cfg.IPv6SubnetMax, true)
}

func fitsFamily(enabled bool, p netip.Prefix, length int, lo, hi netip.Addr, is6 bool) bool {
	if !enabled {
		return !p.IsValid()
	}
	return p.IsValid() && p.Addr().Is6() == is6 && p.Bits() == length && p.Masked() == p &&
		lo.Is6() == is6 && hi.Is6() == is6 && lo.Compare(p.Addr()) <= 0 && p.Addr().Compare(hi) <= 0
}

// span is one family's candidate range.
type span struct {
	network  netip.Prefix
	min, max netip.Addr // SubnetMin and SubnetMax as configured
	is6      bool
	shift    int    // address bits below the subnet length
	first    u128   // SubnetMin masked to the subnet length
	n        uint64 // candidates in the range, saturated at MaxUint64
}

func newSpan(network netip.Prefix, length int, lo, hi netip.Addr) (span, error) {
	if !network.IsValid() {
		return span{}, errors.New("the network is not set")
	}
	if !lo.IsValid() || !hi.IsValid() {
		return span{}, fmt.Errorf("SubnetMin or SubnetMax is not set for %s", network)
	}
	is6 := network.Addr().Is6()
	addrBits := network.Addr().BitLen()
	if length < network.Bits() || length > addrBits {
		return span{}, fmt.Errorf("subnet length %d does not fit network %s", length, network)
	}
	if lo.Is6() != is6 || hi.Is6() != is6 || !network.Contains(lo) || !network.Contains(hi) || hi.Less(lo) {
		return span{}, fmt.Errorf("subnet range %s to %s is not an ordered range inside %s", lo, hi, network)
	}
	s := span{network: network, min: lo, max: hi, is6: is6, shift: addrBits - length}
	first, _ := lo.Prefix(length) // cannot fail: length was checked against the family above
	s.first = fromAddr(first.Addr())
	c := fromAddr(hi).sub(s.first).shr(s.shift)
	if c.hi != 0 || c.lo == math.MaxUint64 {
		s.n = math.MaxUint64
	} else {
		s.n = c.lo + 1
	}
	return s, nil
}

// subnet returns candidate i.
func (s span) subnet(i uint64) netip.Prefix {
	a := s.first.add(u128{lo: i}.shl(s.shift)).addr(s.is6)
	return netip.PrefixFrom(a, a.BitLen()-s.shift)
}

// indexRange returns the candidate indices below n that p overlaps.
func (s span) indexRange(p netip.Prefix, n uint64) (interval, bool) {
	if !p.IsValid() || p.Addr().Is6() != s.is6 {
		return interval{}, false
	}
	p = p.Masked()
	start := fromAddr(p.Addr())
	end := start.add(u128{lo: 1}.shl(p.Addr().BitLen() - p.Bits()).sub(u128{lo: 1}))
	if end.less(s.first) {
		return interval{}, false
	}
	var lo uint64
	if !start.less(s.first) {
		d := start.sub(s.first).shr(s.shift)
		if d.hi != 0 || d.lo >= n {
			return interval{}, false
		}
		lo = d.lo
	}
	hi := n - 1
	if d := end.sub(s.first).shr(s.shift); d.hi == 0 && d.lo < hi {
		hi = d.lo
	}
	return interval{lo, hi}, true
}

// interval is an inclusive range of candidate indices.
type interval struct{ lo, hi uint64 }

// merge sorts ivs and joins overlapping or adjacent intervals.
func merge(ivs []interval) []interval {
	slices.SortFunc(ivs, func(a, b interval) int {
		switch {
		case a.lo < b.lo:
			return -1
		case a.lo > b.lo:
			return 1
		}
		return 0
	})
	out := ivs[:0]
	for _, iv := range ivs {
		if k := len(out) - 1; k >= 0 && (iv.lo <= out[k].hi || iv.lo-out[k].hi == 1) {
			out[k].hi = max(out[k].hi, iv.hi)
			continue
		}
		out = append(out, iv)
	}
	return out
}

// u128 is an address as a number, so IPv4 and IPv6 share one code path: an
// IPv4 address is its IPv4-mapped IPv6 form, and offsets inside one IPv4
// range never leave it.
type u128 struct{ hi, lo uint64 }

func fromAddr(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func (u u128) addr(is6 bool) netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], u.hi)
	binary.BigEndian.PutUint64(b[8:], u.lo)
	a := netip.AddrFrom16(b)
	if !is6 {
		a = a.Unmap()
	}
	return a
}

func (u u128) add(v u128) u128 {
	lo, carry := bits.Add64(u.lo, v.lo, 0)
	hi, _ := bits.Add64(u.hi, v.hi, carry)
	return u128{hi, lo}
}

func (u u128) sub(v u128) u128 {
	lo, borrow := bits.Sub64(u.lo, v.lo, 0)
	hi, _ := bits.Sub64(u.hi, v.hi, borrow)
	return u128{hi, lo}
}

func (u u128) less(v u128) bool { return u.hi < v.hi || (u.hi == v.hi && u.lo < v.lo) }

func (u u128) shr(n int) u128 {
	switch {
	case n >= 128:
		return u128{}
	case n >= 64:
		return u128{lo: u.hi >> (n - 64)}
	case n == 0:
		return u
	}
	return u128{hi: u.hi >> n, lo: u.lo>>n | u.hi<<(64-n)}
}

func (u u128) shl(n int) u128 {
	switch {
	case n >= 128:
		return u128{}
	case n >= 64:
		return u128{hi: u.lo << (n - 64)}
	case n == 0:
		return u
	}
	return u128{hi: u.hi<<n | u.lo>>(64-n), lo: u.lo << n}
}
