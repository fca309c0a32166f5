package doctor

import (
	"encoding/json"
	"errors"
	"net/netip"
	"testing"
)

// vagrant is the Vagrant trap seen from n2: its flags pick nat0, whose
// address n1 already advertises.
func vagrant(f *Facts) {
	f.Node = "n2"
	f.Store.Leases[0].Attrs.PublicIP = addr("198.19.2.15")
	f.Underlay = UnderlayFacts{Name: "nat0", How: "-iface nat0", MTU: 1500, PublicIP: addr("198.19.2.15"), Prefixes: []netip.Prefix{pfx("198.19.2.0/24")}}
	f.Kernel.Lookups[addr("198.18.0.11")] = Lookup{Dev: "eth0"}
	f.Kernel.Lookups[addr("198.18.0.13")] = Lookup{Dev: "eth0"}
}

func TestCheckPublicIP(t *testing.T) {
	runCases(t, checkPublicIP, []checkCase{
		{name: "healthy", want: OK, in: "peers reach this node at 198.18.0.11 (eth0); 2 peers routed through eth0"},
		{name: "vagrant NAT address shared", change: vagrant, want: Fail,
			in: "198.19.2.15 is already the public IP of node n1 (lease 10.244.1.0-24)", fix: "-iface=<its name>"},
		{name: "interface reaches no peer", change: func(f *Facts) {
			f.Underlay.Name = "nat0"
			f.Kernel.Lookups[addr("198.18.0.12")] = Lookup{Err: errors.New("network is unreachable")}
			f.Kernel.Lookups[addr("198.18.0.13")] = Lookup{Dev: "eth0"}
		}, want: Fail, in: "no peer is reachable through nat0"},
		{name: "one peer elsewhere", change: func(f *Facts) { f.Kernel.Lookups[addr("198.18.0.13")] = Lookup{Dev: "eth1"} },
			want: Warn, in: "198.18.0.13 (n3) is reached through eth1, not eth0"},
		{name: "lease advertises another address", change: func(f *Facts) { f.Store.Leases[0].Attrs.PublicIP = addr("198.18.0.99") },
			want: Fail, in: "this node's lease advertises 198.18.0.99 but the flags choose 198.18.0.11"},
		{name: "no interface", change: func(f *Facts) { f.Underlay = UnderlayFacts{Err: errors.New("-iface: none of eth9 is usable")} },
			want: Fail, in: "eth9", fix: "-iface="},
		{name: "store down", change: func(f *Facts) { f.Store.Err = errors.New("down") }, want: OK, in: "not compared"},
	})
}

func TestCheckPeerLiveness(t *testing.T) {
	runCases(t, checkPeerLiveness, []checkCase{
		{name: "healthy", want: OK, in: "2 peers answer"},
		{name: "one peer silent", change: func(f *Facts) { f.Peers[0].Alive, f.Peers[0].Answer = false, "timeout" },
			want: Warn, in: "no answer from 1 peer: n2 (198.18.0.12)", fix: "etcdctl --endpoints=http://198.18.0.1:2379 del /coreos.com/network/subnets/10.244.2.0-24"},
		{name: "no peers", change: func(f *Facts) { f.Peers = nil }, want: OK},
		{name: "store down", change: func(f *Facts) { f.Store.Err = errors.New("down") }, want: Skip},
	})
}

