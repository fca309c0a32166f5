package netconf

import (
	"encoding/json"
	"net/netip"
	"testing"
)

// Address plan: pod network 10.244.0.0/16 (node subnets /24), IPv6 pod
// network fd00:10:244::/56 (node subnets /64), node underlay 198.18.0.0/24
// and 2001:db8::/64.

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want string
	}{
		{
			name: "subnet as long as the network",
			in:   `{"Network":"10.244.0.0/16","SubnetLen":16}`,
			want: "SubnetLen 16 must be longer than Network 10.244.0.0/16's prefix (16)",
		},
		{
			name: "ipv6 subnet shorter than the network",
			in:   `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":48}`,
			want: "IPv6SubnetLen 48 must be longer than IPv6Network fd00:10:244::/56's prefix (56)",
		},
		{
			name: "not json",
			in:   `Network: 10.244.0.0/16`,
			want: "network config is not a JSON object: invalid character 'N' looking for beginning of value",
		},
		{
			name: "not an object",
			in:   `["10.244.0.0/16"]`,
			want: "network config is not a JSON object: json: cannot unmarshal array into Go value of type map[string]json.RawMessage",
		},
		{
			name: "empty object",
			in:   `{}`,
			want: `Network missing: set it to the pod network (e.g. "10.244.0.0/16"), or set "EnableIPv4": false for an IPv6-only cluster`,
		},
		{
			name: "typo in a key is not a silent default",
			in:   `{"Netwrok":"10.244.0.0/16"}`,
			want: `unknown key "Netwrok": did you mean "Network"?`,
		},
		{
			name: "typo in a subnet key",
			in:   `{"Network":"10.244.0.0/16","Subnet_Len":24}`,
			want: `unknown key "Subnet_Len": did you mean "SubnetLen"?`,
		},
		{
			name: "backend type at the top level",
			in:   `{"Network":"10.244.0.0/16","Type":"vxlan"}`,
			want: `unknown key "Type": the backend type goes inside "Backend", as in "Backend": {"Type": "vxlan"}`,
		},
		{
			name: "unknown key far from any known one",
			in:   `{"Network":"10.244.0.0/16","Networks":["10.245.0.0/16"],"MTU":1400}`,
			want: `unknown key "MTU": valid keys are Network, SubnetLen, SubnetMin, SubnetMax, IPv6Network, IPv6SubnetLen, IPv6SubnetMin, IPv6SubnetMax, EnableIPv4, EnableIPv6, EnableNFTables, Backend`,
		},
		{
			name: "one key twice in different cases",
			in:   `{"Network":"10.244.0.0/16","network":"10.245.0.0/16"}`,
			want: `keys "Network" and "network" both set Network: keep one`,
		},
		{
			name: "network is not a string",
			in:   `{"Network":10}`,
			want: `Network 10 is not a string: write the prefix in quotes, e.g. "10.244.0.0/16"`,
		},
		{
			name: "network without a length",
			in:   `{"Network":"10.244.0.0"}`,
			want: `Network "10.244.0.0" is not a CIDR prefix: write address/length, e.g. "10.244.0.0/16"`,
		},
		{
			name: "ipv6 in Network",
			in:   `{"Network":"fd00:10:244::/56"}`,
			want: `Network "fd00:10:244::/56" is not an IPv4 prefix: put IPv6 networks in "IPv6Network"`,
		},
		{
			name: "ipv4 in IPv6Network",
			in:   `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"10.245.0.0/16"}`,
			want: `IPv6Network "10.245.0.0/16" is not an IPv6 prefix: put IPv4 networks in "Network"`,
		},
		{
			name: "ipv4-mapped IPv6Network",
			in:   `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::ffff:10.244.0.0/112"}`,
			want: `IPv6Network "::ffff:10.244.0.0/112" is not an IPv6 prefix: put IPv4 networks in "Network"`,
		},
		{
			name: "syntax of a disabled family is still checked",
			in:   `{"Network":"10.244.0.0/16","IPv6Network":"fd00::/zz"}`,
			want: `IPv6Network "fd00::/zz" is not a CIDR prefix: write address/length, e.g. "fd00:10:244::/56"`,
		},
		{
			name: "host bits set",
			in:   `{"Network":"10.244.1.0/16"}`,
			want: "Network 10.244.1.0/16 has host bits set: use 10.244.0.0/16",
		},
		{
			name: "ipv6 host bits set",
			in:   `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::1/56"}`,
			want: "IPv6Network fd00:10:244::1/56 has host bits set: use fd00:10:244::/56",
		},
		{
			name: "subnet too long for pods",
			in:   `{"Network":"10.244.0.0/16","SubnetLen":31}`,
			want: "SubnetLen 31 leaves no room for pods: use 30 or less",
		},
		{
			name: "ipv6 subnet too long for pods",
			in:   `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":127}`,
			want: "IPv6SubnetLen 127 leaves no room for pods: use 126 or less",
		},
		{
			name: "network too small for the default split",
			in:   `{"Network":"10.244.0.0/29"}`,
			want: "Network 10.244.0.0/29 is too small to split into node subnets: use a /28 or shorter prefix",
		},
		{
			name: "subnet len as a string",
			in:   `{"Network":"10.244.0.0/16","SubnetLen":"24"}`,
			want: `SubnetLen "24" is not a whole number: write a prefix length without quotes, e.g. 24`,
		},
		{
			name: "negative subnet len",
			in:   `{"Network":"10.244.0.0/16","SubnetLen":-1}`,
			want: "SubnetLen -1 is negative: write a prefix length, e.g. 24",
		},
		{
			name: "subnet min outside the network",
			in:   `{"Network":"10.244.0.0/16","SubnetMin":"10.245.1.0"}`,
			want: "SubnetMin 10.245.1.0 is outside Network 10.244.0.0/16: use a subnet address from 10.244.0.0 to 10.244.255.0",
		},
		{
			name: "subnet max not aligned",
			in:   `{"Network":"10.244.0.0/16","SubnetMax":"10.244.9.7"}`,
			want: "SubnetMax 10.244.9.7 is not aligned to SubnetLen 24: use 10.244.9.0",
		},
		{
			name: "ipv6 subnet min not aligned",
			in:   `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetMin":"fd00:10:244:1::1"}`,
			want: "IPv6SubnetMin fd00:10:244:1::1 is not aligned to IPv6SubnetLen 64: use fd00:10:244:1::",
		},
		{
			name: "subnet min is an ipv6 address",
			in:   `{"Network":"10.244.0.0/16","SubnetMin":"fd00::"}`,
			want: `SubnetMin "fd00::" is not an IPv4 address`,
		},
		{
			name: "min above max",
			in:   `{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.1.0"}`,
			want: "SubnetMin 10.244.9.0 is above SubnetMax 10.244.1.0: the range is empty; swap them",
		},
		{
			name: "no family enabled",
			in:   `{"EnableIPv4":false,"Network":"10.244.0.0/16"}`,
			want: "EnableIPv4 and EnableIPv6 are both false: enable at least one",
		},
		{
			name: "ipv6 enabled without a network",
			in:   `{"Network":"10.244.0.0/16","EnableIPv6":true}`,
			want: `IPv6Network missing: set it to the IPv6 pod network (e.g. "fd00:10:244::/56"), or set "EnableIPv6": false`,
		},
		{
			name: "enable flag as a string",
			in:   `{"Network":"10.244.0.0/16","EnableIPv6":"yes"}`,
			want: `EnableIPv6 "yes" is not a boolean: write true or false`,
		},
		{
			name: "unknown backend",
			in:   `{"Network":"10.244.0.0/16","Backend":{"Type":"IPIP"}}`,
			want: `Backend.Type "IPIP" is not a backend loom knows: use one of host-gw, vxlan, udp, wireguard`,
		},
		{
			name: "backend as a bare string",
			in:   `{"Network":"10.244.0.0/16","Backend":"vxlan"}`,
			want: `Backend "vxlan" is not an object: write it as {"Type": "vxlan", ...}`,
		},
		{
			name: "backend type not a string",
			in:   `{"Network":"10.244.0.0/16","Backend":{"Type":1}}`,
			want: "Backend.Type 1 is not a string: use one of host-gw, vxlan, udp, wireguard",
		},
		{
			name: "backend type twice",
			in:   `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","type":"udp"}}`,
			want: `keys "Type" and "type" both set Backend.Type: keep one`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.in))
			if err == nil {
				t.Fatalf("Parse(%s) = %+v, want error %q", tc.in, c, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("Parse(%s) error:\n got  %s\n want %s", tc.in, err, tc.want)
			}
		})
	}
}

