package doctor

import (
	"strings"
	"testing"
)

// withIPT replaces the firewall facts by an iptables dump (nft reads the
// same tables through iptables-nft, so the nft view is left out).
func withIPT(t *testing.T, files ...string) func(*Facts) {
	return func(f *Facts) {
		ipt := &IPTables{Tables: map[string]*IPTTable{}}
		for _, file := range files {
			for name, tab := range readIPT(t, file).Tables {
				ipt.Tables[name] = tab
			}
		}
		f.Firewall = FirewallFacts{IPT: ipt}
	}
}

// seed000 is the node of seed 000: pods in 10.224.0.0/24 (kubeadm's
// --pod-network-cidr), flannel's rules for Network 10.244.0.0/16.
func seed000(t *testing.T) func(*Facts) {
	return func(f *Facts) {
		withIPT(t, "iptables-seed000.txt")(f)
		f.SubnetEnv.Env.Subnet = pfx("10.224.0.1/24")
		f.Store.Leases[0].Subnet = pfx("10.224.0.0/24")
	}
}

func TestCheckMasquerade(t *testing.T) {
	runCases(t, checkMasquerade, []checkCase{
		{name: "nftables healthy", want: OK,
			in: `masqueraded by table ip loom chain nat-postrouting: ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random`},
		{name: "iptables healthy", change: withIPT(t, "iptables-loom.txt"), want: OK,
			in: "masqueraded by -A LOOM-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4"},
		{name: "no rules", change: func(f *Facts) { f.Firewall = FirewallFacts{IPT: &IPTables{}} },
			want: Fail, in: "no masquerade rule in iptables or nftables", fix: "restart the agent"},
		{name: "rules for another CIDR (seed 000)", change: seed000(t), want: Fail,
			in: "present: -A POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE", fix: "network-vs-lease"},
		{name: "seed 000 summary", change: seed000(t), want: Fail, in: "this node's pods (10.224.0.0/24) are outside the pod network 10.244.0.0/16"},
		{name: "pod to pod masqueraded by a foreign rule", change: withIPT(t, "iptables-overmasq.txt"), want: Fail,
			in: "pod-to-pod traffic inside 10.244.0.0/16 is masqueraded", fix: "iptables -t nat -D POSTROUTING -s 10.244.0.0/16 -j MASQUERADE"},
		{name: "ip-masq off", change: func(f *Facts) {
			f.Opts.IPMasq = false
			f.Firewall = FirewallFacts{IPT: &IPTables{}}
		}, want: OK, in: "-ip-masq is off"},
		{name: "firewall unreadable", change: func(f *Facts) { f.Firewall = FirewallFacts{} }, want: Warn, in: "cannot read the firewall"},
		{name: "subnet unknown", change: func(f *Facts) { f.SubnetEnv.Env = nil; f.Store.Leases = nil }, want: Skip},
	})
}

func TestCheckForward(t *testing.T) {
	runCases(t, checkForward, []checkCase{
		{name: "nftables healthy", want: OK, in: "forwarded"},
		{name: "iptables healthy", change: withIPT(t, "iptables-loom.txt"), want: OK},
		{name: "Docker's DROP, no accept for pods", change: withIPT(t, "iptables-docker.txt"), want: Fail,
			in: "dropped by :FORWARD DROP (policy of table filter)", fix: "iptables -P FORWARD ACCEPT"},
		{name: "Docker's DROP and loom's nftables accept", change: func(f *Facts) {
			withIPT(t, "iptables-docker.txt")(f)
			f.Firewall.NFT = readNFT(t, "nft-loom.json", "")
		}, want: Fail, in: "iptables filter :FORWARD DROP"},
		{name: "Docker's DROP and loom's LOOM-FWD", change: func(f *Facts) {
			withIPT(t, "iptables-docker.txt")(f)
			loom := readIPT(t, "iptables-loom.txt").Tables["filter"]
			fw := f.Firewall.IPT.Tables["filter"]
			fw.Chains["LOOM-FWD"] = loom.Chains["LOOM-FWD"]
			fw.Chains["FORWARD"].Rules = append(loom.Chains["FORWARD"].Rules, fw.Chains["FORWARD"].Rules...)
		}, want: OK},
		{name: "forward rules off", change: func(f *Facts) {
			withIPT(t, "iptables-docker.txt")(f)
			f.Opts.IPTablesForwardRules = false
		}, want: Fail, fix: "iptables -A FORWARD -s 10.244.0.0/16 -j ACCEPT"},
	})
}

