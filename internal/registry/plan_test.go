package registry

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
)

// Address plan: pods 10.244.0.0/16 in /24s from 10.244.1.0; node public IPs
// 198.18.0.11 (n1), .12 (n2), .13 (n3); 198.18.0.99 is a flanneld node.

func testConfig(t *testing.T, netConf string) netconf.Config {
	t.Helper()
	cfg, err := netconf.Parse([]byte(netConf))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func pub(ip string) lease.Attrs {
	return lease.Attrs{PublicIP: netip.MustParseAddr(ip), BackendType: "vxlan"}
}

// ent builds a listed entry: live unless reserved, named unless node is "".
func ent(subnet, node, ip string, reserved bool, create int64) entry {
	a := pub(ip)
	a.NodeName = node
	l := lease.Lease{Subnet: netip.MustParsePrefix(subnet), Attrs: a, Revision: create}
	if !reserved {
		l.Expiration = time.Now().Add(time.Hour)
	}
	return entry{Lease: l, create: create, hasName: node != ""}
}

func TestPlanOrder(t *testing.T) {
	cfg := testConfig(t, `{"Network":"10.244.0.0/16"}`)
	for _, tc := range []struct {
		name     string
		entries  []entry
		previous string
		kind     claimKind
		subnet   string // "" for any free subnet
	}{
		{
			name:    "reservation by name beats own live lease",
			entries: []entry{ent("10.244.5.0/24", "n1", "198.18.0.11", false, 1), ent("10.244.9.0/24", "n1", "198.18.0.50", true, 2)},
			kind:    claimReservation, subnet: "10.244.9.0/24",
		},
		{
			name:    "unnamed reservation with our IP",
			entries: []entry{ent("10.244.9.0/24", "", "198.18.0.11", true, 2)},
			kind:    claimReservation, subnet: "10.244.9.0/24",
		},
		{
			name:    "reservation for another node with our IP is not ours",
			entries: []entry{ent("10.244.9.0/24", "n7", "198.18.0.11", true, 2)},
			kind:    claimNew,
		},
		{
			name:    "own live lease by name",
			entries: []entry{ent("10.244.5.0/24", "n1", "198.18.0.50", false, 1)},
			kind:    claimTakeover, subnet: "10.244.5.0/24",
		},
		{
			name:    "named lease beats flanneld lease with our IP",
			entries: []entry{ent("10.244.6.0/24", "", "198.18.0.11", false, 1), ent("10.244.5.0/24", "n1", "198.18.0.11", false, 2)},
			kind:    claimTakeover, subnet: "10.244.5.0/24",
		},
		{
			name:    "flanneld lease with our IP",
			entries: []entry{ent("10.244.6.0/24", "", "198.18.0.11", false, 1)},
			kind:    claimTakeover, subnet: "10.244.6.0/24",
		},
		{
			name:     "previous among two own leases",
			entries:  []entry{ent("10.244.5.0/24", "n1", "198.18.0.11", false, 1), ent("10.244.7.0/24", "n1", "198.18.0.11", false, 2)},
			previous: "10.244.7.0/24",
			kind:     claimTakeover, subnet: "10.244.7.0/24",
		},
		{
			name:     "own lease outside the range is skipped",
			entries:  []entry{ent("10.244.0.0/24", "n1", "198.18.0.11", false, 1)},
			previous: "10.244.3.0/24",
			kind:     claimNew, subnet: "10.244.3.0/24",
		},
		{
			name:     "free previous",
			entries:  []entry{ent("10.244.2.0/24", "n2", "198.18.0.12", false, 1)},
			previous: "10.244.3.0/24",
			kind:     claimNew, subnet: "10.244.3.0/24",
		},
		{
			name:     "previous taken by another node",
			entries:  []entry{ent("10.244.3.0/24", "n2", "198.18.0.12", false, 1)},
			previous: "10.244.3.0/24",
			kind:     claimNew,
		},
		{
			name:     "previous reserved for another node",
			entries:  []entry{ent("10.244.3.0/24", "n2", "198.18.0.12", true, 1)},
			previous: "10.244.3.0/24",
			kind:     claimNew,
		},
		{
			name:     "previous outside the range",
			previous: "10.245.3.0/24",
			kind:     claimNew,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := Request{NodeName: "n1", Attrs: pub("198.18.0.11"), Config: cfg}
			if tc.previous != "" {
				req.Previous = netip.MustParsePrefix(tc.previous)
			}
			c, err := plan(req, tc.entries)
			if err != nil {
				t.Fatal(err)
			}
			if c.kind != tc.kind {
				t.Fatalf("kind %v, want %v (claim %+v)", c.kind, tc.kind, c)
			}
			if tc.subnet != "" && c.v4.String() != tc.subnet {
				t.Fatalf("subnet %s, want %s", c.v4, tc.subnet)
			}
			if !lease.Fits(cfg, c.v4, c.v6) {
				t.Fatalf("%s does not fit the config", c.v4)
			}
			if c.kind == claimNew {
				for _, e := range tc.entries {
					if e.Subnet.Overlaps(c.v4) {
						t.Fatalf("new claim %s overlaps listed %s", c.v4, e.Subnet)
					}
				}
			}
		})
	}
}

func TestPlanDuplicatePublicIP(t *testing.T) {
	cfg := testConfig(t, `{"Network":"10.244.0.0/16"}`)
	req := Request{NodeName: "n2", Attrs: pub("198.18.0.11"), Config: cfg}
	_, err := plan(req, []entry{ent("10.244.1.0/24", "n1", "198.18.0.11", false, 1)})
	if !errors.Is(err, ErrPublicIPInUse) {
		t.Fatalf("err = %v, want ErrPublicIPInUse", err)
	}
	want := "public IP 198.18.0.11 is already used by node n1 (lease 10.244.1.0-24); node n2 cannot share it: start n2 with -iface=<its own interface> or -public-ip=<its own address>"
	if err.Error() != want {
		t.Fatalf("err = %q\nwant %q", err, want)
	}

	// A reservation or a flanneld lease with the IP is no conflict.
	for _, e := range []entry{ent("10.244.1.0/24", "n1", "198.18.0.11", true, 1), ent("10.244.1.0/24", "", "198.18.0.11", false, 1)} {
		if _, err := plan(req, []entry{e}); err != nil {
			t.Errorf("entry %v: %v", e.Lease, err)
		}
	}
	// Nor is a lease of the same node on the same IP.
	if _, err := plan(req, []entry{ent("10.244.1.0/24", "n2", "198.18.0.11", false, 1)}); err != nil {
		t.Error(err)
	}
	// IPv6 underlay: the same check on PublicIPv6.
	v6 := netip.MustParseAddr("2001:db8::11")
	other := ent("10.244.1.0/24", "n1", "198.18.0.11", false, 1)
	other.Attrs.PublicIPv6 = &v6
	req.Attrs = pub("198.18.0.12")
	req.Attrs.PublicIPv6 = &v6
	if _, err := plan(req, []entry{other}); !errors.Is(err, ErrPublicIPInUse) || !strings.Contains(err.Error(), "2001:db8::11") {
		t.Fatalf("err = %v, want ErrPublicIPInUse naming 2001:db8::11", err)
	}
}
