package ipam

// Address plan: node subnet 10.244.1.0/24 (gateway .1) and fc00:0:0:1::/64
// (gateway ::1); small ranges 10.244.9.0/29 for exhaustion. Everything lives
// in t.TempDir(); no root needed.

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// v4 and v6 are the node's two ranges.
func v4() Range {
	return Range{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Gateway: netip.MustParseAddr("10.244.1.1")}
}

func v6() Range {
	return Range{Subnet: netip.MustParsePrefix("fc00:0:0:1::/64"), Gateway: netip.MustParseAddr("fc00:0:0:1::1")}
}

func newStore(t *testing.T) *Store {
	t.Helper()
	s, err := New(Config{DataDir: t.TempDir(), Network: "loom"})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func att(id string) Attachment { return Attachment{ContainerID: id, IfName: "eth0"} }

func mustAllocate(t *testing.T, s *Store, a Attachment, ranges ...Range) []netip.Addr {
	t.Helper()
	got, err := s.Allocate(a, ranges)
	if err != nil {
		t.Fatalf("allocate %v: %v", a, err)
	}
	return got
}

func TestRange(t *testing.T) {
	tests := []struct {
		name     string
		r        Range
		capacity uint64
		in, out  []string
	}{
		{
			name: "ipv4 /24", r: v4(), capacity: 253,
			in:  []string{"10.244.1.2", "10.244.1.254"},
			out: []string{"10.244.1.0", "10.244.1.1", "10.244.1.255", "10.244.2.1", "fc00:0:0:1::2"},
		},
		{
			name: "ipv4 /30 without gateway", r: Range{Subnet: netip.MustParsePrefix("10.244.2.4/30")}, capacity: 2,
			in:  []string{"10.244.2.5", "10.244.2.6"},
			out: []string{"10.244.2.4", "10.244.2.7"},
		},
		{
			name: "ipv4 /31 has no room", r: Range{Subnet: netip.MustParsePrefix("10.244.2.0/31")}, capacity: 0,
			out: []string{"10.244.2.0", "10.244.2.1"},
		},
		{
			name: "ipv6 /64 saturates", r: v6(), capacity: math.MaxUint64,
			in:  []string{"fc00:0:0:1::2", "fc00:0:0:1:ffff:ffff:ffff:ffff"},
			out: []string{"fc00:0:0:1::", "fc00:0:0:1::1", "10.244.1.2"},
		},
		{
			name: "ipv6 /126 keeps its last address", r: Range{Subnet: netip.MustParsePrefix("fc00::/126"), Gateway: netip.MustParseAddr("fc00::1")}, capacity: 2,
			in:  []string{"fc00::2", "fc00::3"},
			out: []string{"fc00::", "fc00::1"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.r.Capacity(); got != tt.capacity {
				t.Errorf("Capacity() = %d, want %d", got, tt.capacity)
			}
			for _, a := range tt.in {
				if !tt.r.Contains(netip.MustParseAddr(a)) {
					t.Errorf("Contains(%s) = false, want true", a)
				}
			}
			for _, a := range tt.out {
				if tt.r.Contains(netip.MustParseAddr(a)) {
					t.Errorf("Contains(%s) = true, want false", a)
				}
			}
		})
	}
}

func TestAllocateHostLocalLayout(t *testing.T) {
	s := newStore(t)
	got := mustAllocate(t, s, att("c1"), v4(), v6())
	want := []netip.Addr{netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("fc00:0:0:1::2")}
	if !slices.Equal(got, want) {
		t.Fatalf("Allocate = %v, want %v", got, want)
	}
	files := map[string]string{
		"10.244.1.2":          "c1\r\neth0",
		"fc00:0:0:1::2":       "c1\r\neth0",
		"last_reserved_ip.0":  "10.244.1.2",
		"last_reserved_ip.1":  "fc00:0:0:1::2",
		"lock":                "",
		markerName(att("c1")): "", // loom's addition, invisible to host-local
	}
	entries, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(files) {
		t.Errorf("store holds %v, want exactly %v", entries, files)
	}
	for name, content := range files {
		data, err := os.ReadFile(filepath.Join(s.Dir(), name))
		if err != nil {
			t.Errorf("read %s: %v", name, err)
			continue
		}
		if string(data) != content {
			t.Errorf("%s holds %q, want %q", name, data, content)
		}
	}
}

func TestAllocateIdempotent(t *testing.T) {
	s := newStore(t)
	first := mustAllocate(t, s, att("c1"), v4())
	mustAllocate(t, s, att("c2"), v4())
	again := mustAllocate(t, s, att("c1"), v4())
	if !slices.Equal(first, again) {
		t.Fatalf("second ADD of c1 got %v, first got %v", again, first)
	}
	// Another interface of the same container is another attachment.
	other := mustAllocate(t, s, Attachment{ContainerID: "c1", IfName: "net1"}, v4())
	if other[0] == first[0] {
		t.Fatalf("c1/net1 got c1/eth0's address %v", other[0])
	}
	// A range added later (the node gained IPv6) is filled in, the old
	// address kept.
	dual := mustAllocate(t, s, att("c1"), v4(), v6())
	if dual[0] != first[0] || !v6().Contains(dual[1]) {
		t.Fatalf("dual-stack ADD of c1 got %v, want %v plus an IPv6 address", dual, first[0])
	}
}

// Reserve (ADD) reads no allocation file unless the attachment's file says
// loom reserved for it before; Allocate always reads them. The difference
// shows with an address host-local reserved for the attachment.
func TestReserve(t *testing.T) {
	s := newStore(t)
	mustAllocate(t, s, att("other"), v4())
	hostLocal := netip.MustParseAddr("10.244.1.50")
	if err := os.WriteFile(filepath.Join(s.Dir(), hostLocal.String()), []byte("c1\r\neth0"), 0o600); err != nil {
		t.Fatal(err)
	}

	first, err := s.Reserve(att("c1"), []Range{v4()})
	if err != nil {
		t.Fatal(err)
	}
	if got := first.Addrs[0]; got == hostLocal || got == netip.MustParseAddr("10.244.1.2") {
		t.Fatalf("Reserve got %v, want a fresh address (host-local's %v is not looked for)", got, hostLocal)
	}
	// A retry finds the attachment file, reads the allocations, and
	// reuses what c1 holds, in whichever range.
	again, err := s.Reserve(att("c1"), []Range{v4(), v6()})
	if err != nil {
		t.Fatal(err)
	}
	if again.Addrs[0] != hostLocal && again.Addrs[0] != first.Addrs[0] || !v6().Contains(again.Addrs[1]) {
		t.Fatalf("retried Reserve got %v, want c1's IPv4 address and a new IPv6 one", again.Addrs)
	}
	// Undo of the retry frees only what the retry reserved, and keeps the
	// attachment file, which the first call made.
	if err := again.Undo(); err != nil {
		t.Fatal(err)
	}
	held, err := s.Lookup(att("c1"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []netip.Addr{first.Addrs[0], hostLocal}; !slices.Equal(held, want) {
		t.Fatalf("after undoing the retry c1 holds %v, want %v", held, want)
	}
	if _, err := os.Stat(filepath.Join(s.Dir(), markerName(att("c1")))); err != nil {
		t.Fatalf("undoing the retry removed the first call's attachment file: %v", err)
	}
	// Undo of the first frees its address and the attachment file.
	if err := first.Undo(); err != nil {
		t.Fatal(err)
	}
	if held, _ := s.Lookup(att("c1")); !slices.Equal(held, []netip.Addr{hostLocal}) {
		t.Fatalf("after undoing both c1 holds %v, want only host-local's %v", held, hostLocal)
	}
	if got := storeFiles(t, s); slices.Contains(got, markerName(att("c1"))) {
		t.Fatalf("undo left c1's attachment file: %v", got)
	}
}

// A crash between the attachment file and the address file leaves an
// attachment file alone; it costs the next ADD a read of the allocations,
// and DEL and GC remove it.
func TestAttachmentFileCleanup(t *testing.T) {
	s := newStore(t)
	mustAllocate(t, s, att("live"), v4())
	for _, id := range []string{"crashed", "gone"} {
		if err := os.WriteFile(filepath.Join(s.Dir(), markerName(att(id))), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r, err := s.Reserve(att("crashed"), []Range{v4()})
	if err != nil || !v4().Contains(r.Addrs[0]) {
		t.Fatalf("Reserve after a crash = %v, %v", r, err)
	}
	if freed, err := s.Release(att("crashed")); err != nil || !slices.Equal(freed, r.Addrs) {
		t.Fatalf("Release = %v, %v; want %v", freed, err, r.Addrs)
	}
	if _, err := s.GC([]Attachment{att("live")}); err != nil {
		t.Fatal(err)
	}
	want := []string{"10.244.1.2", "last_reserved_ip.0", "lock", markerName(att("live"))}
	slices.Sort(want)
	if got := storeFiles(t, s); !slices.Equal(got, want) {
		t.Fatalf("after DEL and GC the store holds %v, want %v", got, want)
	}
}

func storeFiles(t *testing.T, s *Store) []string {
	t.Helper()
	entries, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestAllocateRoundRobin(t *testing.T) {
	s := newStore(t)
	a := mustAllocate(t, s, att("c1"), v4())[0]
	if _, err := s.Release(att("c1")); err != nil {
		t.Fatal(err)
	}
	b := mustAllocate(t, s, att("c2"), v4())[0]
	if want := netip.MustParseAddr("10.244.1.3"); b != want {
		t.Fatalf("after freeing %v the next ADD got %v, want %v (no immediate reuse)", a, b, want)
	}
	// Wrap around at the end of the range, skipping the gateway.
	if err := os.WriteFile(filepath.Join(s.Dir(), "last_reserved_ip.0"), []byte("10.244.1.254"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := mustAllocate(t, s, att("c3"), v4())[0]
	if want := netip.MustParseAddr("10.244.1.2"); c != want {
		t.Fatalf("after .254 the next ADD got %v, want %v", c, want)
	}
	// The hint, rewritten in place, is cut to the shorter address:
	// host-local parses it without trimming.
	if data, err := os.ReadFile(filepath.Join(s.Dir(), "last_reserved_ip.0")); err != nil || string(data) != "10.244.1.2" {
		t.Fatalf("last_reserved_ip.0 holds %q, %v; want \"10.244.1.2\"", data, err)
	}
}

func TestAllocateExhausted(t *testing.T) {
	small := Range{Subnet: netip.MustParsePrefix("10.244.9.0/29"), Gateway: netip.MustParseAddr("10.244.9.1")}
	s := newStore(t)
	for i := range 5 {
		mustAllocate(t, s, att(fmt.Sprint("c", i)), small)
	}
	_, err := s.Allocate(att("c5"), []Range{small})
	if !errors.Is(err, ErrExhausted) {
		t.Fatalf("sixth ADD in a /29 with gateway: err = %v, want ErrExhausted", err)
	}
	if want := "range 10.244.9.0/29 is full: 5 of 5 addresses allocated"; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say %q", err, want)
	}
	u, err := s.Usage([]Range{small, v4()})
	if err != nil {
		t.Fatal(err)
	}
	if !u[0].Full() || u[0].Allocated != 5 || u[1].Full() || u[1].Allocated != 0 {
		t.Errorf("Usage = %+v, want the /29 full with 5 and the /24 empty", u)
	}
}

func TestAllocateAllOrNothing(t *testing.T) {
	full := Range{Subnet: netip.MustParsePrefix("fc00:0:0:9::/127")} // capacity 1
	s := newStore(t)
	mustAllocate(t, s, att("c0"), full)
	if _, err := s.Allocate(att("c1"), []Range{v4(), full}); !errors.Is(err, ErrExhausted) {
		t.Fatalf("err = %v, want ErrExhausted", err)
	}
	if got, _ := s.Lookup(att("c1")); len(got) != 0 {
		t.Fatalf("failed ADD left c1 holding %v", got)
	}
}

func TestReleaseAndGC(t *testing.T) {
	s := newStore(t)
	mustAllocate(t, s, att("c1"), v4(), v6())
	mustAllocate(t, s, Attachment{ContainerID: "c1", IfName: "net1"}, v4())
	mustAllocate(t, s, att("c2"), v4())
	mustAllocate(t, s, att("c3"), v4())

	freed, err := s.Release(att("c1"))
	if err != nil || len(freed) != 2 {
		t.Fatalf("Release(c1/eth0) = %v, %v; want its two addresses", freed, err)
	}
	if got, _ := s.Lookup(Attachment{ContainerID: "c1", IfName: "net1"}); len(got) != 1 {
		t.Fatalf("releasing c1/eth0 touched c1/net1: it holds %v", got)
	}
	if freed, err := s.Release(att("c1")); err != nil || len(freed) != 0 {
		t.Fatalf("second Release(c1/eth0) = %v, %v; want nothing, no error", freed, err)
	}

	gone, err := s.GC([]Attachment{att("c2")})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, al := range gone {
		ids = append(ids, al.ContainerID+"/"+al.IfName)
	}
	slices.Sort(ids)
	if want := []string{"c1/net1", "c3/eth0"}; !slices.Equal(ids, want) {
		t.Fatalf("GC freed %v, want %v", ids, want)
	}
	all, err := s.List()
	if err != nil || len(all) != 1 || all[0].ContainerID != "c2" {
		t.Fatalf("after GC List = %v, %v; want only c2", all, err)
	}
}

// Files written by host-local itself, including the ID-only files of its old
// versions, are read, matched and freed.
func TestHostLocalFiles(t *testing.T) {
	s := newStore(t)
	if err := os.MkdirAll(s.Dir(), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range map[string]string{
		"10.244.1.7":  "legacy",
		"10.244.1.8":  "modern\r\neth0",
		"10.244.1.9":  "unix\neth0\n",
		"10.244.1.10": "",
		"not-an-ip":   "x",
	} {
		if err := os.WriteFile(filepath.Join(s.Dir(), name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	all, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	want := []Allocation{
		{IP: netip.MustParseAddr("10.244.1.7"), ContainerID: "legacy"},
		{IP: netip.MustParseAddr("10.244.1.8"), ContainerID: "modern", IfName: "eth0"},
		{IP: netip.MustParseAddr("10.244.1.9"), ContainerID: "unix", IfName: "eth0"},
		{IP: netip.MustParseAddr("10.244.1.10")},
	}
	if !slices.Equal(all, want) {
		t.Fatalf("List = %v, want %v", all, want)
	}
	if got := mustAllocate(t, s, att("legacy"), v4()); got[0] != want[0].IP {
		t.Errorf("ADD of the legacy owner got %v, want its old %v", got, want[0].IP)
	}
	if freed, _ := s.Release(att("modern")); len(freed) != 1 || freed[0] != want[1].IP {
		t.Errorf("Release(modern) = %v, want %v", freed, want[1].IP)
	}
	gone, err := s.GC([]Attachment{att("legacy"), att("unix")})
	if err != nil || len(gone) != 1 || gone[0].IP != want[3].IP {
		t.Errorf("GC = %v, %v; want only the ownerless %v", gone, err, want[3].IP)
	}
}

func TestReadOnlyCallsCreateNothing(t *testing.T) {
	s := newStore(t)
	if all, err := s.List(); err != nil || len(all) != 0 {
		t.Fatalf("List of a new store = %v, %v", all, err)
	}
	if _, err := s.Release(att("c1")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GC(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read-only calls created %s (stat err %v)", s.Dir(), err)
	}
}

func TestLockTimeout(t *testing.T) {
	dir := t.TempDir()
	s, err := New(Config{DataDir: dir, Network: "loom", LockTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	mustAllocate(t, s, att("c1"), v4())
	// Hold the lock as another process (host-local, a stuck plugin) would.
	f, err := os.Open(filepath.Join(s.Dir(), "lock"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Allocate(att("c2"), []Range{v4()}); !errors.Is(err, ErrLockTimeout) {
		t.Fatalf("Allocate under a held lock: err = %v, want ErrLockTimeout", err)
	}
	if _, err := s.Release(att("c1")); !errors.Is(err, ErrLockTimeout) {
		t.Fatalf("Release under a held lock: err = %v, want ErrLockTimeout", err)
	}
}

func TestInvalidInput(t *testing.T) {
	for _, name := range []string{"", ".", "..", "a/b"} {
		if _, err := New(Config{DataDir: t.TempDir(), Network: name}); err == nil {
			t.Errorf("New(network %q) succeeded", name)
		}
	}
	s := newStore(t)
	for _, a := range []Attachment{{ContainerID: "", IfName: "eth0"}, {ContainerID: "c1"}, {ContainerID: "c\n1", IfName: "eth0"}} {
		if _, err := s.Allocate(a, []Range{v4()}); err == nil {
			t.Errorf("Allocate(%q) succeeded", a)
		}
	}
	bad := Range{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Gateway: netip.MustParseAddr("10.244.2.1")}
	if _, err := s.Allocate(att("c1"), []Range{bad}); err == nil {
		t.Error("Allocate with a gateway outside its subnet succeeded")
	}
}

// The store is shared by separate plugin processes: this re-runs the test
// binary as helper processes that allocate concurrently.
func TestAllocateAcrossProcesses(t *testing.T) {
	const procs, each = 8, 12
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, procs)
	for p := range procs {
		wg.Go(func() {
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "LOOM_IPAM_HELPER_DIR="+dir, "LOOM_IPAM_HELPER_ID="+strconv.Itoa(p), "LOOM_IPAM_HELPER_N="+strconv.Itoa(each))
			if out, err := cmd.CombinedOutput(); err != nil {
				errs <- fmt.Errorf("helper %d: %v\n%s", p, err, out)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	s, err := New(Config{DataDir: dir, Network: "loom"})
	if err != nil {
		t.Fatal(err)
	}
	all, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	// Each owner must hold exactly one address of each family: a lost or
	// shared reservation shows up as a missing or surplus owner.
	owners := map[bool]map[string]int{true: {}, false: {}}
	for _, al := range all {
		owners[al.IP.Is4()][al.ContainerID]++
	}
	for is4, byOwner := range owners {
		if len(byOwner) != procs*each {
			t.Errorf("IPv4=%t: %d owners hold addresses, want %d", is4, len(byOwner), procs*each)
		}
		for id, n := range byOwner {
			if n != 1 {
				t.Errorf("IPv4=%t: %s holds %d addresses, want 1", is4, id, n)
			}
		}
	}
}
