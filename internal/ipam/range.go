package ipam

import (
	"fmt"
	"math"
	"net/netip"
)

// Range is one pool of addresses: a subnet and, inside it, the gateway that
// must never be handed to a pod. IPv4 and IPv6 ranges behave the same except
// for the one rule in last: IPv4 keeps its broadcast address out of the pool.
type Range struct {
	Subnet  netip.Prefix // the node's subnet, e.g. 10.244.1.0/24; need not be masked
	Gateway netip.Addr   // e.g. 10.244.1.1; the zero Addr if the subnet has none
}

// first and last bound the allocatable addresses: the network address is
// never handed out, and neither is the IPv4 broadcast (host-local's rule too,
// so a store shared with host-local agrees on what the pool is).
func (r Range) first() netip.Addr { return r.Subnet.Masked().Addr().Next() }

func (r Range) last() netip.Addr {
	a := lastAddr(r.Subnet)
	if a.Is4() {
		a = a.Prev()
	}
	return a
}

// Contains reports whether a is an address this range may hand out.
func (r Range) Contains(a netip.Addr) bool {
	if !r.Subnet.Contains(a) || a == r.Gateway {
		return false
	}
	f, l := r.first(), r.last()
	return f.IsValid() && l.IsValid() && a.Compare(f) >= 0 && a.Compare(l) <= 0
}

// Capacity is the number of addresses the range can hand out, saturated at
// math.MaxUint64 (an IPv6 /64 holds more than fits).
func (r Range) Capacity() uint64 {
	hostBits := r.Subnet.Addr().BitLen() - r.Subnet.Bits()
	if hostBits >= 64 {
		return math.MaxUint64
	}
	n := uint64(1) << hostBits
	excluded := uint64(1) // network address
	if r.Subnet.Addr().Is4() {
		excluded++ // broadcast
	}
	if r.Gateway.IsValid() && r.Subnet.Contains(r.Gateway) &&
		r.Gateway != r.Subnet.Masked().Addr() && r.Gateway != lastAddr(r.Subnet) {
		excluded++
	}
	if n <= excluded {
		return 0
	}
	return n - excluded
}

// String names the range in errors, e.g. "10.244.1.0/24".
func (r Range) String() string { return r.Subnet.Masked().String() }

func (r Range) validate() error {
	if !r.Subnet.IsValid() {
		return fmt.Errorf("range has no subnet")
	}
	if r.Subnet.Addr().Is4In6() || r.Subnet.Addr().Zone() != "" {
		return fmt.Errorf("range %s: use a plain IPv4 or IPv6 prefix", r.Subnet)
	}
	if r.Gateway.IsValid() && !r.Subnet.Contains(r.Gateway) {
		return fmt.Errorf("range %s: gateway %s is outside the subnet", r, r.Gateway)
	}
	return nil
}

// lastAddr is the highest address of p (all host bits set).
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
