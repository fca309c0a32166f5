package bench

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// Unit tests of the /proc parsers, the metrics and flag readers and the
// synthetic address plan (pods 10.244.0.0/16; synthetic public IPs
// 198.19.0.0/16 and 198.18.0.100-249).

func TestParseCPUTimes(t *testing.T) {
	a, err := parseCPUTimes([]byte("cpu  100 0 50 800 50 0 0 0 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"))
	if err != nil {
		t.Fatal(err)
	}
	if a.idle != 850 || a.total != 1000 {
		t.Fatalf("parseCPUTimes = %+v, want idle 850 (idle+iowait), total 1000 (guest not counted twice)", a)
	}
	b := cpuTimes{idle: a.idle + 150, total: a.total + 200}
	if got := idleBetween(a, b); got != 0.75 {
		t.Errorf("idleBetween = %v, want 0.75", got)
	}
	if got := idleBetween(a, a); got != 1 {
		t.Errorf("idleBetween with no time passed = %v, want 1", got)
	}
	for _, bad := range []string{"", "intr 1 2 3\n", "cpu 1 2 x 4 5\n"} {
		if _, err := parseCPUTimes([]byte(bad)); err == nil {
			t.Errorf("parseCPUTimes(%q) succeeded", bad)
		}
	}
}

func TestParseProc(t *testing.T) {
	stat := "4242 (loom agent) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 12 0 100 0 0\n"
	ticks, err := parseStatCPU([]byte(stat))
	if err != nil || ticks != 325 {
		t.Fatalf("parseStatCPU = %v, %v; want 250+75 = 325 (command name with spaces and parentheses)", ticks, err)
	}
	if _, err := parseStatCPU([]byte("4242 (short) S 1 2")); err == nil {
		t.Error("parseStatCPU accepted a truncated line")
	}
	status := "Name:\tloom\nVmHWM:\t   41000 kB\nVmRSS:\t   32768 kB\nThreads:\t12\n"
	if v, ok := statusKiB([]byte(status), "VmRSS"); !ok || v != 32768 {
		t.Errorf("VmRSS = %v, %v; want 32768", v, ok)
	}
	if v, ok := statusKiB([]byte(status), "VmHWM"); !ok || v != 41000 {
		t.Errorf("VmHWM = %v, %v; want 41000", v, ok)
	}
	if _, ok := statusKiB([]byte(status), "VmSwap"); ok {
		t.Error("found a VmSwap that is not there")
	}
	if d := time.Duration(325) * time.Second / clockTicks; d != 3250*time.Millisecond {
		t.Errorf("325 ticks = %v, want 3.25s", d)
	}
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP loom_udp_peers Peers.
# TYPE loom_udp_peers gauge
loom_udp_peers 2
loom_reconcile_changes_total{object="route",op="create"} 5
loom_reconcile_changes_total{object="fdb",op="delete"} 1
process_resident_memory_bytes 3.2e+07
`
	m := parseMetrics([]byte(text))
	if m["loom_udp_peers"] != 2 || m[`loom_reconcile_changes_total{object="route",op="create"}`] != 5 ||
		m["process_resident_memory_bytes"] != 3.2e7 || len(m) != 4 {
		t.Fatalf("parseMetrics = %v", m)
	}
}

func TestArgValue(t *testing.T) {
	args := []string{"agent", "--node-name", "n1", "--healthz-port", "2401", "-etcd-cafile=/ca.pem", "--ip-masq"}
	for _, tc := range []struct{ name, want string }{
		{"healthz-port", "2401"}, {"etcd-cafile", "/ca.pem"}, {"node-name", "n1"}, {"etcd-certfile", ""}, {"n1", ""},
	} {
		if got := argValue(args, tc.name); got != tc.want {
			t.Errorf("argValue(%q) = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestFreeSubnets(t *testing.T) {
	taken := []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.3.8/29")}
	got, err := freeSubnets(3, 24, taken)
	if err != nil {
		t.Fatal(err)
	}
	if want := "[10.244.2.0/24 10.244.4.0/24 10.244.5.0/24]"; toString(got) != want {
		t.Errorf("freeSubnets(3, 24) = %v, want %s (10.244.3.0/24 holds a /29)", got, want)
	}
	small, err := freeSubnets(5000, 29, taken)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Prefix]bool{}
	for _, p := range small {
		if p.Bits() != 29 || p.Masked() != p || seen[p] {
			t.Fatalf("bad or repeated subnet %s", p)
		}
		seen[p] = true
		for _, tk := range taken {
			if tk.Overlaps(p) {
				t.Fatalf("%s overlaps taken %s", p, tk)
			}
		}
	}
	if _, err := freeSubnets(300, 24, nil); err == nil {
		t.Error("300 /24s in a /16 handed out")
	}
	last, err := lastFree24([]netip.Prefix{netip.MustParsePrefix("10.244.254.0/24")})
	if err != nil || last != netip.MustParsePrefix("10.244.253.0/24") {
		t.Errorf("lastFree24 = %v, %v; want 10.244.253.0/24", last, err)
	}
}

func toString(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return "[" + strings.Join(s, " ") + "]"
}

func TestSynthLease(t *testing.T) {
	sub := netip.MustParsePrefix("10.244.9.0/24")
	v0 := synthLease("vxlan", 300, 0, sub)
	v1 := synthLease("vxlan", 300, 1, sub)
	if v0.Attrs.PublicIP != netip.MustParseAddr("198.19.1.44") || v1.Attrs.PublicIP != netip.MustParseAddr("198.19.129.44") {
		t.Errorf("public IPs %s, %s; want 198.19.1.44 and 198.19.129.44", v0.Attrs.PublicIP, v1.Attrs.PublicIP)
	}
	if vtepMAC(v0) != "0e:6c:6d:00:01:2c" || vtepMAC(v1) != "0e:6c:6d:01:01:2c" {
		t.Errorf("VtepMACs %s, %s", vtepMAC(v0), vtepMAC(v1))
	}
	h := synthLease("host-gw", 3, 0, sub)
	if h.Attrs.PublicIP != netip.MustParseAddr("198.18.0.103") || h.Attrs.BackendData != nil {
		t.Errorf("host-gw lease %+v: want an on-link public IP and no backend data", h.Attrs)
	}
}
