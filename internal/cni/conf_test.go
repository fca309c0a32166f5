package cni

// Unit tests of configuration and planning; no root, no kernel.
// Address plan: pod network 10.244.0.0/16, node subnet 10.244.1.0/24
// (gateway .1), IPv6 fc00::/48 with node subnet fc00:0:0:1::/64.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/subnetenv"
)

func TestParseConf(t *testing.T) {
	tests := []struct {
		name     string
		stdin    string
		want     *Config // compared field by field when set
		wantCode uint    // expected CNI error code, 0 for success
		wantMsg  string  // substring of the error message
	}{
		{
			name:  "defaults",
			stdin: `{"cniVersion":"1.1.0","name":"loom","type":"loom-cni"}`,
			want: &Config{
				CNIVersion: "1.1.0", Name: "loom", SubnetFile: "/run/flannel/subnet.env",
				DataDir: "/var/lib/cni/networks", Bridge: "cni0", HairpinMode: true, IsDefaultGateway: true,
			},
		},
		{
			name: "every field, unknown ones ignored",
			stdin: `{"cniVersion":"0.4.0","name":"n1","type":"loom-cni","subnetFile":"/run/loom/a/n1/subnet.env",
				"dataDir":"/run/loom/a/n1/ipam","bridge":"br-pods","hairpinMode":false,"mtu":1400,
				"isDefaultGateway":false,"runtimeConfig":{"portMappings":[]},"args":{"k":"v"},"somethingNew":1}`,
			want: &Config{
				CNIVersion: "0.4.0", Name: "n1", SubnetFile: "/run/loom/a/n1/subnet.env",
				DataDir: "/run/loom/a/n1/ipam", Bridge: "br-pods", HairpinMode: false, MTU: 1400, IsDefaultGateway: false,
			},
		},
		{
			name:  "null mtu means FLANNEL_MTU",
			stdin: `{"cniVersion":"1.1.0","name":"loom","mtu":null}`,
			want: &Config{
				CNIVersion: "1.1.0", Name: "loom", SubnetFile: "/run/flannel/subnet.env",
				DataDir: "/var/lib/cni/networks", Bridge: "cni0", HairpinMode: true, IsDefaultGateway: true,
			},
		},
		{name: "not JSON", stdin: `{"cniVersion":`, wantCode: types.ErrDecodingFailure, wantMsg: "decode network configuration"},
		{name: "not an object", stdin: `[1,2]`, wantCode: types.ErrDecodingFailure},
		{name: "mtu string", stdin: `{"name":"loom","mtu":"x"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: `mtu "x" is not a number`},
		{name: "mtu too small", stdin: `{"name":"loom","mtu":67}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "mtu 67 is not an integer between 68 and 65535"},
		{name: "mtu fraction", stdin: `{"name":"loom","mtu":1400.5}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "mtu 1400.5"},
		{name: "bridge number", stdin: `{"name":"loom","bridge":5}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "bridge is a JSON number, want string"},
		{name: "bridge too long", stdin: `{"name":"loom","bridge":"abcdefghijklmnop"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "bridge"},
		{name: "bridge with slash", stdin: `{"name":"loom","bridge":"a/b"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "bridge"},
		{name: "hairpin string", stdin: `{"name":"loom","hairpinMode":"yes"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "hairpinMode"},
		{name: "relative subnetFile", stdin: `{"name":"loom","subnetFile":"subnet.env"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "subnetFile"},
		{name: "relative dataDir", stdin: `{"name":"loom","dataDir":"ipam"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "dataDir"},
		{name: "no name", stdin: `{"cniVersion":"1.1.0"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "name is missing"},
		{name: "name escapes dataDir", stdin: `{"name":"../x"}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "name"},
		{name: "bad valid-attachments", stdin: `{"name":"loom","cni.dev/valid-attachments":{"a":1}}`, wantCode: types.ErrInvalidNetworkConfig, wantMsg: "valid-attachments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseConf([]byte(tt.stdin))
			if tt.wantCode != 0 {
				var te *types.Error
				if !errors.As(err, &te) {
					t.Fatalf("ParseConf = %+v, %v; want a CNI error with code %d", got, err, tt.wantCode)
				}
				if te.Code != tt.wantCode || !strings.Contains(te.Msg, tt.wantMsg) {
					t.Fatalf("error code %d %q, want code %d containing %q", te.Code, te.Msg, tt.wantCode, tt.wantMsg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("ParseConf =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestParseConfValidAttachments(t *testing.T) {
	tests := []struct {
		name  string
		stdin string
		want  []ipam.Attachment
	}{
		{name: "absent: GC frees nothing", stdin: `{"name":"loom"}`, want: nil},
		{name: "empty: nothing is valid", stdin: `{"name":"loom","cni.dev/valid-attachments":[]}`, want: []ipam.Attachment{}},
		{name: "null: nothing is valid", stdin: `{"name":"loom","cni.dev/valid-attachments":null}`, want: []ipam.Attachment{}},
		{
			name:  "list",
			stdin: `{"name":"loom","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}`,
			want:  []ipam.Attachment{{ContainerID: "c1", IfName: "eth0"}},
		},
		{
			name:  "the spec's first spelling",
			stdin: `{"name":"loom","cni.dev/attachments":[{"containerID":"c2","ifname":"net1"}]}`,
			want:  []ipam.Attachment{{ContainerID: "c2", IfName: "net1"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConf([]byte(tt.stdin))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(c.ValidAttachments, tt.want) || (c.ValidAttachments == nil) != (tt.want == nil) {
				t.Fatalf("ValidAttachments = %#v, want %#v", c.ValidAttachments, tt.want)
			}
		})
	}
}

func TestParseConfPrevResult(t *testing.T) {
	c, err := ParseConf([]byte(`{"cniVersion":"1.0.0","name":"loom","prevResult":{"cniVersion":"1.0.0",
		"interfaces":[{"name":"eth0"}],"ips":[{"interface":0,"address":"10.244.1.2/24","gateway":"10.244.1.1"}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.PrevResult == nil || c.PrevResult.Version() != "1.0.0" {
		t.Fatalf("PrevResult = %v, want a 1.0.0 result", c.PrevResult)
	}
	_, err = ParseConf([]byte(`{"cniVersion":"1.0.0","name":"loom","prevResult":{"ips":"x"}}`))
	if te, ok := errors.AsType[*types.Error](err); !ok || te.Code != types.ErrDecodingFailure {
		t.Fatalf("bad prevResult: err = %v, want code 6", err)
	}
}

func TestConfListRoundTrip(t *testing.T) {
	f := false
	b, err := ConfList("1.1.0", "loom", NetConf{SubnetFile: "/run/loom/a/n1/subnet.env", MTU: 1400, HairpinMode: &f},
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}})
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		CNIVersion string            `json:"cniVersion"`
		Name       string            `json:"name"`
		Plugins    []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	if list.CNIVersion != "1.1.0" || list.Name != "loom" || len(list.Plugins) != 2 {
		t.Fatalf("ConfList rendered %s", b)
	}
	// A runtime hands each plugin its entry plus the list's name and version.
	var entry map[string]any
	if err := json.Unmarshal(list.Plugins[0], &entry); err != nil {
		t.Fatal(err)
	}
	if entry["type"] != PluginType {
		t.Fatalf("first plugin is %v, want %s", entry["type"], PluginType)
	}
	entry["name"], entry["cniVersion"] = list.Name, list.CNIVersion
	stdin, _ := json.Marshal(entry)
	c, err := ParseConf(stdin)
	if err != nil {
		t.Fatal(err)
	}
	if c.SubnetFile != "/run/loom/a/n1/subnet.env" || c.MTU != 1400 || c.HairpinMode || !c.IsDefaultGateway || c.Bridge != DefaultBridge {
		t.Fatalf("round trip gave %+v", c)
	}
}

func TestNewPlan(t *testing.T) {
	dual := subnetenv.Env{
		Network:     netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:      netip.MustParsePrefix("10.244.1.1/24"),
		IPv6Network: netip.MustParsePrefix("fc00::/48"),
		IPv6Subnet:  netip.MustParsePrefix("fc00:0:0:1::1/64"),
		MTU:         1450,
	}
	tests := []struct {
		name       string
		conf       Config
		env        subnetenv.Env
		wantMTU    int
		wantRoutes []string // per family, "dst via gw"
		wantErr    string
	}{
		{
			name: "dual stack, default gateway", conf: Config{IsDefaultGateway: true}, env: dual, wantMTU: 1450,
			wantRoutes: []string{"0.0.0.0/0 via 10.244.1.1", "::/0 via fc00:0:0:1::1"},
		},
		{
			name: "pod network only, mtu override", conf: Config{MTU: 1400}, env: dual, wantMTU: 1400,
			wantRoutes: []string{"10.244.0.0/16 via 10.244.1.1", "fc00::/48 via fc00:0:0:1::1"},
		},
		{
			name: "ipv6 only", conf: Config{IsDefaultGateway: true}, wantMTU: 1450,
			env:        subnetenv.Env{IPv6Subnet: netip.MustParsePrefix("fc00:0:0:1::1/64"), MTU: 1450},
			wantRoutes: []string{"::/0 via fc00:0:0:1::1"},
		},
		{
			name: "no network for a pod-network route", conf: Config{},
			env:     subnetenv.Env{Subnet: netip.MustParsePrefix("10.244.1.1/24"), MTU: 1450},
			wantErr: "without its network",
		},
		{
			name: "subnet written as the network address", conf: Config{IsDefaultGateway: true},
			env:     subnetenv.Env{Subnet: netip.MustParsePrefix("10.244.1.0/24"), MTU: 1450},
			wantErr: "e.g. 10.244.1.1/24",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := newPlan(&tt.conf, tt.env)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("newPlan err = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.mtu != tt.wantMTU {
				t.Errorf("mtu = %d, want %d", p.mtu, tt.wantMTU)
			}
			var routes []string
			for _, f := range p.families {
				if f.pool.Gateway != f.gateway.Addr() || f.pool.Subnet != f.gateway.Masked() {
					t.Errorf("family %v: pool %v does not match gateway", f.gateway, f.pool)
				}
				for _, r := range f.routes {
					routes = append(routes, r.String()+" via "+f.gateway.Addr().String())
				}
			}
			if !reflect.DeepEqual(routes, tt.wantRoutes) {
				t.Errorf("routes = %q, want %q", routes, tt.wantRoutes)
			}
		})
	}
}

func TestHostVethName(t *testing.T) {
	a := HostVethName("c1", "eth0")
	if a != HostVethName("c1", "eth0") || len(a) > 15 || !strings.HasPrefix(a, "veth") {
		t.Fatalf("HostVethName = %q: want a stable veth name of at most 15 bytes", a)
	}
	for _, other := range []string{HostVethName("c1", "net1"), HostVethName("c2", "eth0"), HostVethName("c1e", "th0")} {
		if other == a {
			t.Fatalf("distinct attachments share the veth name %q", a)
		}
	}
}

func TestBridgeMAC(t *testing.T) {
	p, err := newPlan(&Config{IsDefaultGateway: true}, subnetenv.Env{Subnet: netip.MustParsePrefix("10.244.1.1/24"), MTU: 1450})
	if err != nil {
		t.Fatal(err)
	}
	mac := bridgeMAC(p.families)
	if mac[0]&0x01 != 0 || mac[0]&0x02 == 0 {
		t.Fatalf("bridge MAC %s is not a locally administered unicast address", mac)
	}
	q, _ := newPlan(&Config{IsDefaultGateway: true}, subnetenv.Env{Subnet: netip.MustParsePrefix("10.244.2.1/24"), MTU: 1450})
	if bridgeMAC(q.families).String() == mac.String() || bridgeMAC(p.families).String() != mac.String() {
		t.Fatal("bridge MAC must be stable for one subnet and differ between subnets")
	}
}

// FuzzParseConf feeds arbitrary stdin to the parser: it must never panic,
// must fail only with code 6 or 7, and what it accepts must be usable and
// survive a round trip through NetConf.
func FuzzParseConf(f *testing.F) {
	for _, seed := range []string{
		`{"cniVersion":"1.1.0","name":"loom","type":"loom-cni"}`,
		`{"cniVersion":"0.4.0","name":"n1","subnetFile":"/run/s.env","dataDir":"/d","bridge":"br0","hairpinMode":false,"mtu":1400,"isDefaultGateway":false}`,
		`{"name":"loom","mtu":"x"}`,
		`{"name":"loom","mtu":1e3}`,
		`{"name":"loom","cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}]}`,
		`{"cniVersion":"1.0.0","name":"loom","prevResult":{"ips":[{"address":"10.244.1.2/24"}]}}`,
		`{"name":"loom","bridge":"a\u0000b"}`,
		`[]`, `null`, ``, `{`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, stdin []byte) {
		c, err := ParseConf(stdin)
		if err != nil {
			te, ok := errors.AsType[*types.Error](err)
			if !ok || (te.Code != types.ErrDecodingFailure && te.Code != types.ErrInvalidNetworkConfig) || te.Msg == "" {
				t.Fatalf("ParseConf(%q) error %#v: want a CNI error with code 6 or 7 and a message", stdin, err)
			}
			return
		}
		if c.Name == "" || validIfName(c.Bridge) != nil || (c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535)) {
			t.Fatalf("ParseConf(%q) accepted an unusable config %+v", stdin, c)
		}
		if _, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name}); err != nil {
			t.Fatalf("ParseConf(%q) accepted a config whose store cannot open: %v", stdin, err)
		}
		b, err := json.Marshal(c.NetConf())
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseConf(b)
		if err != nil {
			t.Fatalf("re-parse of %s: %v", b, err)
		}
		again.PrevResult, again.ValidAttachments = c.PrevResult, c.ValidAttachments
		if !reflect.DeepEqual(again, c) {
			t.Fatalf("round trip changed the config:\n%+v\n%+v", c, again)
		}
	})
}

func TestCNIErrorCodes(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want uint
	}{
		{name: "lock timeout: try again", err: fmt.Errorf("allocate: %w", ipam.ErrLockTimeout), want: types.ErrTryAgainLater},
		{name: "exhausted: not available", err: fmt.Errorf("allocate: %w", ipam.ErrExhausted), want: types.ErrPluginNotAvailable},
		{name: "permission: I/O", err: fmt.Errorf("create store: %w", fs.ErrPermission), want: types.ErrIOFailure},
		{name: "a chosen code is kept", err: fmt.Errorf("x: %w", types.NewError(types.ErrInvalidNetNS, "bad netns", "")), want: types.ErrInvalidNetNS},
		{name: "anything else: internal", err: errors.New("boom"), want: types.ErrInternal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			te, ok := errors.AsType[*types.Error](cniError("ADD", tt.err))
			if !ok || te.Code != tt.want || te.Msg == "" {
				t.Fatalf("cniError(%v) = %+v, want code %d with a message", tt.err, te, tt.want)
			}
		})
	}
}
