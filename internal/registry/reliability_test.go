package registry

// Reliability and security of the registry: removals held back across a
// lease that blinks, hostile leases screened by the Guard, the store's
// reachability on /metrics, a subnet change reported loudly, and TLS that
// verifies the server and says why it does not trust one.
//
// Address plan as in registry_test.go; the TLS store listens on
// https://127.0.0.1 with a kernel-picked port.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/lab/certs"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/storeserver"
)

// metricValue reads one sample from reg: the metric name and its labels
// as "k=v" pairs. It fails the test when there is no such sample.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var have []string
			for _, lp := range m.GetLabel() {
				have = append(have, lp.GetName()+"="+lp.GetValue())
			}
			if strings.Join(have, ",") != strings.Join(labels, ",") {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	t.Fatalf("no sample %s{%s}", name, strings.Join(labels, ","))
	return 0
}

// withMetrics is a registry whose collectors go to a fresh Prometheus
// registry, and which checks the store every 100 ms.
func (e *env) withMetrics() (*Registry, *prometheus.Registry) {
	e.t.Helper()
	metrics := prometheus.NewRegistry()
	r, err := New(context.Background(), Config{Endpoints: []string{e.url}, Logger: testLogger(e.t), Metrics: metrics, RequestTimeout: time.Second})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { r.Close() })
	r.removeDelay = 50 * time.Millisecond
	return r, metrics
}