func TestParseDefaults(t *testing.T) {
	vxlan := Backend{Type: BackendVXLAN, Raw: json.RawMessage(`{"Type":"vxlan"}`)}
	for _, tc := range []struct {
		name string
		in   string
		want Config
	}{
		{
			name: "/16 gives /24 subnets from the second to the last",
			in:   `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`,
			want: Config{
				EnableIPv4: true,
				Network:    netip.MustParsePrefix("10.244.0.0/16"),
				SubnetLen:  24,
				SubnetMin:  netip.MustParseAddr("10.244.1.0"),
				SubnetMax:  netip.MustParseAddr("10.244.255.0"),
				Backend:    vxlan,
			},
		},
		{
			name: "/22 still gives /24 subnets",
			in:   `{"Network":"10.244.0.0/22"}`,
			want: Config{
				EnableIPv4: true,
				Network:    netip.MustParsePrefix("10.244.0.0/22"),
				SubnetLen:  24,
				SubnetMin:  netip.MustParseAddr("10.244.1.0"),
				SubnetMax:  netip.MustParseAddr("10.244.3.0"),
				Backend:    vxlan,
			},
		},
		{
			name: "/23 is split in four: /25",
			in:   `{"Network":"10.244.0.0/23"}`,
			want: Config{
				EnableIPv4: true,
				Network:    netip.MustParsePrefix("10.244.0.0/23"),
				SubnetLen:  25,
				SubnetMin:  netip.MustParseAddr("10.244.0.128"),
				SubnetMax:  netip.MustParseAddr("10.244.1.128"),
				Backend:    vxlan,
			},
		},
		{
			name: "explicit values are kept",
			in:   `{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","EnableNFTables":true,"Backend":{"Type":"udp","Port":7890}}`,
			want: Config{
				EnableIPv4:     true,
				EnableNFTables: true,
				Network:        netip.MustParsePrefix("10.0.0.0/8"),
				SubnetLen:      20,
				SubnetMin:      netip.MustParseAddr("10.10.0.0"),
				SubnetMax:      netip.MustParseAddr("10.99.0.0"),
				Backend:        Backend{Type: BackendUDP, Raw: json.RawMessage(`{"Port":7890,"Type":"udp"}`)},
			},
		},
		{
			name: "dual stack /56 gives /64 subnets",
			in:   `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`,
			want: Config{
				EnableIPv4:    true,
				EnableIPv6:    true,
				Network:       netip.MustParsePrefix("10.244.0.0/16"),
				SubnetLen:     24,
				SubnetMin:     netip.MustParseAddr("10.244.1.0"),
				SubnetMax:     netip.MustParseAddr("10.244.255.0"),
				IPv6Network:   netip.MustParsePrefix("fd00:10:244::/56"),
				IPv6SubnetLen: 64,
				IPv6SubnetMin: netip.MustParseAddr("fd00:10:244:1::"),
				IPv6SubnetMax: netip.MustParseAddr("fd00:10:244:ff::"),
				Backend:       vxlan,
			},
		},
		{
			name: "ipv6 only, /63 is split in four: /65",
			in:   `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/63"}`,
			want: Config{
				EnableIPv6:    true,
				IPv6Network:   netip.MustParsePrefix("fd00:10:244::/63"),
				IPv6SubnetLen: 65,
				IPv6SubnetMin: netip.MustParseAddr("fd00:10:244:0:8000::"),
				IPv6SubnetMax: netip.MustParseAddr("fd00:10:244:1:8000::"),
				Backend:       vxlan,
			},
		},
		{
			name: "fields of a disabled family are ignored, as flannel does",
			in:   `{"Network":"10.244.0.0/16","EnableIPv6":false,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64}`,
			want: Config{
				EnableIPv4: true,
				Network:    netip.MustParsePrefix("10.244.0.0/16"),
				SubnetLen:  24,
				SubnetMin:  netip.MustParseAddr("10.244.1.0"),
				SubnetMax:  netip.MustParseAddr("10.244.255.0"),
				Backend:    vxlan,
			},
		},
		{
			name: "null means absent and SubnetLen 0 means default",
			in:   `{"Network":"10.244.0.0/16","SubnetLen":0,"SubnetMin":null,"Backend":null}`,
			want: Config{
				EnableIPv4: true,
				Network:    netip.MustParsePrefix("10.244.0.0/16"),
				SubnetLen:  24,
				SubnetMin:  netip.MustParseAddr("10.244.1.0"),
				SubnetMax:  netip.MustParseAddr("10.244.255.0"),
				Backend:    vxlan,
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse([]byte(tc.in))
			if err != nil {
				t.Fatalf("Parse(%s): %v", tc.in, err)
			}
			if !got.Equal(tc.want) {
				t.Errorf("Parse(%s):\n got  %+v (Raw %s)\n want %+v (Raw %s)", tc.in, got, got.Backend.Raw, tc.want, tc.want.Backend.Raw)
			}
		})
	}
}

