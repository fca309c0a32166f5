package iface

import (
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/loomnet/loom/internal/testnet"
)

// Address plan: a namespace with two interfaces, like a Vagrant VM:
// "nat0" 198.19.2.15/24 holding the default route (the NAT interface every
// VM shares) and "eth1" 198.18.0.11/24 (the host-only network the cluster
// should use).

func setup(t *testing.T) ns.NetNS {
	t.Helper()
	n := testnet.NewNS(t, "iface")
	err := n.Do(func(ns.NetNS) error {
		for _, l := range []struct{ name, peer, addr string }{
			{"nat0", "nat0-p", "198.19.2.15/24"},
			{"eth1", "eth1-p", "198.18.0.11/24"},
		} {
			attrs := netlink.NewLinkAttrs()
			attrs.Name = l.name
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: l.peer}); err != nil {
				return err
			}
			link, _ := netlink.LinkByName(l.name)
			peer, _ := netlink.LinkByName(l.peer)
			addr, _ := netlink.ParseAddr(l.addr)
			if err := netlink.AddrAdd(link, addr); err != nil {
				return err
			}
			for _, x := range []netlink.Link{link, peer} {
				if err := netlink.LinkSetUp(x); err != nil {
					return err
				}
			}
		}
		nat, _ := netlink.LinkByName("nat0")
		return netlink.RouteAdd(&netlink.Route{LinkIndex: nat.Attrs().Index, Gw: net.ParseIP("198.19.2.2")})
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestSelect(t *testing.T) {
	n := setup(t)
	for _, tc := range []struct {
		name     string
		cfg      Config
		wantName string
		wantIP   string
		wantErr  string
	}{
		{name: "default route (the Vagrant trap)", cfg: Config{WantV4: true}, wantName: "nat0", wantIP: "198.19.2.15"},
		{name: "-iface by name", cfg: Config{Ifaces: []string{"eth1"}, WantV4: true}, wantName: "eth1", wantIP: "198.18.0.11"},
		{name: "-iface by address", cfg: Config{Ifaces: []string{"198.18.0.11"}, WantV4: true}, wantName: "eth1", wantIP: "198.18.0.11"},
		{name: "-iface first usable", cfg: Config{Ifaces: []string{"eth9", "eth1"}, WantV4: true}, wantName: "eth1", wantIP: "198.18.0.11"},
		{name: "-iface-regex", cfg: Config{Regexes: []*regexp.Regexp{regexp.MustCompile(`^198\.18\.`)}, WantV4: true}, wantName: "eth1", wantIP: "198.18.0.11"},
		{name: "-iface-can-reach", cfg: Config{CanReach: netip.MustParseAddr("198.18.0.12"), WantV4: true}, wantName: "eth1", wantIP: "198.18.0.11"},
		{name: "-public-ip overrides", cfg: Config{Ifaces: []string{"eth1"}, PublicIP: netip.MustParseAddr("198.18.5.5"), WantV4: true}, wantName: "eth1", wantIP: "198.18.5.5"},
		{name: "no such iface", cfg: Config{Ifaces: []string{"eth9"}}, wantErr: "-iface: none of eth9 is usable: eth9 (no such interface)"},
		{name: "regex matches nothing", cfg: Config{Regexes: []*regexp.Regexp{regexp.MustCompile(`^wg`)}}, wantErr: "-iface-regex: no interface name or address matches ^wg"},
		{name: "no IPv6 address", cfg: Config{Ifaces: []string{"eth1"}, WantV6: true}, wantErr: "has no global IPv6 address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got Iface
			err := n.Do(func(ns.NetNS) error {
				var err error
				got, err = Select(tc.cfg)
				return err
			})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Name != tc.wantName || got.PublicIP.String() != tc.wantIP {
				t.Fatalf("chose %s with public IP %s, want %s with %s", got.Name, got.PublicIP, tc.wantName, tc.wantIP)
			}
			if got.How == "" || got.MTU == 0 || len(got.Prefixes) == 0 {
				t.Fatalf("incomplete description: %+v", got)
			}
		})
	}
}
