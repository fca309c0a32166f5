package cni

// ADD's result as printResult writes it must be what types.PrintResult
// would have written: the same JSON value, which libcni and runtimes parse
// and cache. No root, no kernel. Address plan as in conf_test.go.

import (
	"encoding/json"
	"net"
	"net/netip"
	"reflect"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

func TestResultJSON(t *testing.T) {
	dual := plan{mtu: 1450, families: []family{
		{gateway: netip.MustParsePrefix("10.244.1.1/24"), routes: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}},
		{gateway: netip.MustParsePrefix("fc00:0:0:1::1/64"), routes: []netip.Prefix{netip.MustParsePrefix("::/0")}},
	}}
	dualAddrs := []netip.Prefix{netip.MustParsePrefix("10.244.1.7/24"), netip.MustParsePrefix("fc00:0:0:1::7/64")}
	dualRoutes := []route{
		{dst: netip.MustParsePrefix("0.0.0.0/0"), gw: netip.MustParseAddr("10.244.1.1")},
		{dst: netip.MustParsePrefix("::/0"), gw: netip.MustParseAddr("fc00:0:0:1::1")},
	}
	ifaces := func(sandbox string) []*current.Interface {
		return []*current.Interface{
			{Name: "cni0", Mac: "02:11:22:33:44:55", Mtu: 1450},
			{Name: "veth0123abcd", Mac: "02:aa:bb:cc:dd:ee", Mtu: 1450},
			{Name: "eth0", Mac: "02:01:02:03:04:05", Mtu: 1450, Sandbox: sandbox},
		}
	}
	tests := []struct {
		name string
		res  *current.Result
	}{
		{name: "dual stack", res: newResult(ifaces("/var/run/netns/cni-1234"), dual, dualAddrs, dualRoutes)},
		{name: "ipv4, route to the pod network", res: newResult(ifaces("/run/netns/p"), plan{families: dual.families[:1]},
			dualAddrs[:1], []route{{dst: netip.MustParsePrefix("10.244.0.0/16"), gw: netip.MustParseAddr("10.244.1.1")}})},
		{name: "no routes, no mac, no mtu", res: newResult([]*current.Interface{{Name: "eth0", Sandbox: "/x"}}, plan{families: dual.families[:1]}, dualAddrs[:1], nil)},
		{name: "sandbox needing escapes", res: newResult(ifaces("/run/netns/\"a\\b\"\n\t<&>\u2028é\xff\x01"), dual, dualAddrs, dualRoutes)},
		{name: "empty", res: &current.Result{}},
	}
	for _, tt := range tests {
		for _, version := range []string{"1.0.0", "1.1.0"} {
			t.Run(tt.name+"/"+version, func(t *testing.T) {
				if !plainResult(tt.res) {
					t.Fatal("plainResult = false for a result ADD makes")
				}
				sameJSON(t, tt.res, version)
			})
		}
	}
}

// Results with fields appendResult does not write are left to
// types.PrintResult.
func TestResultJSONFallback(t *testing.T) {
	one := 1
	for name, res := range map[string]*current.Result{
		"dns":           {DNS: types.DNS{Nameservers: []string{"10.96.0.10"}}},
		"socket path":   {Interfaces: []*current.Interface{{Name: "eth0", SocketPath: "/s"}}},
		"route table":   {Routes: []*types.Route{{Dst: net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Table: &one}}},
		"odd gateway":   {IPs: []*current.IPConfig{{Address: net.IPNet{IP: net.IPv4(10, 244, 1, 2).To4(), Mask: net.CIDRMask(24, 32)}, Gateway: net.IP{1, 2, 3}}}},
		"nil interface": {Interfaces: []*current.Interface{nil}},
	} {
		if plainResult(res) {
			t.Errorf("%s: plainResult = true, want the types.PrintResult path", name)
		}
	}
}

// FuzzResultJSON compares appendResult with encoding/json for arbitrary
// strings where a result carries them.
func FuzzResultJSON(f *testing.F) {
	f.Add("eth0", "02:01:02:03:04:05", "/var/run/netns/cni-1", 1450, true)
	f.Add("\"", "\\", "\u2028<>&\x00\xff", 0, false)
	f.Fuzz(func(t *testing.T, name, mac, sandbox string, mtu int, v6 bool) {
		p := plan{families: []family{{gateway: netip.MustParsePrefix("10.244.1.1/24")}}}
		addrs := []netip.Prefix{netip.MustParsePrefix("10.244.1.9/24")}
		if v6 {
			p.families[0].gateway = netip.MustParsePrefix("fc00:0:0:1::1/64")
			addrs[0] = netip.MustParsePrefix("fc00:0:0:1::9/64")
		}
		res := newResult([]*current.Interface{{Name: name, Mac: mac, Mtu: mtu, Sandbox: sandbox}}, p, addrs,
			[]route{{dst: netip.PrefixFrom(unspecified(addrs[0].Addr()), 0), gw: p.families[0].gateway.Addr()}})
		sameJSON(t, res, "1.1.0")
	})
}

// sameJSON fails unless appendResult and encoding/json (what
// types.PrintResult prints) give the same JSON value for res.
func sameJSON(t *testing.T, res *current.Result, version string) {
	t.Helper()
	ours := appendResult(nil, res, version)
	conv, err := res.GetAsVersion(version)
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := json.Marshal(conv)
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	if err := json.Unmarshal(ours, &a); err != nil {
		t.Fatalf("appendResult wrote invalid JSON %q: %v", ours, err)
	}
	if err := json.Unmarshal(theirs, &b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("appendResult wrote\n%s\nencoding/json writes\n%s", ours, theirs)
	}
	// And libcni reads it back as the same result.
	back, err := current.NewResult(ours)
	if err != nil {
		t.Fatalf("libcni cannot read %s: %v", ours, err)
	}
	if again, _ := json.Marshal(back); string(again) != string(theirs) {
		t.Fatalf("read back as %s, want %s", again, theirs)
	}
}
