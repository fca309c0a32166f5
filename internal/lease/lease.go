// Package lease holds the subnet lease: which node owns which pod subnet, and
// the attributes peers need to reach it. The key and JSON encodings are
// flannel's (v0.28), so loom and flanneld can share one etcd registry:
//
//	key:   <prefix>/subnets/10.244.1.0-24            (dual stack: 10.244.1.0-24&fc00:0:0:1::-64)
//	value: {"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{...}}
//
// loom adds one field, NodeName, which flanneld ignores when decoding. It
// makes the node name, not the public IP, the owner of a lease.
package lease

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Attrs is the JSON value stored under a subnet key.
type Attrs struct {
	PublicIP      netip.Addr
	PublicIPv6    *netip.Addr     // null when the node has no IPv6 underlay, as flannel writes it
	BackendType   string          `json:",omitempty"`
	BackendData   json.RawMessage `json:",omitempty"`
	BackendV6Data json.RawMessage `json:",omitempty"`
	NodeName      string          `json:",omitempty"`
}

// Lease is one subnet held by one node.
type Lease struct {
	Subnet     netip.Prefix // IPv4 subnet; invalid in an IPv6-only network
	IPv6Subnet netip.Prefix // invalid unless IPv6 is enabled
	Attrs      Attrs
	// Expiration is when the etcd lease backing the key runs out; the zero
	// time marks a reservation (a key written without an etcd lease), which
	// is never reclaimed.
	Expiration time.Time
	// Revision is the etcd ModRevision the lease was read at.
	Revision int64
}

// Reserved reports whether l is a reservation made by an operator rather
// than a lease held by a running agent.
func (l Lease) Reserved() bool { return l.Expiration.IsZero() }

// Key is the subnet key without the registry prefix, e.g. "10.244.1.0-24".
func (l Lease) Key() string { return MakeKey(l.Subnet, l.IPv6Subnet) }

// String names the lease for logs and errors.
func (l Lease) String() string {
	s := l.Key()
	if l.Attrs.NodeName != "" {
		s += " (node " + l.Attrs.NodeName + ")"
	}
	return s
}

// MakeKey renders flannel's subnet key: the address with "-" before the
// prefix length, and "&" between the IPv4 and IPv6 parts.
func MakeKey(v4, v6 netip.Prefix) string {
	var parts []string
	if v4.IsValid() {
		parts = append(parts, v4.Addr().String()+"-"+strconv.Itoa(v4.Bits()))
	}
	if v6.IsValid() {
		parts = append(parts, v6.Addr().String()+"-"+strconv.Itoa(v6.Bits()))
	}
	return strings.Join(parts, "&")
}

// ParseKey is the inverse of MakeKey. It accepts the last path element of a
// registry key and rejects anything that is not a masked subnet.
func ParseKey(key string) (v4, v6 netip.Prefix, err error) {
	if i := strings.LastIndexByte(key, '/'); i >= 0 {
		key = key[i+1:]
	}
	first, second, dual := strings.Cut(key, "&")
	p, err := parseKeyPart(first)
	if err != nil {
		return v4, v6, fmt.Errorf("subnet key %q: %w", key, err)
	}
	if p.Addr().Is4() {
		v4 = p
	} else {
		v6 = p
	}
	if dual {
		if !v4.IsValid() {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("subnet key %q: the IPv4 part comes first", key)
		}
		p, err := parseKeyPart(second)
		if err != nil {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("subnet key %q: %w", key, err)
		}
		if !p.Addr().Is6() {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("subnet key %q: second part %s is not IPv6", key, p)
		}
		v6 = p
	}
	return v4, v6, nil
}

func parseKeyPart(s string) (netip.Prefix, error) {
	i := strings.LastIndexByte(s, '-')
	if i < 0 {
		return netip.Prefix{}, fmt.Errorf("%q has no '-' before the prefix length", s)
	}
	addr, err := netip.ParseAddr(s[:i])
	if err != nil || addr.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q is not an IP address", s[:i])
	}
	bits, err := strconv.Atoi(s[i+1:])
	if err != nil || strconv.Itoa(bits) != s[i+1:] {
		return netip.Prefix{}, fmt.Errorf("%q is not a prefix length", s[i+1:])
	}
	p, err := addr.Unmap().Prefix(bits)
	if err != nil || bits < 0 {
		return netip.Prefix{}, fmt.Errorf("prefix length %d is out of range for %s", bits, addr)
	}
	if p.Addr() != addr {
		return netip.Prefix{}, fmt.Errorf("%s/%d has host bits set", addr, bits)
	}
	return p, nil
}

// MarshalAttrs renders the value flannel expects under a subnet key.
func MarshalAttrs(a Attrs) ([]byte, error) {
	if !a.PublicIP.IsValid() && a.PublicIPv6 == nil {
		return nil, fmt.Errorf("lease attributes have neither PublicIP nor PublicIPv6")
	}
	return json.Marshal(a)
}

// UnmarshalAttrs decodes a subnet key's value. flannel writes an IPv4-only
// node's PublicIPv6 as null and an IPv6-only node's PublicIP as "0.0.0.0"
// or omits it; both decode to an invalid (unset) address.
func UnmarshalAttrs(data []byte) (Attrs, error) {
	var a Attrs
	if err := json.Unmarshal(data, &a); err != nil {
		return Attrs{}, fmt.Errorf("decode lease attributes: %w", err)
	}
	if a.PublicIP.IsValid() && a.PublicIP.IsUnspecified() {
		a.PublicIP = netip.Addr{}
	}
	if a.PublicIP.IsValid() && !a.PublicIP.Is4() {
		return Attrs{}, fmt.Errorf("decode lease attributes: PublicIP %s is not IPv4", a.PublicIP)
	}
	if a.PublicIPv6 != nil && (!a.PublicIPv6.IsValid() || a.PublicIPv6.IsUnspecified()) {
		a.PublicIPv6 = nil
	}
	if a.PublicIPv6 != nil && !a.PublicIPv6.Is6() {
		return Attrs{}, fmt.Errorf("decode lease attributes: PublicIPv6 %s is not IPv6", a.PublicIPv6)
	}
	return a, nil
}

// EventType says what happened to a peer's lease.
type EventType int

const (
	Added   EventType = iota // a new lease, or new attributes for a known one
	Removed                  // the lease expired or was deleted
)

func (t EventType) String() string {
	switch t {
	case Added:
		return "added"
	case Removed:
		return "removed"
	}
	return "EventType(" + strconv.Itoa(int(t)) + ")"
}

// Event is one change to the registry, as delivered to backends.
//
// Lease is shared, never copied: the registry, the guard, the damper and
// the backend all keep this one pointer, so 5,000 peers cost one copy of
// each lease instead of one per holder (#8). It is read-only for everybody
// who receives it; a change to a lease is a new Lease in a new event.
type Event struct {
	Type  EventType
	Lease *Lease
}
