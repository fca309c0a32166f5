package doctor

// Test address plan, used by every table test of the checks: underlay
// 198.18.0.0/24 (n1 .11, n2 .12, n3 .13), pod network 10.244.0.0/16 with
// n1 = 10.244.1.0/24, n2 = 10.244.2.0/24, n3 = 10.244.3.0/24; "outside"
// 192.0.2.0/24. No test here needs root: the facts are built by hand.

import (
	"encoding/json"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/cni"
	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
	"github.com/loomnet/loom/internal/subnetenv"
)

var (
	pfx  = netip.MustParsePrefix
	addr = netip.MustParseAddr
)

func testLease(node, subnet, ip string) lease.Lease {
	return lease.Lease{Subnet: pfx(subnet), Attrs: lease.Attrs{PublicIP: addr(ip), NodeName: node, BackendType: "host-gw"},
		Expiration: time.Now().Add(24 * time.Hour)}
}

func mustConfig(t testing.TB, js string) *netconf.Config {
	t.Helper()
	c, err := netconf.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return &c
}

func mustOptions(t testing.TB, args ...string) options.Options {
	t.Helper()
	o, err := options.Parse(args, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// healthyFacts is node n1 of a healthy 3-node host-gw cluster with two
// pods, loom's nftables rules, and an agent that is ready.
func healthyFacts(t testing.TB) *Facts {
	t.Helper()
	cfg := mustConfig(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`)
	opts := mustOptions(t, "--node-name", "n1", "--iface", "eth0", "--ip-masq", "--subnet-file", "/run/flannel/subnet.env",
		"--healthz-ip", "127.0.0.1", "--healthz-port", "2401")
	env := subnetenv.Env{Network: pfx("10.244.0.0/16"), Subnet: pfx("10.244.1.1/24"), MTU: 1500, IPMasq: true}
	loomConf := &cni.Config{Name: "loom", SubnetFile: "/run/flannel/subnet.env", DataDir: "/var/lib/cni/networks", Bridge: "cni0"}
	f := &Facts{
		Node: "n1", Opts: opts, ArgsSource: "command line",
		Config: cfg, ConfigFrom: "etcd /coreos.com/network/config",
		Store: StoreFacts{
			Endpoints: []string{"http://198.18.0.1:2379"}, Prefix: "/coreos.com/network", Config: cfg, Revision: 7,
			Leases: []lease.Lease{
				testLease("n1", "10.244.1.0/24", "198.18.0.11"),
				testLease("n2", "10.244.2.0/24", "198.18.0.12"),
				testLease("n3", "10.244.3.0/24", "198.18.0.13"),
			},
		},
		SubnetEnv: SubnetEnvFacts{Path: "/run/flannel/subnet.env", Env: &env},
		Underlay: UnderlayFacts{Name: "eth0", How: "-iface eth0", MTU: 1500, PublicIP: addr("198.18.0.11"),
			Prefixes: []netip.Prefix{pfx("198.18.0.0/24")}},
		Kernel: KernelFacts{
			Links: []Link{
				{Name: "lo", Index: 1, Type: "device", MTU: 65536, Up: true, Addrs: []netip.Prefix{pfx("127.0.0.1/8")}},
				{Name: "eth0", Index: 2, Type: "veth", MTU: 1500, Up: true, Addrs: []netip.Prefix{pfx("198.18.0.11/24")}},
				{Name: "cni0", Index: 3, Type: "bridge", MTU: 1500, Up: true, Addrs: []netip.Prefix{pfx("10.244.1.1/24")}},
				{Name: "veth0a", Index: 4, Type: "veth", MTU: 1500, Up: true, Master: 3},
				{Name: "veth0b", Index: 5, Type: "veth", MTU: 1500, Up: true, Master: 3},
			},
			Routes: []Route{
				{Dst: pfx("0.0.0.0/0"), Gw: addr("198.18.0.1"), Dev: "eth0", Protocol: 3, Type: "unicast"},
				{Dst: pfx("198.18.0.0/24"), Dev: "eth0", Protocol: 2, Type: "unicast"},
				{Dst: pfx("10.244.1.0/24"), Dev: "cni0", Protocol: 2, Type: "unicast"},
				{Dst: pfx("10.244.2.0/24"), Gw: addr("198.18.0.12"), Dev: "eth0", Protocol: 108, Type: "unicast"},
				{Dst: pfx("10.244.3.0/24"), Gw: addr("198.18.0.13"), Dev: "eth0", Protocol: 108, Type: "unicast"},
			},
			Lookups: map[netip.Addr]Lookup{
				addr("198.18.0.12"): {Dst: addr("198.18.0.12"), Dev: "eth0"},
				addr("198.18.0.13"): {Dst: addr("198.18.0.13"), Dev: "eth0"},
				addr("10.244.2.1"):  {Dst: addr("10.244.2.1"), Gw: addr("198.18.0.12"), Dev: "eth0"},
				addr("10.244.3.1"):  {Dst: addr("10.244.3.1"), Gw: addr("198.18.0.13"), Dev: "eth0"},
			},
			Sysctls:     map[string]string{sysctlIPForward: "1", sysctlBridgeNF: "1"},
			BrNetfilter: true,
		},
		CNI: CNIFacts{
			ConfDir:  "/etc/cni/net.d",
			Files:    []CNIFile{{Path: "/etc/cni/net.d/10-loom.conflist", Name: "loom", Plugins: []string{"loom-cni"}, Loom: loomConf}},
			CacheDir: "/var/lib/cni",
			Cache: []CacheEntry{
				{ContainerID: "pod-a", IfName: "eth0", Network: "loom", NetNS: "/var/run/netns/cni-a", NetNSExists: true},
				{ContainerID: "pod-b", IfName: "eth0", Network: "loom", NetNS: "/var/run/netns/cni-b", NetNSExists: true},
			},
		},
		IPAM: IPAMFacts{Dir: "/var/lib/cni/networks/loom", Allocations: []ipam.Allocation{
			{IP: addr("10.244.1.2"), ContainerID: "pod-a", IfName: "eth0"},
			{IP: addr("10.244.1.3"), ContainerID: "pod-b", IfName: "eth0"},
		}},
		Ready: ReadyFacts{URL: "http://127.0.0.1:2401/readyz", Status: http.StatusOK,
			Body: "[+]lease ok\n[+]subnet.env ok\n[+]datapath ok\n[+]firewall ok\nready\n"},
		Peers: []PeerProbe{
			{Lease: testLease("n2", "10.244.2.0/24", "198.18.0.12"), Target: netip.MustParseAddrPort("198.18.0.12:2401"), Alive: true, Answer: "refused (the host answers)"},
			{Lease: testLease("n3", "10.244.3.0/24", "198.18.0.13"), Target: netip.MustParseAddrPort("198.18.0.13:2401"), Alive: true, Answer: "connected"},
		},
	}
	f.Firewall = FirewallFacts{NFT: readNFT(t, "nft-loom.json", "nft-loom.txt"), IPTErr: os.ErrNotExist}
	return f
}

func readNFT(t testing.TB, jsonFile, textFile string) *NFTRuleset {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", jsonFile))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := ParseNFTJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	if textFile != "" {
		text, err := os.ReadFile(filepath.Join("testdata", textFile))
		if err != nil {
			t.Fatal(err)
		}
		rs.AddText(string(text))
	}
	return rs
}

func readIPT(t testing.TB, file string) *IPTables {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", file))
	if err != nil {
		t.Fatal(err)
	}
	ipt, err := ParseIPTablesSave(string(data))
	if err != nil {
		t.Fatal(err)
	}
	return ipt
}

// checkCase is one row of a check's table test: a change to the healthy
// facts and what the check must say.
type checkCase struct {
	name   string
	change func(f *Facts)
	want   Status
	// in must appear in the summary or evidence; fix in the fix.
	in, fix string
}

func runCases(t *testing.T, fn func(*Facts) Result, cases []checkCase) {
	t.Helper()
	runCasesFrom(t, healthyFacts, fn, cases)
}

// runCasesFrom runs cases over the facts base makes.
func runCasesFrom(t *testing.T, base func(testing.TB) *Facts, fn func(*Facts) Result, cases []checkCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := base(t)
			if tc.change != nil {
				tc.change(f)
			}
			r := fn(f)
			text := r.Summary + "\n" + strings.Join(r.Evidence, "\n")
			if r.Status != tc.want || !strings.Contains(text, tc.in) || !strings.Contains(r.Fix, tc.fix) {
				js, _ := json.MarshalIndent(r, "", "  ")
				t.Fatalf("got %s, want %s with %q in the text and %q in the fix:\n%s", r.Status, tc.want, tc.in, tc.fix, js)
			}
			if r.Status >= Warn && r.Fix == "" {
				t.Errorf("%s without a fix", r.Status)
			}
		})
	}
}

// The healthy facts are healthy for every check; the Kubernetes checks
// say they do not apply.
func TestHealthyFactsAllOK(t *testing.T) {
	f := healthyFacts(t)
	for _, r := range Run(f) {
		if slices.Contains(KubeOnlyChecks(), r.Check) && r.Status == Skip && r.Summary == "not in Kubernetes mode" {
			continue
		}
		if r.Status != OK {
			js, _ := json.MarshalIndent(r, "", "  ")
			t.Errorf("%s: %s", r.Check, js)
		}
	}
}
