// Package netconf holds the cluster network configuration: flannel's
// net-conf.json (etcd key <prefix>/config, or the file named by
// -net-config-path), with flannel's keys and defaults.
//
// The one deliberate difference from flannel: a config without a Backend, or
// with a Backend without a Type, runs vxlan. flannel's code picks udp there
// while its documentation and every example say vxlan; loom follows the
// documentation, and Marshal always writes the Type so that a flannel node
// reading a config loom wrote picks the same backend.
package netconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Backend types loom knows by name. Which of them an agent can run is the
// agent's business; the config only has to name one of these.
const (
	BackendHostGW    = "host-gw"
	BackendVXLAN     = "vxlan"
	BackendUDP       = "udp"
	BackendWireGuard = "wireguard"
)

// backendList is how errors spell the valid Backend.Type values.
const backendList = BackendHostGW + ", " + BackendVXLAN + ", " + BackendUDP + ", " + BackendWireGuard

// Config is a parsed, defaulted and validated network configuration.
//
// The fields of a disabled family are zero (flannel ignores them too), so
// Network.IsValid() == EnableIPv4 and IPv6Network.IsValid() == EnableIPv6.
type Config struct {
	EnableIPv4     bool
	EnableIPv6     bool
	EnableNFTables bool

	Network   netip.Prefix // the whole IPv4 pod network, e.g. 10.244.0.0/16
	SubnetLen int          // prefix length of each node's subnet, e.g. 24
	SubnetMin netip.Addr   // first node subnet that may be handed out
	SubnetMax netip.Addr   // last node subnet that may be handed out

	IPv6Network   netip.Prefix
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr

	Backend Backend
}

// Backend is the "Backend" object. Type is lower-cased; Raw keeps the whole
// object so each backend can decode its own options (VNI, Port, DirectRouting...).
//
// After Parse, Raw is always a JSON object that names its type (a missing
// Type is filled in as "Type":"vxlan"), compacted with its keys sorted, so a
// backend can json.Unmarshal it without checking for nil and two equal
// configs have equal bytes.
type Backend struct {
	Type string
	Raw  json.RawMessage
}

// The top-level keys, spelled as flannel documents them. Matching is
// case-insensitive (flannel decodes with encoding/json, which folds case).
const (
	keyNetwork        = "Network"
	keySubnetLen      = "SubnetLen"
	keySubnetMin      = "SubnetMin"
	keySubnetMax      = "SubnetMax"
	keyIPv6           = "IPv6" // prefix of the IPv6 family's keys
	keyEnableIPv4     = "EnableIPv4"
	keyEnableIPv6     = "EnableIPv6"
	keyEnableNFTables = "EnableNFTables"
	keyBackend        = "Backend"
	keyType           = "Type" // inside Backend
)

// knownKeys returns every valid top-level key.
func knownKeys() []string {
	return []string{
		keyNetwork, keySubnetLen, keySubnetMin, keySubnetMax,
		keyIPv6 + keyNetwork, keyIPv6 + keySubnetLen, keyIPv6 + keySubnetMin, keyIPv6 + keySubnetMax,
		keyEnableIPv4, keyEnableIPv6, keyEnableNFTables, keyBackend,
	}
}

// Parse reads a net-conf.json, fills in flannel's defaults and validates the
// result. Errors name the key, the value and the fix; an unknown key is an
// error so that a typo cannot silently fall back to a default.
func Parse(data []byte) (Config, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return Config{}, fmt.Errorf("network config is not a JSON object: %w", err)
	}
	vals, err := canonicalKeys(top)
	if err != nil {
		return Config{}, err
	}

	c := Config{EnableIPv4: true} // flannel: IPv4 unless told otherwise
	for _, b := range []struct {
		key string
		dst *bool
	}{
		{keyEnableIPv4, &c.EnableIPv4},
		{keyEnableIPv6, &c.EnableIPv6},
		{keyEnableNFTables, &c.EnableNFTables},
	} {
		if raw, ok := vals[b.key]; ok {
			if err := json.Unmarshal(raw, b.dst); err != nil {
				return Config{}, fmt.Errorf("%s %s is not a boolean: write true or false", b.key, show(raw))
			}
		}
	}
	// Every value is checked for syntax, even one of a disabled family: flannel
	// fails on those too, and a malformed value is a mistake worth reporting.
	for _, is6 := range []bool{false, true} {
		f := family{is6: is6, enabled: c.family(is6).enabled}
		if f.network, err = decodePrefix(vals, f); err != nil {
			return Config{}, err
		}
		if f.subnetLen, err = decodeLen(vals, f); err != nil {
			return Config{}, err
		}
		if f.min, err = decodeAddr(vals, f, keySubnetMin); err != nil {
			return Config{}, err
		}
		if f.max, err = decodeAddr(vals, f, keySubnetMax); err != nil {
			return Config{}, err
		}
		c.setFamily(f)
	}
	c.Backend.Raw = vals[keyBackend]
	return c.normalize()
}

