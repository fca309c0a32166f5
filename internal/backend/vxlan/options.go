package vxlan

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Defaults and limits of the options.
const (
	DefaultVNI  = 1
	DefaultPort = 8472 // the Linux VXLAN driver's port, which flannel uses (not IANA's 4789)
	MaxVNI      = 1<<24 - 1
)

// Options are the vxlan keys of the network config's "Backend" object,
// with flannel's names, meanings and defaults.
type Options struct {
	VNI  int // VXLAN network identifier, 0..16777215; default 1
	Port int // UDP destination port; default 8472
	// MTU is, as in flannel, the MTU of the underlay the encapsulated
	// packets cross; the VXLAN overhead is taken off it. 0: the underlay
	// interface's MTU.
	MTU           int
	GBP           bool // VXLAN Group Based Policy extension
	Learning      bool // let the device learn FDB entries from received packets
	DirectRouting bool // plain routes (host-gw style) to peers on the underlay's subnets
	// ChecksumOffload forces TX checksum offload on the device on (true) or
	// off (false). nil (the default): off only on kernels with the VXLAN
	// checksum bug, on elsewhere. A loom option; flanneld has none.
	ChecksumOffload *bool
}

// The option keys, spelled as flannel documents them. Matching is
// case-insensitive, as flannel's encoding/json decoding is.
const (
	keyBackend       = "Backend" // the object itself, in the network config
	keyType          = "Type"
	keyVNI           = "VNI"
	keyPort          = "Port"
	keyMTU           = "MTU"
	keyGBP           = "GBP"
	keyLearning      = "Learning"
	keyDirectRouting = "DirectRouting"
	keyChecksum      = "ChecksumOffload"
	// Windows-only keys of flannel's vxlan backend: accepted, so one config
	// can serve a mixed cluster, and ignored, as flanneld on Linux does.
	keyMacPrefix = "MacPrefix"
	keyName      = "Name"
)

// linuxKeys returns the keys that mean something on Linux, for errors.
func linuxKeys() []string {
	return []string{keyType, keyVNI, keyPort, keyMTU, keyGBP, keyLearning, keyDirectRouting, keyChecksum}
}

// knownKeys returns every key ParseOptions accepts.
func knownKeys() []string { return append(linuxKeys(), keyMacPrefix, keyName) }

// minPodMTU is the smallest MTU IPv4 allows a link (RFC 791), so the
// smallest useful MTU pods can get.
const minPodMTU = 68

// ParseOptions decodes and validates the Backend object of the network
// config (netconf.Backend.Raw). Missing keys take flannel's defaults; an
// unknown key is an error, so a typo cannot silently fall back to a default.
// Errors name the key, the value and the fix.
func ParseOptions(raw json.RawMessage) (Options, error) {
	o := Options{VNI: DefaultVNI, Port: DefaultPort}
	if t := bytes.TrimSpace(raw); len(t) == 0 || string(t) == "null" {
		return o, nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return Options{}, fmt.Errorf("%s is not a JSON object: %w", keyBackend, err)
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	slices.Sort(keys) // errors must not depend on map order
	spelled := make(map[string]string, len(keys))
	for _, k := range keys {
		canon, ok := canonical(k)
		if !ok {
			return Options{}, fmt.Errorf("unknown key %q in Backend: the vxlan backend's keys are %s",
				k, strings.Join(linuxKeys(), ", "))
		}
		if prev, dup := spelled[canon]; dup {
			return Options{}, fmt.Errorf("keys %q and %q in Backend both set %s: keep one", prev, k, canon)
		}
		spelled[canon] = k
		v := obj[k]
		if string(bytes.TrimSpace(v)) == "null" {
			continue // encoding/json, and so flannel, treat null as absent
		}
		var err error
		switch canon {
		case keyType:
			var s string
			if json.Unmarshal(v, &s) != nil || !strings.EqualFold(s, Type) {
				err = fmt.Errorf("%s is %s, not %q: this is the vxlan backend", field(keyType), show(v), Type)
			}
		case keyVNI:
			o.VNI, err = wholeNumber(keyVNI, v)
		case keyPort:
			o.Port, err = wholeNumber(keyPort, v)
			if err == nil && o.Port == 0 {
				o.Port = DefaultPort // flannel: 0 leaves the kernel's default, 8472
			}
		case keyMTU:
			o.MTU, err = wholeNumber(keyMTU, v)
		case keyGBP:
			err = boolean(keyGBP, v, &o.GBP)
		case keyLearning:
			err = boolean(keyLearning, v, &o.Learning)
		case keyDirectRouting:
			err = boolean(keyDirectRouting, v, &o.DirectRouting)
		case keyChecksum:
			var on bool
			if err = boolean(keyChecksum, v, &on); err == nil {
				o.ChecksumOffload = &on
			}
		}
		if err != nil {
			return Options{}, err
		}
	}
	return o, o.validate()
}

func (o Options) validate() error {
	if o.VNI < 0 || o.VNI > MaxVNI {
		return fmt.Errorf("Backend.VNI %d is out of range: use 0 to %d (default %d), the same on every node", o.VNI, MaxVNI, DefaultVNI)
	}
	if o.Port < 1 || o.Port > 65535 {
		return fmt.Errorf("Backend.Port %d is out of range: use 1 to 65535, the same on every node, or leave it out for %d", o.Port, DefaultPort)
	}
	if o.MTU != 0 && o.MTU < minPodMTU+overheadIPv4 {
		return fmt.Errorf("Backend.MTU %d is too small: it is the underlay's MTU (as in flannel), pods get %d bytes less, and need at least %d; "+
			"set the underlay interface's MTU (e.g. 1500) or leave MTU out to use it", o.MTU, overheadIPv4, minPodMTU)
	}
	if o.MTU > 65535 {
		return fmt.Errorf("Backend.MTU %d is above 65535: set the underlay interface's MTU (e.g. 1500) or leave MTU out to use it", o.MTU)
	}
	return nil
}

// field spells a key as errors name it: "Backend.VNI".
func field(key string) string { return keyBackend + "." + key }

func canonical(k string) (string, bool) {
	for _, known := range knownKeys() {
		if strings.EqualFold(k, known) {
			return known, true
		}
	}
	return "", false
}

func wholeNumber(key string, v json.RawMessage) (int, error) {
	var n int
	if err := json.Unmarshal(v, &n); err != nil {
		return 0, fmt.Errorf("%s %s is not a whole number: write it without quotes, e.g. %q: %d", field(key), show(v), key, example(key))
	}
	return n, nil
}

func example(key string) int {
	switch key {
	case keyVNI:
		return DefaultVNI
	case keyPort:
		return DefaultPort
	}
	return 1500
}

func boolean(key string, v json.RawMessage, dst *bool) error {
	if err := json.Unmarshal(v, dst); err != nil {
		return fmt.Errorf("%s %s is not a boolean: write true or false, without quotes", field(key), show(v))
	}
	return nil
}

// show renders a raw JSON value for an error message, compacted and cut
// short.
func show(v json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, v) != nil {
		b.Reset()
		b.Write(v)
	}
	const limit = 40
	if s := b.String(); len(s) > limit {
		return s[:limit] + "..."
	}
	return b.String()
}
