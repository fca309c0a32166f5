package udp

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseOptions(t *testing.T) {
	tests := []struct {
		name string
		raw  string
		port uint16
		err  []string // substrings of the error; nil: no error
	}{
		{name: "nothing", raw: ``, port: 8285},
		{name: "null", raw: `null`, port: 8285},
		{name: "type only", raw: `{"Type":"udp"}`, port: 8285},
		{name: "port", raw: `{"Type":"udp","Port":9000}`, port: 9000},
		{name: "keys fold case", raw: `{"type":"UDP","port":1}`, port: 1},
		{name: "highest port", raw: `{"Port":65535}`, port: 65535},
		{name: "port 0", raw: `{"Port":0}`, err: []string{"Backend.Port 0", "out of range", "between 1 and 65535"}},
		{name: "port too big", raw: `{"Port":70000}`, err: []string{"Backend.Port 70000", "between 1 and 65535"}},
		{name: "negative port", raw: `{"Port":-1}`, err: []string{"Backend.Port -1"}},
		{name: "port as a string", raw: `{"Port":"8285"}`, err: []string{`Backend.Port "8285"`, "not a number"}},
		{name: "fractional port", raw: `{"Port":8285.5}`, err: []string{"Backend.Port 8285.5", "whole number"}},
		{name: "port null", raw: `{"Port":null}`, err: []string{"Backend.Port null"}},
		{name: "duplicate key", raw: `{"Port":1,"port":2}`, err: []string{`"Port"`, `"port"`, "keep one"}},
		{name: "unknown key", raw: `{"Type":"udp","Prot":1}`, err: []string{`unknown key "Prot"`, `"Port"`}},
		{name: "another backend's config", raw: `{"Type":"vxlan"}`, err: []string{`Backend.Type is "vxlan"`}},
		{name: "not an object", raw: `[1]`, err: []string{"not a JSON object", `"Port": 8285`}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o, err := ParseOptions([]byte(tc.raw))
			if tc.err == nil {
				if err != nil || o.Port != tc.port {
					t.Errorf("ParseOptions(%s) = %+v, %v; want port %d", tc.raw, o, err, tc.port)
				}
				return
			}
			if err == nil {
				t.Fatalf("ParseOptions(%s) = %+v, want an error", tc.raw, o)
			}
			for _, s := range tc.err {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q lacks %q", err, s)
				}
			}
		})
	}
}

func FuzzParseOptions(f *testing.F) {
	for _, s := range []string{``, `{"Type":"udp","Port":8285}`, `{"port":"x"}`, `{"Port":1e3}`, `[]`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		o, err := ParseOptions([]byte(raw))
		if err == nil && o.Port == 0 {
			t.Errorf("ParseOptions(%q) accepted port 0", raw)
		}
	})
}

func TestNewMTU(t *testing.T) {
	base := func() Config {
		return Config{Network: netConfig(t), PublicIP: netip.MustParseAddr("198.18.0.11"), ExtMTU: 1500}
	}
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		mtu    int
		err    string
	}{
		{name: "IPv4 underlay", mutate: func(*Config) {}, mtu: 1472},
		{name: "jumbo frames", mutate: func(c *Config) { c.ExtMTU = 9000 }, mtu: 8972},
		{name: "IPv6 underlay", mutate: func(c *Config) { c.PublicIP = netip.MustParseAddr("2001:db8::11") }, mtu: 1452},
		{name: "IPv4-mapped public IP is IPv4", mutate: func(c *Config) { c.PublicIP = netip.MustParseAddr("::ffff:198.18.0.11") }, mtu: 1472},
		{name: "too small for IPv6 pods", mutate: func(c *Config) { c.ExtMTU = 1300 }, err: "below the minimum 1280"},
		{name: "no public IP", mutate: func(c *Config) { c.PublicIP = netip.Addr{} }, err: "PublicIP"},
		{name: "bad options", mutate: func(c *Config) { c.Backend = []byte(`{"Port":0}`) }, err: "Backend.Port"},
		{name: "negative resync", mutate: func(c *Config) { c.Resync = -1 }, err: "negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.mutate(&c)
			n, err := New(c)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("New: %v, want an error with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n.MTU() != tc.mtu {
				t.Errorf("MTU %d, want %d", n.MTU(), tc.mtu)
			}
			if n.BackendData() != nil {
				t.Errorf("BackendData %s, want none (flannel's udp writes none)", n.BackendData())
			}
		})
	}
}