// canonicalKeys maps each key of top to its documented spelling, dropping
// null values (as encoding/json does, null means absent). An unknown key, or
// one key given twice in different cases, is an error.
func canonicalKeys(top map[string]json.RawMessage) (map[string]json.RawMessage, error) {
	keys := make([]string, 0, len(top))
	for k := range top {
		keys = append(keys, k)
	}
	slices.Sort(keys) // errors must not depend on map order
	vals := make(map[string]json.RawMessage, len(top))
	spelled := make(map[string]string, len(top))
	for _, k := range keys {
		canon, ok := lookupKey(k)
		if !ok {
			return nil, unknownKeyError(k)
		}
		if prev, dup := spelled[canon]; dup {
			return nil, fmt.Errorf("keys %q and %q both set %s: keep one", prev, k, canon)
		}
		spelled[canon] = k
		if raw := top[k]; !isNull(raw) {
			vals[canon] = raw
		}
	}
	return vals, nil
}

func lookupKey(k string) (string, bool) {
	for _, known := range knownKeys() {
		if strings.EqualFold(k, known) {
			return known, true
		}
	}
	return "", false
}

func unknownKeyError(k string) error {
	if strings.EqualFold(k, keyType) {
		return fmt.Errorf(`unknown key %q: the backend type goes inside "Backend", as in "Backend": {"Type": "vxlan"}`, k)
	}
	best, bestDist := "", len(k)
	for _, known := range knownKeys() {
		if d := editDistance(strings.ToLower(k), strings.ToLower(known)); d < bestDist {
			best, bestDist = known, d
		}
	}
	// Two edits cover the usual typos (a swapped pair, a missing or extra
	// letter, an underscore); further than that the hint would be a guess.
	if bestDist <= 2 {
		return fmt.Errorf("unknown key %q: did you mean %q?", k, best)
	}
	return fmt.Errorf("unknown key %q: valid keys are %s", k, strings.Join(knownKeys(), ", "))
}

// editDistance is the Levenshtein distance between a and b, by bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func isNull(raw json.RawMessage) bool {
	return string(bytes.TrimSpace(raw)) == "null"
}

// show renders a raw JSON value for an error message: compacted, and cut
// short so that a pasted blob does not drown the message.
func show(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		b.Reset()
		b.Write(raw)
	}
	const limit = 40
	if s := b.String(); len(s) > limit {
		return s[:limit] + "..."
	}
	return b.String()
}

func decodePrefix(vals map[string]json.RawMessage, f family) (netip.Prefix, error) {
	key := f.key(keyNetwork)
	raw, ok := vals[key]
	if !ok {
		return netip.Prefix{}, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return netip.Prefix{}, fmt.Errorf("%s %s is not a string: write the prefix in quotes, e.g. %q", key, show(raw), f.example())
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s %q is not a CIDR prefix: write address/length, e.g. %q", key, s, f.example())
	}
	if p.Addr().Is6() != f.is6 || p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("%s %q is not an %s prefix: put %s networks in %q", key, s, f.name(), f.other().name(), f.other().key(keyNetwork))
	}
	return p, nil
}

func decodeLen(vals map[string]json.RawMessage, f family) (int, error) {
	key := f.key(keySubnetLen)
	raw, ok := vals[key]
	if !ok {
		return 0, nil
	}
	var n int
	if err := json.Unmarshal(raw, &n); err != nil {
		return 0, fmt.Errorf("%s %s is not a whole number: write a prefix length without quotes, e.g. %d", key, show(raw), f.defaultSubnetLen())
	}
	if n < 0 {
		return 0, fmt.Errorf("%s %d is negative: write a prefix length, e.g. %d", key, n, f.defaultSubnetLen())
	}
	return n, nil
}

func decodeAddr(vals map[string]json.RawMessage, f family, name string) (netip.Addr, error) {
	key := f.key(name)
	raw, ok := vals[key]
	if !ok {
		return netip.Addr{}, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return netip.Addr{}, fmt.Errorf("%s %s is not a string: write the address in quotes", key, show(raw))
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" || a.Is6() != f.is6 {
		return netip.Addr{}, fmt.Errorf("%s %q is not an %s address", key, s, f.name())
	}
	return a, nil
}

