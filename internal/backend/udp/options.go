package udp

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// DefaultPort is flannel's udp port.
const DefaultPort = 8285

// Options are the udp backend's keys in the network config's Backend
// object: {"Type": "udp", "Port": 8285}. Keys match case-insensitively, as
// flannel's encoding/json decoding does.
type Options struct {
	// Port is the UDP port every node listens on and sends to; flannel's
	// udp backend has one port for the whole cluster.
	Port uint16
}

// ParseOptions decodes the Backend object (netconf.Backend.Raw). Null or
// empty means the defaults. Errors name the key, the value and the fix.
func ParseOptions(raw json.RawMessage) (Options, error) {
	opts := Options{Port: DefaultPort}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return opts, nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return Options{}, fmt.Errorf(`udp backend: Backend %s is not a JSON object: write it as {"Type": "udp", "Port": %d}`, show(raw), DefaultPort)
	}
	seen := map[string]string{} // canonical key → key as written
	for k, v := range obj {
		canon, ok := optionKey(k)
		if !ok {
			return Options{}, fmt.Errorf(`udp backend: unknown key %q in Backend: the udp backend takes only "Type" and "Port" (e.g. {"Type": "udp", "Port": %d})`, k, DefaultPort)
		}
		if prev, dup := seen[canon]; dup {
			a, b := prev, k
			if a > b {
				a, b = b, a
			}
			return Options{}, fmt.Errorf("udp backend: keys %q and %q both set Backend.%s: keep one", a, b, canon)
		}
		seen[canon] = k
		switch canon {
		case "Type":
			var t string
			if err := json.Unmarshal(v, &t); err != nil || !strings.EqualFold(t, Type) {
				return Options{}, fmt.Errorf(`udp backend: Backend.Type is %s, not "udp": this config is for another backend`, show(v))
			}
		case "Port":
			p, err := parsePort(v)
			if err != nil {
				return Options{}, err
			}
			opts.Port = p
		}
	}
	return opts, nil
}

func optionKey(k string) (string, bool) {
	for _, canon := range []string{"Type", "Port"} {
		if strings.EqualFold(k, canon) {
			return canon, true
		}
	}
	return "", false
}

// parsePort accepts a JSON integer in 1..65535, as flannel's int field
// would (flannel accepts 0 and out-of-range values and fails later, at
// bind time, with a bare error).
func parsePort(v json.RawMessage) (uint16, error) {
	var n json.Number
	// json.Number would also take a quoted number; flannel's int does not.
	if err := json.Unmarshal(v, &n); err != nil || bytes.HasPrefix(bytes.TrimSpace(v), []byte(`"`)) {
		return 0, fmt.Errorf("udp backend: Backend.Port %s is not a number: give a UDP port between 1 and 65535 (flannel's default is %d)", show(v), DefaultPort)
	}
	i, err := n.Int64()
	if err != nil {
		return 0, fmt.Errorf("udp backend: Backend.Port %s is not a whole number: give a UDP port between 1 and 65535 (flannel's default is %d)", show(v), DefaultPort)
	}
	if i < 1 || i > 65535 {
		return 0, fmt.Errorf("udp backend: Backend.Port %d is out of range: give a UDP port between 1 and 65535 (flannel's default is %d)", i, DefaultPort)
	}
	return uint16(i), nil
}

// show renders a JSON value for an error message, shortened.
func show(v json.RawMessage) string {
	s := string(bytes.TrimSpace(v))
	if len(s) > 40 {
		s = s[:37] + "..."
	}
	return s
}