func TestCheckDatapathHostGW(t *testing.T) {
	runCases(t, checkDatapath, []checkCase{
		{name: "healthy", want: OK, in: "10.244.2.0/24 via 198.18.0.12 dev eth0 proto 108"},
		{name: "route missing", change: func(f *Facts) { f.Kernel.Routes = f.Kernel.Routes[:3] },
			want: Fail, in: "no route to 10.244.2.0/24 (want 10.244.2.0/24 via 198.18.0.12 dev eth0)"},
		{name: "route via the wrong gateway", change: func(f *Facts) { f.Kernel.Routes[3].Gw = addr("198.18.0.99") },
			want: Fail, in: "route 10.244.2.0/24 via 198.18.0.99 dev eth0 proto 108, want via 198.18.0.12"},
		{name: "shadowed by a more specific route", change: func(f *Facts) {
			f.Kernel.Routes = append(f.Kernel.Routes, Route{Dst: pfx("10.244.2.0/25"), Gw: addr("198.18.0.1"), Dev: "eth0", Protocol: 4})
			f.Kernel.Lookups[addr("10.244.2.1")] = Lookup{Gw: addr("198.18.0.1"), Dev: "eth0"}
		}, want: Fail, in: "traffic to 10.244.2.1 goes via 198.18.0.1 dev eth0 (route 10.244.2.0/25 via 198.18.0.1 dev eth0 proto static)", fix: "ip route del"},
		{name: "peer not on-link", change: func(f *Facts) { f.Store.Leases[2].Attrs.PublicIP = addr("198.18.1.13") },
			want: Warn, in: "PublicIP 198.18.1.13 is not on eth0's subnets", fix: "vxlan"},
		{name: "flags pick another address than the lease", change: vagrant, want: Skip, in: "public-ip"},
		{name: "unknown backend", change: func(f *Facts) {
			f.Config = mustConfig(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}`)
		}, want: Skip},
	})
}

// vxlanFacts turns the healthy facts into a vxlan node with flannel.1 and
// every peer's route, neighbour and FDB entry.
func vxlanFacts(t *testing.T) func(*Facts) {
	return func(f *Facts) {
		f.Config = mustConfig(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
		f.Kernel.Links = append(f.Kernel.Links, Link{Name: "flannel.1", Index: 9, Type: "vxlan", MTU: 1450})
		f.Kernel.Routes = f.Kernel.Routes[:3]
		for i, l := range f.Store.Leases[1:] {
			mac := []string{"aa:bb:cc:00:00:02", "aa:bb:cc:00:00:03"}[i]
			data, _ := json.Marshal(map[string]any{"VNI": 1, "VtepMAC": mac})
			f.Store.Leases[i+1].Attrs.BackendData = data
			vtep := l.Subnet.Addr()
			f.Kernel.Routes = append(f.Kernel.Routes, Route{Dst: l.Subnet, Gw: vtep, Dev: "flannel.1", Protocol: 108, OnLink: true})
			f.Kernel.Neigh = append(f.Kernel.Neigh, Neigh{IP: vtep, MAC: mac, Dev: "flannel.1", State: "permanent"})
			f.Kernel.FDB = append(f.Kernel.FDB, FDBEntry{MAC: mac, Dst: l.Attrs.PublicIP, Dev: "flannel.1"})
			f.Kernel.Lookups[podAddr(l.Subnet, 1)] = Lookup{Gw: vtep, Dev: "flannel.1"}
		}
	}
}

func TestCheckDatapathVXLAN(t *testing.T) {
	v := vxlanFacts(t)
	runCases(t, checkDatapath, []checkCase{
		{name: "healthy", change: v, want: OK, in: "neighbour and fdb aa:bb:cc:00:00:02 -> 198.18.0.12"},
		{name: "fdb entry lost", change: func(f *Facts) { v(f); f.Kernel.FDB = f.Kernel.FDB[1:] },
			want: Fail, in: "missing fdb aa:bb:cc:00:00:02 dst 198.18.0.12 dev flannel.1"},
		{name: "neighbour lost", change: func(f *Facts) { v(f); f.Kernel.Neigh = nil },
			want: Fail, in: "neighbour 10.244.2.0 lladdr aa:bb:cc:00:00:02 dev flannel.1 permanent"},
		{name: "device deleted", change: func(f *Facts) { v(f); f.Kernel.Links = f.Kernel.Links[:5] },
			want: Fail, in: "no VXLAN device flannel.1"},
		{name: "direct routing to on-link peers", change: func(f *Facts) {
			f.Config = mustConfig(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}`)
		}, want: OK, in: "via 198.18.0.12 dev eth0"},
	})
}