// normalize fills in defaults and validates c. It is shared by Parse (after
// decoding) and Marshal (so that what Marshal writes is what Parse returns).
func (c Config) normalize() (Config, error) {
	if !c.EnableIPv4 && !c.EnableIPv6 {
		return Config{}, fmt.Errorf("%s and %s are both false: enable at least one", keyEnableIPv4, keyEnableIPv6)
	}
	for _, is6 := range []bool{false, true} {
		f := c.family(is6)
		if !f.enabled {
			c.setFamily(family{is6: is6})
			continue
		}
		f, err := f.complete()
		if err != nil {
			return Config{}, err
		}
		c.setFamily(f)
	}
	b, err := c.Backend.normalize()
	if err != nil {
		return Config{}, err
	}
	c.Backend = b
	return c, nil
}

// normalize works out the backend type and renders Raw in its canonical form.
func (b Backend) normalize() (Backend, error) {
	var obj map[string]json.RawMessage
	if len(b.Raw) > 0 && !isNull(b.Raw) {
		if err := json.Unmarshal(b.Raw, &obj); err != nil || obj == nil {
			return Backend{}, fmt.Errorf(`%s %s is not an object: write it as {"Type": "vxlan", ...}`, keyBackend, show(b.Raw))
		}
	}
	if obj == nil {
		obj = map[string]json.RawMessage{}
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		if strings.EqualFold(k, keyType) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	if len(keys) > 1 {
		return Backend{}, fmt.Errorf("keys %q and %q both set %s.%s: keep one", keys[0], keys[1], keyBackend, keyType)
	}
	var rawType string
	if len(keys) == 1 && !isNull(obj[keys[0]]) {
		if err := json.Unmarshal(obj[keys[0]], &rawType); err != nil {
			return Backend{}, fmt.Errorf("%s.%s %s is not a string: use one of %s", keyBackend, keyType, show(obj[keys[0]]), backendList)
		}
	}
	switch {
	case b.Type == "":
		b.Type = rawType
	case rawType != "" && !strings.EqualFold(rawType, b.Type):
		return Backend{}, fmt.Errorf("%s.%s %q disagrees with %q in Backend.Raw: make them equal", keyBackend, keyType, b.Type, rawType)
	}
	if b.Type == "" {
		b.Type = BackendVXLAN // see the package comment
	}
	given := b.Type
	b.Type = strings.ToLower(b.Type)
	switch b.Type {
	case BackendHostGW, BackendVXLAN, BackendUDP, BackendWireGuard:
	default:
		return Backend{}, fmt.Errorf("%s.%s %q is not a backend loom knows: use one of %s", keyBackend, keyType, given, backendList)
	}
	if rawType == "" {
		// Write the type down, so that a flannel node reading this config
		// does not pick its own default (udp).
		if len(keys) == 1 {
			delete(obj, keys[0])
		}
		obj[keyType], _ = json.Marshal(b.Type)
	}
	raw, err := encode(obj)
	if err != nil {
		return Backend{}, fmt.Errorf("encoding %s: %w", keyBackend, err)
	}
	b.Raw = raw
	return b, nil
}

// encode renders v as compact JSON without escaping <, > and &: Raw must
// come back byte for byte after a Marshal and Parse round trip, and the
// HTML escaping json.Marshal does by default would change it.
func encode(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// Marshal renders c as net-conf.json, with every default written out so that
// any reader (Parse, or flanneld) sees the same subnets. A hand-built Config
// gets the treatment Parse gives a file: missing defaults are filled in,
// fields of a disabled family are dropped and an invalid one is an error.
func (c Config) Marshal() ([]byte, error) {
	c, err := c.normalize()
	if err != nil {
		return nil, fmt.Errorf("encoding network config: %w", err)
	}
	type wire struct {
		Network        string          `json:"Network,omitempty"`
		SubnetLen      int             `json:"SubnetLen,omitempty"`
		SubnetMin      string          `json:"SubnetMin,omitempty"`
		SubnetMax      string          `json:"SubnetMax,omitempty"`
		IPv6Network    string          `json:"IPv6Network,omitempty"`
		IPv6SubnetLen  int             `json:"IPv6SubnetLen,omitempty"`
		IPv6SubnetMin  string          `json:"IPv6SubnetMin,omitempty"`
		IPv6SubnetMax  string          `json:"IPv6SubnetMax,omitempty"`
		EnableIPv4     bool            `json:"EnableIPv4"`
		EnableIPv6     bool            `json:"EnableIPv6"`
		EnableNFTables bool            `json:"EnableNFTables"`
		Backend        json.RawMessage `json:"Backend"`
	}
	w := wire{
		EnableIPv4:     c.EnableIPv4,
		EnableIPv6:     c.EnableIPv6,
		EnableNFTables: c.EnableNFTables,
		Backend:        c.Backend.Raw,
	}
	if c.EnableIPv4 {
		w.Network, w.SubnetLen = c.Network.String(), c.SubnetLen
		w.SubnetMin, w.SubnetMax = c.SubnetMin.String(), c.SubnetMax.String()
	}
	if c.EnableIPv6 {
		w.IPv6Network, w.IPv6SubnetLen = c.IPv6Network.String(), c.IPv6SubnetLen
		w.IPv6SubnetMin, w.IPv6SubnetMax = c.IPv6SubnetMin.String(), c.IPv6SubnetMax.String()
	}
	out, err := encode(w)
	if err != nil {
		return nil, fmt.Errorf("encoding network config: %w", err)
	}
	return out, nil
}

// Equal reports whether c and o describe the same network: the agent uses it
// to tell a real config change from a rewrite of the same content.
func (c Config) Equal(o Config) bool {
	return c.EnableIPv4 == o.EnableIPv4 && c.EnableIPv6 == o.EnableIPv6 &&
		c.EnableNFTables == o.EnableNFTables &&
		c.family(false) == o.family(false) && c.family(true) == o.family(true) &&
		c.Backend.Type == o.Backend.Type && bytes.Equal(c.Backend.Raw, o.Backend.Raw)
}

// Contains reports whether p is a node subnet this config may hand out: of
// the family's SubnetLen, aligned, inside its network and within
// [SubnetMin, SubnetMax]. Store code uses it to reject foreign or stale leases.
func (c Config) Contains(p netip.Prefix) bool {
	if !p.IsValid() {
		return false
	}
	f := c.family(p.Addr().Is6())
	return f.enabled && f.contains(p)
}

// CheckUnderlay refuses a pod network that overlaps one of the node's own
// interface networks: routes to pod subnets would then capture traffic meant
// for hosts (or the reverse), which breaks the node in ways hard to trace.
// All overlaps are reported.
func (c Config) CheckUnderlay(underlay []netip.Prefix) error {
	var errs []error
	seen := map[[2]netip.Prefix]bool{}
	for _, is6 := range []bool{false, true} {
		f := c.family(is6)
		if !f.enabled {
			continue
		}
		for _, u := range underlay {
			if !u.IsValid() || !f.network.Overlaps(u) {
				continue
			}
			u = u.Masked()
			if k := [2]netip.Prefix{f.network, u}; !seen[k] {
				seen[k] = true
				errs = append(errs, fmt.Errorf("%s %s overlaps this node's network %s: set %s to a range that no host network uses",
					f.key(keyNetwork), f.network, u, f.key(keyNetwork)))
			}
		}
	}
	return errors.Join(errs...)
}

// family is one address family's part of a Config, so that IPv4 and IPv6 go
// through one code path for defaults, validation and lookups.
type family struct {
	is6       bool
	enabled   bool
	network   netip.Prefix
	subnetLen int
	min, max  netip.Addr
}

func (c Config) family(is6 bool) family {
	if is6 {
		return family{true, c.EnableIPv6, c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax}
	}
	return family{false, c.EnableIPv4, c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax}
}

func (c *Config) setFamily(f family) {
	if f.is6 {
		c.EnableIPv6, c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax = f.enabled, f.network, f.subnetLen, f.min, f.max
		return
	}
	c.EnableIPv4, c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax = f.enabled, f.network, f.subnetLen, f.min, f.max
}

func (f family) other() family { return family{is6: !f.is6} }

func (f family) name() string {
	if f.is6 {
		return "IPv6"
	}
	return "IPv4"
}

// key spells one of this family's keys: "SubnetLen" or "IPv6SubnetLen".
func (f family) key(name string) string {
	if f.is6 {
		return keyIPv6 + name
	}
	return name
}

func (f family) example() string {
	if f.is6 {
		return "fd00:10:244::/56"
	}
	return "10.244.0.0/16"
}

func (f family) bits() int {
	if f.is6 {
		return 128
	}
	return 32
}

// maxSubnetLen leaves a node subnet four addresses (network, gateway, one
// pod, broadcast): anything longer cannot hold a pod.
func (f family) maxSubnetLen() int { return f.bits() - 2 }

// defaultSubnetLen is flannel's documented default: /24 per node for IPv4,
// /64 for IPv6.
func (f family) defaultSubnetLen() int {
	if f.is6 {
		return 64
	}
	return 24
}

// complete applies flannel's defaults to an enabled family and validates it.
func (f family) complete() (family, error) {
	netKey, lenKey := f.key(keyNetwork), f.key(keySubnetLen)
	if !f.network.IsValid() {
		if f.is6 {
			return f, fmt.Errorf("%s missing: set it to the IPv6 pod network (e.g. %q), or set %q: false", netKey, f.example(), keyEnableIPv6)
		}
		return f, fmt.Errorf("%s missing: set it to the pod network (e.g. %q), or set %q: false for an IPv6-only cluster", netKey, f.example(), keyEnableIPv4)
	}
	if m := f.network.Masked(); m != f.network {
		return f, fmt.Errorf("%s %s has host bits set: use %s", netKey, f.network, m)
	}
	if f.subnetLen == 0 {
		// flannel: a /24 (/64) per node when the network holds at least four
		// of them, else a quarter of the network.
		switch {
		case f.network.Bits() <= f.defaultSubnetLen()-2:
			f.subnetLen = f.defaultSubnetLen()
		case f.network.Bits()+2 <= f.maxSubnetLen():
			f.subnetLen = f.network.Bits() + 2
		default:
			return f, fmt.Errorf("%s %s is too small to split into node subnets: use a /%d or shorter prefix", netKey, f.network, f.maxSubnetLen()-2)
		}
	}
	if f.subnetLen > f.maxSubnetLen() {
		return f, fmt.Errorf("%s %d leaves no room for pods: use %d or less", lenKey, f.subnetLen, f.maxSubnetLen())
	}
	if f.subnetLen <= f.network.Bits() {
		return f, fmt.Errorf("%s %d must be longer than %s %s's prefix (%d)", lenKey, f.subnetLen, netKey, f.network, f.network.Bits())
	}
	first := f.network.Addr()
	last := netip.PrefixFrom(lastAddr(f.network), f.subnetLen).Masked().Addr()
	if !f.min.IsValid() {
		// The network's first subnet is left out, as flannel does: its .0
		// address is the network address of the whole pod network.
		f.min, _ = nextSubnet(first, f.subnetLen)
	}
	if !f.max.IsValid() {
		f.max = last
	}
	for _, b := range []struct {
		name string
		addr netip.Addr
	}{{keySubnetMin, f.min}, {keySubnetMax, f.max}} {
		if !f.network.Contains(b.addr) {
			return f, fmt.Errorf("%s %s is outside %s %s: use a subnet address from %s to %s", f.key(b.name), b.addr, netKey, f.network, first, last)
		}
		if aligned := netip.PrefixFrom(b.addr, f.subnetLen).Masked().Addr(); aligned != b.addr {
			return f, fmt.Errorf("%s %s is not aligned to %s %d: use %s", f.key(b.name), b.addr, lenKey, f.subnetLen, aligned)
		}
	}
	if f.min.Compare(f.max) > 0 {
		return f, fmt.Errorf("%s %s is above %s %s: the range is empty; swap them", f.key(keySubnetMin), f.min, f.key(keySubnetMax), f.max)
	}
	return f, nil
}

func (f family) contains(p netip.Prefix) bool {
	a := p.Addr()
	return p.Bits() == f.subnetLen && p.Masked() == p && f.network.Contains(a) &&
		f.min.Compare(a) <= 0 && a.Compare(f.max) <= 0
}

// nextSubnet returns the start of the /plen block after a's, and false when
// that would wrap past the end of the address space.
func nextSubnet(a netip.Addr, plen int) (netip.Addr, bool) {
	b := a.AsSlice()
	i := plen - 1 // the bit worth one block
	if i < 0 {
		return netip.Addr{}, false
	}
	carry := byte(0x80 >> (i % 8))
	for j := i / 8; j >= 0 && carry != 0; j-- {
		sum := uint16(b[j]) + uint16(carry)
		b[j], carry = byte(sum), byte(sum>>8)
	}
	if carry != 0 {
		return netip.Addr{}, false
	}
	next, _ := netip.AddrFromSlice(b)
	return next, true
}

// lastAddr returns p's last address (every host bit set).
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