func TestParseBackend(t *testing.T) {
	for _, tc := range []struct {
		name     string
		in       string
		wantType string
		wantRaw  string
	}{
		{
			name:     "missing backend means vxlan, written down",
			in:       `{"Network":"10.244.0.0/16"}`,
			wantType: BackendVXLAN,
			wantRaw:  `{"Type":"vxlan"}`,
		},
		{
			name:     "backend without a type keeps its options",
			in:       `{"Network":"10.244.0.0/16","Backend":{"VNI":4, "DirectRouting": true}}`,
			wantType: BackendVXLAN,
			wantRaw:  `{"DirectRouting":true,"Type":"vxlan","VNI":4}`,
		},
		{
			name:     "empty type means vxlan",
			in:       `{"Network":"10.244.0.0/16","Backend":{"type":"","VNI":4}}`,
			wantType: BackendVXLAN,
			wantRaw:  `{"Type":"vxlan","VNI":4}`,
		},
		{
			name:     "type is lower-cased, Raw keeps the original",
			in:       `{"Network":"10.244.0.0/16","Backend":{"type":"WireGuard","PSK":"<secret>"}}`,
			wantType: BackendWireGuard,
			wantRaw:  `{"PSK":"<secret>","type":"WireGuard"}`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.in))
			if err != nil {
				t.Fatalf("Parse(%s): %v", tc.in, err)
			}
			if c.Backend.Type != tc.wantType || string(c.Backend.Raw) != tc.wantRaw {
				t.Errorf("Parse(%s).Backend = %q %s, want %q %s", tc.in, c.Backend.Type, c.Backend.Raw, tc.wantType, tc.wantRaw)
			}
		})
	}
}