// eventually polls cond every 50 ms until it holds, failing after waitFor.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, waitFor)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// An operator deletes a peer's key and the peer re-claims it at once, as
// Keep does: watchers report nothing, so peers keep their routes. A key
// deleted for good is reported after the delay.
func TestWatchHoldsBackRemovals(t *testing.T) {
	e := newEnv(t)
	me := e.registry(0)
	me.removeDelay = time.Second
	peer := acquire(t, e.registry(0), node(2, wide, t))
	known, rev, err := me.List(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	w := startWatch(t, me, rev, known)
	key := subnets + peer.Lease().Key()
	value := string(e.get(key).Kvs[0].Value)

	if _, err := e.raw.Delete(e.ctx(), key); err != nil {
		t.Fatal(err)
	}
	grant, err := e.raw.Grant(e.ctx(), 60)
	if err != nil {
		t.Fatal(err)
	}
	e.put(key, value, clientv3.WithLease(grant.ID))
	select {
	case ev := <-w.events:
		t.Fatalf("a lease deleted and written back at once was reported: %v %v", ev.Type, ev.Lease)
	case <-time.After(2 * me.removeDelay):
	}

	if _, err := e.raw.Delete(e.ctx(), key); err != nil {
		t.Fatal(err)
	}
	w.expect(lease.Removed, peer.Lease().Key(), "n2")
}

// Corrupt and hostile leases in the store never come out of the Guard,
// whether they were there at listing time or arrive through the watch, and
// each is counted by reason. A good lease rewritten into a bad one is
// withdrawn.
func TestGuardSkipsHostileLeases(t *testing.T) {
	e := newEnv(t)
	r, metrics := e.withMetrics()
	me := acquire(t, r, node(1, wide, t))
	good := acquire(t, e.registry(0), node(2, wide, t))

	// Hand-written entries go on subnets nobody holds.
	used := map[string]bool{me.Lease().Key(): true, good.Lease().Key(): true}
	third := 199
	free := func() string {
		for {
			third++
			if k := fmt.Sprintf("10.244.%d.0-24", third); !used[k] {
				used[k] = true
				return k
			}
		}
	}
	n3 := free() // a good lease, written by hand
	e.put(subnets+n3, `{"PublicIP":"198.18.0.53","BackendType":"vxlan","NodeName":"n3"}`)
	hostile := map[string]string{ // key -> value
		free():          `{"PublicIP":`,                                     // undecodable
		"10.99.0.0-24":  `{"PublicIP":"198.18.0.51","BackendType":"vxlan"}`, // outside Network
		"10.244.0.0-17": `{"PublicIP":"198.18.0.52","BackendType":"vxlan"}`, // a /17 over live /24s
		free():          `{"PublicIP":"0.0.0.0","BackendType":"vxlan"}`,     // no public IP
		free():          `{"PublicIP":"127.0.0.1","BackendType":"vxlan"}`,   // loopback
		free():          `{"PublicIP":"10.244.1.7","BackendType":"vxlan"}`,  // inside the pod network
	}
	for k, v := range hostile {
		e.put(subnets+k, v)
	}

	g := r.Guard(testConfig(t, wide))
	leases, rev, err := r.List(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	var events []lease.Event
	for _, l := range leases {
		events = append(events, lease.Event{Type: lease.Added, Lease: &l})
	}
	passed := map[string]bool{}
	for _, ev := range g.Filter(events) {
		passed[ev.Lease.Key()] = ev.Type == lease.Added
	}
	want := map[string]bool{me.Lease().Key(): true, good.Lease().Key(): true, n3: true}
	if len(passed) != len(want) {
		t.Fatalf("guard passed %v, want exactly %v", passed, want)
	}
	for k := range want {
		if !passed[k] {
			t.Errorf("guard dropped the good lease %s", k)
		}
	}
	for reason, n := range map[string]float64{
		SkipUndecodable: 1, SkipOutsideNetwork: 1, SkipBadSubnet: 1, SkipOverlap: 0, SkipBadPublicIP: 3,
	} {
		if got := metricValue(t, metrics, "loom_leases_skipped_total", "reason="+reason); got != n {
			t.Errorf("loom_leases_skipped_total{reason=%q} = %v, want %v", reason, got, n)
		}
	}

	// Through the watch: a new hostile lease, and the good n3 lease turned
	// into a loopback one (withdrawn).
	out := make(chan lease.Event, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = r.Watch(ctx, rev, leases, func(evs []lease.Event) {
			for _, ev := range g.Filter(evs) {
				out <- ev
			}
		})
	}()
	defer func() { cancel(); <-done }()
	e.put(subnets+free(), `{"PublicIP":"224.0.0.1","BackendType":"vxlan"}`)
	e.put(subnets+n3, `{"PublicIP":"127.0.0.2","BackendType":"vxlan","NodeName":"n3"}`)
	select {
	case ev := <-out:
		if ev.Type != lease.Removed || ev.Lease.Key() != n3 {
			t.Fatalf("watch passed %v %v, want only n3's lease withdrawn", ev.Type, ev.Lease)
		}
	case <-time.After(waitFor):
		t.Fatal("n3's lease, rewritten with a loopback public IP, was not withdrawn")
	}
	select {
	case ev := <-out:
		t.Fatalf("watch passed %v %v", ev.Type, ev.Lease)
	case <-time.After(300 * time.Millisecond):
	}
	if got := metricValue(t, metrics, "loom_leases_skipped_total", "reason="+SkipBadPublicIP); got != 5 {
		t.Errorf("bad-public-ip skips = %v, want 5", got)
	}
}

// The Guard on its own: an overlapping lease waits for the lease it
// overlaps to go, then passes.
func TestGuardReleasesOverlapWhenHolderGoes(t *testing.T) {
	r := &Registry{log: testLogger(t), subnets: subnets}
	r.metrics = r.newMetrics()
	cfg := testConfig(t, `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}`)
	g := r.Guard(cfg)
	mk := func(v4, v6, ip string) lease.Lease {
		return lease.Lease{Subnet: netip.MustParsePrefix(v4), IPv6Subnet: netip.MustParsePrefix(v6),
			Attrs: lease.Attrs{PublicIP: netip.MustParseAddr(ip)}, Expiration: time.Now().Add(time.Hour)}
	}
	first := mk("10.244.1.0/24", "fc00:0:0:1::/64", "198.18.0.11")
	second := mk("10.244.1.0/24", "fc00:0:0:2::/64", "198.18.0.12") // same IPv4 subnet
	if got := g.Filter([]lease.Event{{Type: lease.Added, Lease: &first}, {Type: lease.Added, Lease: &second}}); len(got) != 1 || got[0].Lease.Key() != first.Key() {
		t.Fatalf("passed %v, want only the first", got)
	}
	got := g.Filter([]lease.Event{{Type: lease.Removed, Lease: &first}})
	if len(got) != 2 || got[0].Type != lease.Removed || got[1].Type != lease.Added || got[1].Lease.Key() != second.Key() {
		t.Fatalf("after the first went: %v, want it removed and the second added", got)
	}
}

// The store goes away: loom_store_reachable turns 0 and the log says so
// once; it comes back: 1 again, and the log says after how long.
func TestStoreReachability(t *testing.T) {
	e := newEnv(t)
	var logs syncBuffer
	metrics := prometheus.NewRegistry()
	r, err := New(context.Background(), Config{
		Endpoints: []string{e.url}, RequestTimeout: 500 * time.Millisecond, Metrics: metrics, MonitorEvery: 100 * time.Millisecond,
		Logger: testLoggerTo(t, &logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()

	reachable := func() float64 { return metricValue(t, metrics, "loom_store_reachable") }
	eventually(t, "reachable", func() bool { return reachable() == 1 })
	e.store.Close()
	eventually(t, "unreachable after the store stopped", func() bool { return reachable() == 0 })
	if ok, err := r.Reachable(); ok || err == nil {
		t.Errorf("Reachable() = %v, %v; want false and the reason", ok, err)
	}
	e.startStore(e.url)
	eventually(t, "reachable after the store came back", func() bool { return reachable() == 1 })
	out := logs.String()
	if n := strings.Count(out, "store unreachable"); n != 1 {
		t.Errorf("logged %q %d times, want once:\n%s", "store unreachable", n, out)
	}
	if !strings.Contains(out, "store reachable again") {
		t.Errorf("no log line says the store is back:\n%s", out)
	}
}

// A node's previous subnet was taken while it was away: Keep takes another
// one, says so at error level naming the holder, and counts it.
func TestKeepReportsSubnetChange(t *testing.T) {
	e := newEnv(t)
	taker := acquire(t, e.registry(0), node(2, wide, t))
	var logs syncBuffer
	metrics := prometheus.NewRegistry()
	r, err := New(context.Background(), Config{Endpoints: []string{e.url}, Metrics: metrics, Logger: testLoggerTo(t, &logs)})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	req := node(1, wide, t)
	req.Previous = taker.Lease().Subnet
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan lease.Lease, 1)
	errc := make(chan error, 1)
	go func() { errc <- r.Keep(ctx, req, func(l lease.Lease) { got <- l }) }()
	var l lease.Lease
	select {
	case l = <-got:
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(waitFor):
		t.Fatal("Keep reported no lease")
	}
	if l.Subnet == req.Previous {
		t.Fatalf("n1 took %s, which n2 holds", l.Subnet)
	}
	out := logs.String()
	for _, want := range []string{"level=ERROR", "SUBNET CHANGED", "old=" + taker.Lease().Key(), "new=" + l.Key(), "old-subnet-held-by=\"node n2\"", "recreate"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if v := metricValue(t, metrics, "loom_lease_expires_in_seconds"); v <= 0 || v > DefaultTTL.Seconds() {
		t.Errorf("loom_lease_expires_in_seconds = %v, want within the TTL", v)
	}

	// It loses that lease; the subnet is still free: same subnet, counted.
	e.deleteSubnets()
	select {
	case again := <-got:
		if again.Subnet != l.Subnet {
			t.Fatalf("re-acquired %s, want %s", again.Subnet, l.Subnet)
		}
	case <-time.After(waitFor):
		t.Fatal("Keep did not re-acquire")
	}
	if v := metricValue(t, metrics, "loom_lease_reacquired_total", "subnet=same"); v != 1 {
		t.Errorf("loom_lease_reacquired_total{subnet=same} = %v, want 1", v)
	}
}

// tlsStore starts a store serving TLS with a certificate for 127.0.0.1
// signed by a fresh CA, requiring client certificates from that CA.
func tlsStore(t *testing.T) (url string, ca *certs.CA, client certs.Pair) {
	t.Helper()
	dir := t.TempDir()
	ca, err := certs.NewCA(dir, "ca", "loom test CA")
	if err != nil {
		t.Fatal(err)
	}
	server, err := ca.Server(dir, "server", "store", netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	if client, err = ca.Client(dir, "client", "agent"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := storeserver.Start(ctx, storeserver.Config{
		Listen: "https://127.0.0.1:0", DataDir: filepath.Join(dir, "etcd"), Logger: testLogger(t),
		CertFile: server.Cert, KeyFile: server.Key, ClientCAFile: ca.Cert,
		NetworkConfig: []byte(wide),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s.ClientURL(), ca, client
}

// TLS: with the right CA and a client certificate the registry works; with
// a CA that did not sign the server's certificate it refuses the server and
// the error says why and which flag to check; without a client certificate
// the server refuses the agent.
func TestTLSVerifiesServer(t *testing.T) {
	url, ca, client := tlsStore(t)
	open := func(cfg Config) *Registry {
		t.Helper()
		cfg.Endpoints, cfg.Logger, cfg.DialTimeout, cfg.RequestTimeout = []string{url}, testLogger(t), 2*time.Second, 2*time.Second
		r, err := New(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	ctx := func() context.Context {
		c, cancel := context.WithTimeout(context.Background(), waitFor)
		t.Cleanup(cancel)
		return c
	}

	good := open(Config{CAFile: ca.Cert, CertFile: client.Cert, KeyFile: client.Key})
	if _, err := good.NetworkConfig(ctx()); err != nil {
		t.Fatalf("right CA and client certificate: %v", err)
	}

	other, err := certs.NewCA(t.TempDir(), "other", "some other CA")
	if err != nil {
		t.Fatal(err)
	}
	wrong := open(Config{CAFile: other.Cert, CertFile: client.Cert, KeyFile: client.Key})
	_, err = wrong.NetworkConfig(ctx())
	if err == nil {
		t.Fatal("a server whose certificate the CA did not sign was trusted")
	}
	for _, want := range []string{"not trusted", "unknown authority", "-etcd-cafile", url} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not say %q: %v", want, err)
		}
	}

	anonymous := open(Config{CAFile: ca.Cert})
	if _, err := anonymous.NetworkConfig(ctx()); err == nil {
		t.Fatal("the store accepted a client without a certificate")
	}
}

// testLoggerTo logs to t (shown for failing tests) and to w.
func testLoggerTo(t *testing.T, w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.MultiWriter(tWriter{t}, w), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// syncBuffer is a log sink safe for the registry's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Whatever a hostile writer puts under <prefix>/subnets/, what the Guard
// passes on fits the network config, has a usable public IP and overlaps
// nothing else it passed; and it never panics.
func FuzzGuard(f *testing.F) {
	f.Add("10.244.1.0-24", []byte(`{"PublicIP":"198.18.0.11","BackendType":"vxlan"}`), "10.244.2.0-24", []byte(`{"PublicIP":"198.18.0.12"}`))
	f.Add("10.244.0.0-16", []byte(`{"PublicIP":"127.0.0.1"}`), "10.244.0.0-24", []byte(`{"PublicIP":"0.0.0.0"}`))
	f.Add("10.99.0.0-24", []byte(`{"PublicIP":"198.18.0.1"}`), "10.244.3.0-24&fc00::-64", []byte(`{"PublicIPv6":"2001:db8::1"}`))
	f.Fuzz(func(t *testing.T, key1 string, value1 []byte, key2 string, value2 []byte) {
		r := &Registry{log: slog.New(slog.DiscardHandler), subnets: subnets}
		r.metrics = r.newMetrics()
		cfg := testConfig(t, wide)
		g := r.Guard(cfg)
		var events []lease.Event
		for _, kv := range []struct {
			key   string
			value []byte
		}{{key1, value1}, {key2, value2}} {
			v4, v6, err := lease.ParseKey(kv.key)
			if err != nil {
				continue
			}
			a, err := lease.UnmarshalAttrs(kv.value)
			if err != nil {
				continue
			}
			events = append(events, lease.Event{Type: lease.Added, Lease: &lease.Lease{Subnet: v4, IPv6Subnet: v6, Attrs: a, Expiration: time.Now().Add(time.Hour)}})
		}
		var passed []lease.Lease
		for _, ev := range g.Filter(events) {
			if ev.Type != lease.Added {
				continue
			}
			l := *ev.Lease
			if !lease.Fits(cfg, l.Subnet, l.IPv6Subnet) || !cfg.Network.Contains(l.Subnet.Addr()) {
				t.Fatalf("passed %v, which does not fit %s", l, cfg.Network)
			}
			if ip := l.Attrs.PublicIP; !ip.IsValid() || ip.IsLoopback() || ip.IsUnspecified() || ip.IsMulticast() || cfg.Network.Contains(ip) {
				t.Fatalf("passed %v with public IP %v", l, ip)
			}
			for _, o := range passed {
				if overlaps(o, l) {
					t.Fatalf("passed %v and %v, which overlap", o, l)
				}
			}
			passed = append(passed, l)
		}
		// Removing everything withdraws exactly what was passed.
		var removals []lease.Event
		for _, ev := range events {
			removals = append(removals, lease.Event{Type: lease.Removed, Lease: ev.Lease})
		}
		n := 0
		for _, ev := range g.Filter(removals) {
			if ev.Type == lease.Removed {
				n++
			}
		}
		if n != len(passed) {
			t.Fatalf("removing all withdrew %d leases, %d were passed", n, len(passed))
		}
	})
}