// Packet traces through loom's own rules, in both renderings: the packet
// classes of the rule table in package firewall.
func TestTraceLoomRules(t *testing.T) {
	ipt := readIPT(t, "iptables-loom.txt")
	nft := readNFT(t, "nft-loom.json", "nft-loom.txt")
	nat := nft.BaseChains("postrouting", "nat", false)
	if len(nat) != 1 {
		t.Fatalf("nft nat base chains: %d, want 1 (table ip loom)", len(nat))
	}
	for _, tc := range []struct {
		name string
		p    Packet
		want Verdict
	}{
		{name: "pod to outside", p: Packet{Src: addr("10.244.1.2"), Dst: addr("203.0.113.10")}, want: Masquerade},
		{name: "pod to remote pod", p: Packet{Src: addr("10.244.1.2"), Dst: addr("10.244.2.2")}, want: Continue},
		{name: "pod to multicast", p: Packet{Src: addr("10.244.1.2"), Dst: addr("239.1.1.1")}, want: Continue},
		{name: "host to local pod", p: Packet{Src: addr("198.18.0.11"), Dst: addr("10.244.1.2")}, want: Continue},
		{name: "host to remote pod", p: Packet{Src: addr("198.18.0.11"), Dst: addr("10.244.2.2")}, want: Masquerade},
		{name: "kube-proxy marked", p: Packet{Src: addr("10.244.1.2"), Dst: addr("203.0.113.10"), Mark: 0x4000}, want: Continue},
		{name: "outside to outside", p: Packet{Src: addr("198.18.0.11"), Dst: addr("203.0.113.10")}, want: Continue},
	} {
		t.Run(tc.name, func(t *testing.T) {
			gotIPT := ipt.TraceIPT("nat", "POSTROUTING", tc.p)
			gotNFT := nft.TraceNFT(nat[0], tc.p)
			if gotIPT.Verdict != tc.want || gotNFT.Verdict != tc.want {
				t.Fatalf("iptables: %s (%s), nftables: %s (%s), want %s", gotIPT.Verdict, gotIPT.Rule, gotNFT.Verdict, gotNFT.Rule, tc.want)
			}
			if len(gotIPT.Unsure)+len(gotNFT.Unsure) > 0 {
				t.Fatalf("unsure about %v %v", gotIPT.Unsure, gotNFT.Unsure)
			}
		})
	}
}

func TestParseIPTablesSave(t *testing.T) {
	ipt, err := ParseIPTablesSave(`*nat
:POSTROUTING ACCEPT [3:180]
:X - [0:0]
-A POSTROUTING -m comment --comment "with \"quotes\" and spaces" -j X
-A X ! -s 10.0.0.0/8 -o eth+ -m mark ! --mark 0x1/0xf -p tcp -m tcp --dport 80 -j MASQUERADE --random-fully
COMMIT
`)
	if err != nil {
		t.Fatal(err)
	}
	x := ipt.Tables["nat"].Chains["X"]
	if x == nil || len(x.Rules) != 1 || x.Rules[0].Target != "MASQUERADE" {
		t.Fatalf("chain X: %+v", x)
	}
	var kinds []string
	for _, m := range x.Rules[0].Matches {
		kinds = append(kinds, m.kind)
	}
	if got := strings.Join(kinds, ","); got != "s,o,mark,p,unknown" {
		t.Fatalf("matches %s", got)
	}
	// The port match is unknown: the trace assumes it does not apply and says so.
	tr := ipt.TraceIPT("nat", "POSTROUTING", Packet{Src: addr("192.0.2.1"), Dst: addr("198.51.100.1"), OIf: "eth0"})
	if tr.Verdict != Continue || len(tr.Unsure) != 1 {
		t.Fatalf("trace %+v", tr)
	}
	if _, err := ParseIPTablesSave("-A X -j DROP\n"); err == nil {
		t.Fatal("a rule outside a table parsed")
	}
}

func TestNFTSetsAndMaps(t *testing.T) {
	rs, err := ParseNFTJSON([]byte(`{"nftables":[
 {"table":{"family":"inet","name":"t"}},
 {"set":{"family":"inet","table":"t","name":"pods","type":"ipv4_addr","flags":["interval"],"elem":[{"prefix":{"addr":"10.244.0.0","len":16}}]}},
 {"map":{"family":"inet","table":"t","name":"out","type":"ifname","map":"verdict","elem":[["eth0",{"drop":null}]]}},
 {"chain":{"family":"inet","table":"t","name":"fwd","type":"filter","hook":"forward","prio":0,"policy":"accept"}},
 {"chain":{"family":"inet","table":"t","name":"sub","handle":3}},
 {"rule":{"family":"inet","table":"t","chain":"fwd","handle":4,"expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@pods"}},{"jump":{"target":"sub"}}]}},
 {"rule":{"family":"inet","table":"t","chain":"fwd","handle":5,"expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":["established","related"]}},{"accept":null}]}},
 {"rule":{"family":"inet","table":"t","chain":"sub","handle":6,"expr":[{"vmap":{"key":{"meta":{"key":"oifname"}},"data":"@out"}}]}}
]}`))
	if err != nil {
		t.Fatal(err)
	}
	fwd := rs.BaseChains("forward", "filter", true)
	if len(fwd) != 1 {
		t.Fatalf("%d forward chains", len(fwd))
	}
	for _, tc := range []struct {
		name string
		p    Packet
		want Verdict
	}{
		{name: "pod out of eth0: dropped by the map", p: Packet{Src: addr("10.244.1.2"), Dst: addr("192.0.2.1"), OIf: "eth0"}, want: Drop},
		{name: "pod out of eth1", p: Packet{Src: addr("10.244.1.2"), Dst: addr("192.0.2.1"), OIf: "eth1"}, want: Continue},
		{name: "not a pod", p: Packet{Src: addr("192.0.2.9"), Dst: addr("192.0.2.1"), OIf: "eth0"}, want: Continue},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := rs.TraceNFT(fwd[0], tc.p); got.Verdict != tc.want {
				t.Fatalf("got %s (%s), want %s", got.Verdict, got.Rule, tc.want)
			}
		})
	}
}