func TestParseCaseInsensitive(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
	}{
		{name: "lower case", in: `{"network":"10.244.0.0/16","subnetlen":24,"backend":{"type":"HOST-GW"}}`},
		{name: "upper case", in: `{"NETWORK":"10.244.0.0/16","SUBNETLEN":24,"BACKEND":{"TYPE":"host-gw"}}`},
		{name: "documented case", in: `{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.in))
			if err != nil {
				t.Fatalf("Parse(%s): %v", tc.in, err)
			}
			if c.Network != netip.MustParsePrefix("10.244.0.0/16") || c.SubnetLen != 24 || c.Backend.Type != BackendHostGW {
				t.Errorf("Parse(%s) = Network %s SubnetLen %d Backend %q, want 10.244.0.0/16, 24, host-gw", tc.in, c.Network, c.SubnetLen, c.Backend.Type)
			}
		})
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
	}{
		{name: "defaults", in: `{"Network":"10.244.0.0/16"}`},
		{name: "explicit range", in: `{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}`},
		{name: "dual stack", in: `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","EnableNFTables":true,"Backend":{"Type":"vxlan","VNI":4,"DirectRouting":true}}`},
		{name: "ipv6 only", in: `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","IPv6SubnetLen":80}`},
		{name: "html characters in backend options", in: `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Note":"a<b&c>d"}}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.in))
			if err != nil {
				t.Fatalf("Parse(%s): %v", tc.in, err)
			}
			out, err := c.Marshal()
			if err != nil {
				t.Fatalf("Marshal(%+v): %v", c, err)
			}
			back, err := Parse(out)
			if err != nil {
				t.Fatalf("Parse(Marshal) of %s: %v", out, err)
			}
			if !back.Equal(c) {
				t.Errorf("round trip through %s:\n got  %+v\n want %+v", out, back, c)
			}
		})
	}
}

// A flannel node reading a config that loom wrote must choose the same
// subnets and the same backend, so Marshal writes every default out.
func TestMarshalWritesDefaults(t *testing.T) {
	c := Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.244.0.0/16")}
	out, err := c.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	want := `{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.255.0","EnableIPv4":true,"EnableIPv6":false,"EnableNFTables":false,"Backend":{"Type":"vxlan"}}`
	if string(out) != want {
		t.Errorf("Marshal:\n got  %s\n want %s", out, want)
	}
}

func TestMarshalRefusesInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Config
		want string
	}{
		{
			name: "no family",
			c:    Config{},
			want: "encoding network config: EnableIPv4 and EnableIPv6 are both false: enable at least one",
		},
		{
			name: "type disagrees with raw",
			c: Config{
				EnableIPv4: true,
				Network:    netip.MustParsePrefix("10.244.0.0/16"),
				Backend:    Backend{Type: BackendUDP, Raw: json.RawMessage(`{"Type":"vxlan"}`)},
			},
			want: `encoding network config: Backend.Type "udp" disagrees with "vxlan" in Backend.Raw: make them equal`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := tc.c.Marshal()
			if err == nil {
				t.Fatalf("Marshal = %s, want error %q", out, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("Marshal error:\n got  %s\n want %s", err, tc.want)
			}
		})
	}
}

func TestContains(t *testing.T) {
	c, err := Parse([]byte(`{"Network":"10.244.0.0/16","SubnetMax":"10.244.200.0","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`))
	if err != nil {
		t.Fatal(err)
	}
	v4only, err := Parse([]byte(`{"Network":"10.244.0.0/16"}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		c      Config
		subnet string
		want   bool
	}{
		{name: "first assignable", c: c, subnet: "10.244.1.0/24", want: true},
		{name: "last assignable", c: c, subnet: "10.244.200.0/24", want: true},
		{name: "network's first subnet is reserved", c: c, subnet: "10.244.0.0/24", want: false},
		{name: "above SubnetMax", c: c, subnet: "10.244.201.0/24", want: false},
		{name: "wrong length", c: c, subnet: "10.244.2.0/25", want: false},
		{name: "not aligned", c: c, subnet: "10.244.2.1/24", want: false},
		{name: "other network", c: c, subnet: "10.245.1.0/24", want: false},
		{name: "ipv6 subnet", c: c, subnet: "fd00:10:244:7::/64", want: true},
		{name: "ipv6 first subnet reserved", c: c, subnet: "fd00:10:244::/64", want: false},
		{name: "ipv6 outside", c: c, subnet: "fd00:10:245:7::/64", want: false},
		{name: "ipv6 when only ipv4 is enabled", c: v4only, subnet: "fd00:10:244:7::/64", want: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := netip.MustParsePrefix(tc.subnet)
			if got := tc.c.Contains(p); got != tc.want {
				t.Errorf("Contains(%s) = %t, want %t", p, got, tc.want)
			}
		})
	}
	if c.Contains(netip.Prefix{}) {
		t.Error("Contains(zero prefix) = true, want false")
	}
}

func TestCheckUnderlay(t *testing.T) {
	c, err := Parse([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		underlay []string
		want     string // "" for no error
	}{
		{name: "disjoint", underlay: []string{"198.18.0.11/24", "2001:db8::11/64", "127.0.0.1/8"}},
		{name: "none"},
		{
			name:     "node network inside the pod network",
			underlay: []string{"198.18.0.11/24", "10.244.7.2/24"},
			want:     "Network 10.244.0.0/16 overlaps this node's network 10.244.7.0/24: set Network to a range that no host network uses",
		},
		{
			name:     "pod network inside the node network, ipv6",
			underlay: []string{"fd00::5/16"},
			want:     "IPv6Network fd00:10:244::/56 overlaps this node's network fd00::/16: set IPv6Network to a range that no host network uses",
		},
		{
			name:     "two addresses on one subnet are reported once",
			underlay: []string{"10.0.0.1/8", "10.0.0.2/8"},
			want:     "Network 10.244.0.0/16 overlaps this node's network 10.0.0.0/8: set Network to a range that no host network uses",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var underlay []netip.Prefix
			for _, s := range tc.underlay {
				underlay = append(underlay, netip.MustParsePrefix(s))
			}
			err := c.CheckUnderlay(underlay)
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Errorf("CheckUnderlay(%v):\n got  %q\n want %q", tc.underlay, got, tc.want)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`,
		`{"network":"10.244.0.0/16","backend":{"type":"HOST-GW"}}`,
		`{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}`,
		`{"Network":"10.244.0.0/23"}`,
		`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/63","IPv6SubnetMin":"fd00:10:244:1::"}`,
		`{"Network":"0.0.0.0/0","SubnetLen":1,"EnableIPv6":true,"IPv6Network":"::/0","IPv6SubnetLen":126}`,
		`{"Network":"10.244.0.0/16","Backend":{"VNI":1,"Note":"<\u2028>","type":null}}`,
		`{"Network":"10.244.0.0/16","SubnetLen":16}`,
		`null`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("Parse(%q): error with no message", data)
			}
			return
		}
		out, err := c.Marshal()
		if err != nil {
			t.Fatalf("Parse(%q) = %+v, but Marshal fails: %v", data, c, err)
		}
		back, err := Parse(out)
		if err != nil {
			t.Fatalf("Parse(%q) succeeded, but its Marshal %s does not parse: %v", data, out, err)
		}
		if !back.Equal(c) {
			t.Fatalf("round trip of %q through %s:\n got  %+v\n want %+v", data, out, back, c)
		}
		for _, is6 := range []bool{false, true} {
			if f := c.family(is6); f.enabled && (!c.Contains(netip.PrefixFrom(f.min, f.subnetLen)) || !c.Contains(netip.PrefixFrom(f.max, f.subnetLen))) {
				t.Fatalf("Parse(%q) = %+v, whose own SubnetMin/SubnetMax are not subnets it Contains", data, c)
			}
		}
	})
}
