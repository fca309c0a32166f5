package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/storeserver"
)

// Address plan: each test runs its own embedded etcd on 127.0.0.1 with
// kernel-picked ports. Pods 10.244.0.0/16 in /24s (10.244.1.0 to
// 10.244.255.0), or 10.244.0.0/28 in /30s (10.244.0.4, .8, .12) to run out;
// node nI has public IP 198.18.0.(10+I); 198.18.0.99 is a flanneld node.

const (
	prefix  = "/coreos.com/network"
	subnets = prefix + "/subnets/"
	wide    = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`
	tiny    = `{"Network":"10.244.0.0/28","SubnetLen":30,"Backend":{"Type":"vxlan"}}`
	waitFor = 10 * time.Second
)

// tWriter sends log lines to t.Log, so they show only for failing tests.
type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// env is one store with a raw client for assertions.
type env struct {
	t     *testing.T
	url   string
	raw   *clientv3.Client
	store *storeserver.Server
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t}
	e.startStore("http://127.0.0.1:0")
	t.Cleanup(func() { e.store.Close() })
	raw, err := clientv3.New(clientv3.Config{Endpoints: []string{e.url}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	e.raw = raw
	return e
}

// startStore starts a store with an empty data directory at listen.
func (e *env) startStore(listen string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := storeserver.Start(ctx, storeserver.Config{
		Listen:  listen,
		DataDir: filepath.Join(e.t.TempDir(), "etcd"),
		Logger:  testLogger(e.t),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.store, e.url = s, s.ClientURL()
}

// loseData replaces the store with an empty one at the same address, as
// when etcd loses its disk.
func (e *env) loseData() {
	e.t.Helper()
	e.store.Close()
	e.startStore(e.url)
}

func (e *env) registry(ttl time.Duration) *Registry {
	e.t.Helper()
	r, err := New(context.Background(), Config{Endpoints: []string{e.url}, TTL: ttl, Logger: testLogger(e.t)})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { r.Close() })
	// Removals are held back for 5 s in production (see removeDelay);
	// tests that are not about that need not wait.
	r.removeDelay = 50 * time.Millisecond
	return r
}

func (e *env) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	e.t.Cleanup(cancel)
	return ctx
}

func (e *env) get(key string) *clientv3.GetResponse {
	e.t.Helper()
	resp, err := e.raw.Get(e.ctx(), key)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp
}

// count is the number of keys under <prefix>/subnets/.
func (e *env) count() int64 {
	e.t.Helper()
	resp, err := e.raw.Get(e.ctx(), subnets, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.Count
}

func (e *env) put(key, value string, opts ...clientv3.OpOption) {
	e.t.Helper()
	if _, err := e.raw.Put(e.ctx(), key, value, opts...); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) deleteSubnets() {
	e.t.Helper()
	if _, err := e.raw.Delete(e.ctx(), subnets, clientv3.WithPrefix()); err != nil {
		e.t.Fatal(err)
	}
}

func node(i int, netConf string, t *testing.T) Request {
	return Request{
		NodeName: fmt.Sprintf("n%d", i),
		Attrs: lease.Attrs{
			PublicIP:    netip.MustParseAddr(fmt.Sprintf("198.18.0.%d", 10+i)),
			BackendType: "vxlan",
			BackendData: json.RawMessage(fmt.Sprintf(`{"VNI":1,"VtepMAC":"0e:00:00:00:00:%02x"}`, i)),
		},
		Config: testConfig(t, netConf),
	}
}

func acquire(t *testing.T, r *Registry, req Request) *Held {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	h, err := r.Acquire(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(context.Background()) })
	return h
}

func TestAcquireWritesFlannelLease(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	req := node(1, wide, t)
	h := acquire(t, r, req)
	l := h.Lease()
	if !lease.Fits(req.Config, l.Subnet, l.IPv6Subnet) || l.Reserved() {
		t.Fatalf("lease %v: not a live lease in 10.244.1.0-10.244.255.0", l)
	}

	key := subnets + strings.Replace(l.Subnet.String(), "/", "-", 1)
	resp := e.get(key)
	if len(resp.Kvs) != 1 {
		t.Fatalf("no key %s", key)
	}
	kv := resp.Kvs[0]
	want := `{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"},"NodeName":"n1"}`
	if string(kv.Value) != want {
		t.Fatalf("value\n%s\nwant\n%s", kv.Value, want)
	}
	if kv.Lease == 0 {
		t.Fatal("the key has no etcd lease")
	}
	ttl, err := e.raw.TimeToLive(e.ctx(), clientv3.LeaseID(kv.Lease))
	if err != nil {
		t.Fatal(err)
	}
	if ttl.GrantedTTL != 24*3600 || ttl.TTL < 24*3600-60 {
		t.Fatalf("etcd lease TTL %ds of %ds, want about 24h", ttl.TTL, ttl.GrantedTTL)
	}
	if d := time.Until(l.Expiration); d < 23*time.Hour || d > 25*time.Hour {
		t.Fatalf("Expiration in %v, want about 24h", d)
	}
}

// Close keeps the key; the same node's next Acquire takes it over.
func TestRestartKeepsSubnet(t *testing.T) {
	e := newEnv(t)
	req := node(1, wide, t)
	first := acquire(t, e.registry(0), req)
	if err := first.Close(e.ctx()); err != nil {
		t.Fatal(err)
	}
	key := subnets + first.Lease().Key()
	old := e.get(key).Kvs[0]

	// A new process: new client, no Previous (subnet.env was lost too).
	second := acquire(t, e.registry(0), req)
	if second.Lease().Subnet != first.Lease().Subnet {
		t.Fatalf("restart moved n1 from %s to %s", first.Lease().Subnet, second.Lease().Subnet)
	}
	now := e.get(key).Kvs[0]
	if now.Lease == old.Lease || now.Lease == 0 {
		t.Fatalf("key still on the old etcd lease %x (now %x)", old.Lease, now.Lease)
	}
	if now.CreateRevision != old.CreateRevision {
		t.Fatal("takeover re-created the key instead of rewriting it")
	}
	if n := e.count(); n != 1 {
		leases, _, _ := e.registry(0).List(e.ctx())
		t.Fatalf("%d keys after restart, want 1: %v", n, leases)
	}
}

func TestReleaseDeletesKey(t *testing.T) {
	e := newEnv(t)
	h := acquire(t, e.registry(0), node(1, wide, t))
	if err := h.Release(e.ctx()); err != nil {
		t.Fatal(err)
	}
	if n := e.count(); n != 0 {
		t.Fatalf("%d keys left after Release", n)
	}
	if !errors.Is(h.Err(), ErrClosed) {
		t.Fatalf("Err = %v, want ErrClosed", h.Err())
	}
}

// The registry lost everything (an operator wiped it, or etcd lost its
// data): every node's subnet.env still names its subnet, the nodes all come
// back at once, and each gets its own subnet back.
func TestEmptyRegistryReclaimsPrevious(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	const nodes = 6
	before := make([]netip.Prefix, nodes)
	for i := range nodes {
		h := acquire(t, r, node(i+1, wide, t))
		before[i] = h.Lease().Subnet
		if err := h.Close(e.ctx()); err != nil {
			t.Fatal(err)
		}
	}
	e.deleteSubnets()

	after := make([]*Held, nodes)
	errs := make([]error, nodes)
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Go(func() {
			req := node(i+1, wide, t)
			req.Previous = before[i]
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			after[i], errs[i] = r.Acquire(ctx, req)
		})
	}
	wg.Wait()
	for i := range nodes {
		if errs[i] != nil {
			t.Fatalf("node %d: %v", i+1, errs[i])
		}
		if got := after[i].Lease().Subnet; got != before[i] {
			t.Errorf("node %d: got %s, want its previous %s", i+1, got, before[i])
		}
	}
}

func TestConcurrentAcquiresGetDistinctSubnets(t *testing.T) {
	e := newEnv(t)
	const nodes = 20
	regs := make([]*Registry, nodes)
	for i := range regs {
		regs[i] = e.registry(0)
	}
	var wg sync.WaitGroup
	helds := make([]*Held, nodes)
	errs := make([]error, nodes)
	start := make(chan struct{})
	for i := range nodes {
		wg.Go(func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			helds[i], errs[i] = regs[i].Acquire(ctx, node(i+1, wide, t))
		})
	}
	close(start)
	wg.Wait()
	seen := map[netip.Prefix]string{}
	for i, h := range helds {
		if errs[i] != nil {
			t.Fatalf("node %d: %v", i+1, errs[i])
		}
		defer h.Close(context.Background())
		l := h.Lease()
		if other, ok := seen[l.Subnet]; ok {
			t.Fatalf("%s held by both %s and %s", l.Subnet, other, l.Attrs.NodeName)
		}
		seen[l.Subnet] = l.Attrs.NodeName
	}
	leases, _, err := regs[0].List(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if len(leases) != nodes {
		t.Fatalf("%d leases in the registry, want %d", len(leases), nodes)
	}
	for _, l := range leases {
		if seen[l.Subnet] != l.Attrs.NodeName {
			t.Fatalf("registry has %v, nodes hold %v", l, seen)
		}
	}
}

// A key without an etcd lease is a reservation: never handed to another
// node, handed to the node it names, and left in place when that node goes.
func TestReservations(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	// 10.244.0.8/30 reserved for n9, flannel-style (no node name: by IP).
	e.put(subnets+"10.244.0.8-30", `{"PublicIP":"198.18.0.19","PublicIPv6":null,"BackendType":"vxlan"}`)

	got := map[string]bool{}
	for i := 1; i <= 2; i++ {
		got[acquire(t, r, node(i, tiny, t)).Lease().Key()] = true
	}
	if got["10.244.0.8-30"] || len(got) != 2 {
		t.Fatalf("nodes got %v, want .4 and .12 (.8 is reserved)", got)
	}
	_, err := r.Acquire(e.ctx(), node(3, tiny, t))
	want := "no free subnet in 10.244.0.0/28 between 10.244.0.4 and 10.244.0.12 (2 leased, 1 reserved)"
	if !errors.Is(err, lease.ErrNoFreeSubnet) || !strings.HasSuffix(err.Error(), want) {
		t.Fatalf("err = %v\nwant ...%s", err, want)
	}

	// n9 starts: the reservation is its, and stays a reservation.
	h := acquire(t, r, node(9, tiny, t))
	if h.Lease().Key() != "10.244.0.8-30" || !h.Lease().Reserved() {
		t.Fatalf("n9 got %v, want its reservation 10.244.0.8-30", h.Lease())
	}
	kv := e.get(subnets + "10.244.0.8-30").Kvs[0]
	if kv.Lease != 0 || !strings.Contains(string(kv.Value), `"NodeName":"n9"`) || !strings.Contains(string(kv.Value), `"VtepMAC":"0e:00:00:00:00:09"`) {
		t.Fatalf("reservation now lease %x, value %s; want no lease and n9's attributes", kv.Lease, kv.Value)
	}
	if err := h.Release(e.ctx()); err != nil {
		t.Fatal(err)
	}
	if e.get(subnets+"10.244.0.8-30").Count != 1 {
		t.Fatal("Release deleted a reservation")
	}
	// Still nobody else's.
	if _, err := r.Acquire(e.ctx(), node(4, tiny, t)); !errors.Is(err, lease.ErrNoFreeSubnet) {
		t.Fatalf("n4: err = %v, want exhaustion", err)
	}
}

func TestExhaustion(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	for i := 1; i <= 3; i++ {
		acquire(t, r, node(i, tiny, t))
	}
	_, err := r.Acquire(e.ctx(), node(4, tiny, t))
	want := "acquire a subnet lease for node n4: no free subnet in 10.244.0.0/28 between 10.244.0.4 and 10.244.0.12 (3 leased, 0 reserved)"
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant %s", err, want)
	}
	// The etcd lease granted for the failed attempt is revoked, not leaked.
	leases, lerr := e.raw.Leases(e.ctx())
	if lerr != nil {
		t.Fatal(lerr)
	}
	if len(leases.Leases) != 3 {
		t.Fatalf("%d etcd leases, want 3", len(leases.Leases))
	}
}

func TestDuplicatePublicIP(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	n1 := acquire(t, r, node(1, wide, t))
	dup := node(2, wide, t)
	dup.Attrs.PublicIP = netip.MustParseAddr("198.18.0.11") // n1's
	_, err := r.Acquire(e.ctx(), dup)
	if !errors.Is(err, ErrPublicIPInUse) {
		t.Fatalf("err = %v, want ErrPublicIPInUse", err)
	}
	for _, want := range []string{"198.18.0.11", "node n1", "node n2", n1.Lease().Key(), "-iface=", "-public-ip=", "etcdctl del " + subnets + n1.Lease().Key()} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	if n := e.count(); n != 1 {
		t.Fatalf("%d keys, want only n1's", n)
	}
}

// Two nodes on one IP that both pass the planning check (they listed before
// either claimed): the later claim backs off after the fact.
func TestDuplicatePublicIPRace(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	first := acquire(t, r, node(1, wide, t))

	dup := node(2, wide, t)
	dup.Attrs.PublicIP = netip.MustParseAddr("198.18.0.11")
	value, err := lease.MarshalAttrs(lease.Attrs{PublicIP: dup.Attrs.PublicIP, NodeName: "n2"})
	if err != nil {
		t.Fatal(err)
	}
	grant, err := e.raw.Grant(e.ctx(), 60)
	if err != nil {
		t.Fatal(err)
	}
	c := claim{kind: claimNew, v4: netip.MustParsePrefix("10.244.77.0/24")}
	if first.Lease().Subnet == c.v4 {
		c.v4 = netip.MustParsePrefix("10.244.78.0/24")
	}
	ok, rev, err := r.claim(e.ctx(), c, grant.ID, value)
	if err != nil || !ok {
		t.Fatalf("claim: %v %v", ok, err)
	}
	err = r.checkAfterClaim(e.ctx(), dup, c, rev)
	if !errors.Is(err, ErrPublicIPInUse) || !strings.Contains(err.Error(), "node n1") {
		t.Fatalf("err = %v, want ErrPublicIPInUse naming n1", err)
	}
	if e.get(r.SubnetKey(c.v4, c.v6)).Count != 0 {
		t.Fatal("the losing claim was not withdrawn")
	}
	// The older holder's own check passes.
	if err := r.checkAfterClaim(e.ctx(), node(1, wide, t), claim{kind: claimTakeover, v4: first.Lease().Subnet}, 0); err != nil {
		t.Fatal(err)
	}
}

// flanneld identifies a node by its public IP; its lease has no NodeName.
// A loom agent on that machine takes it over instead of taking a second one.
func TestTakesOverFlanneldLease(t *testing.T) {
	e := newEnv(t)
	grant, err := e.raw.Grant(e.ctx(), 3600)
	if err != nil {
		t.Fatal(err)
	}
	e.put(subnets+"10.244.42.0-24", `{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:99"}}`, clientv3.WithLease(grant.ID))
	req := node(9, wide, t)
	req.Attrs.PublicIP = netip.MustParseAddr("198.18.0.99")
	h := acquire(t, e.registry(0), req)
	if h.Lease().Key() != "10.244.42.0-24" {
		t.Fatalf("got %s, want flanneld's 10.244.42.0-24", h.Lease().Key())
	}
	kv := e.get(subnets + "10.244.42.0-24").Kvs[0]
	if clientv3.LeaseID(kv.Lease) == grant.ID || !strings.Contains(string(kv.Value), `"NodeName":"n9"`) {
		t.Fatalf("key not taken over: lease %x value %s", kv.Lease, kv.Value)
	}
}

// countingKV counts the requests the registry sends.
type countingKV struct {
	clientv3.KV
	gets, txns atomic.Int64
}

func (c *countingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.gets.Add(1)
	return c.KV.Get(ctx, key, opts...)
}

func (c *countingKV) Txn(ctx context.Context) clientv3.Txn {
	c.txns.Add(1)
	return c.KV.Txn(ctx)
}

// rangeRequests reads etcd's own count of Range RPCs served.
func rangeRequests(t *testing.T) float64 {
	t.Helper()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "grpc_server_handled_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "grpc_method" && lp.GetValue() == "Range" {
					n += m.GetCounter().GetValue()
				}
			}
		}
	}
	return n
}

func TestListIsOneRequest(t *testing.T) {
	e := newEnv(t)
	const live, reserved = 40, 10
	grant, err := e.raw.Grant(e.ctx(), 3600)
	if err != nil {
		t.Fatal(err)
	}
	for i := range live + reserved {
		val := fmt.Sprintf(`{"PublicIP":"198.18.1.%d","PublicIPv6":null,"BackendType":"vxlan","NodeName":"n%d"}`, i, i)
		if i < live {
			e.put(fmt.Sprintf("%s10.244.%d.0-24", subnets, i+1), val, clientv3.WithLease(grant.ID))
		} else {
			e.put(fmt.Sprintf("%s10.244.%d.0-24", subnets, i+1), val)
		}
	}
	// Garbage an operator might leave: skipped, not fatal.
	e.put(subnets+"not-a-subnet", `{}`)
	e.put(subnets+"10.244.200.0-24", `not json`)
	e.put(subnets+"nested/10.244.201.0-24", `{"PublicIP":"198.18.1.201"}`)

	r := e.registry(0)
	kv := &countingKV{KV: r.kv}
	r.kv = kv
	before := rangeRequests(t)
	leases, rev, err := r.List(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if n := rangeRequests(t) - before; n != 1 {
		t.Errorf("etcd served %v range requests for one List, want 1", n)
	}
	if kv.gets.Load() != 1 || kv.txns.Load() != 0 {
		t.Errorf("List sent %d gets and %d txns, want 1 and 0", kv.gets.Load(), kv.txns.Load())
	}
	if rev == 0 {
		t.Error("no revision")
	}
	nLive, nRes := 0, 0
	for _, l := range leases {
		if l.Reserved() {
			nRes++
		} else {
			nLive++
			if time.Until(l.Expiration) < 23*time.Hour {
				t.Errorf("%v: Expiration %v", l, l.Expiration)
			}
		}
	}
	if nLive != live || nRes != reserved {
		t.Fatalf("listed %d live and %d reserved, want %d and %d", nLive, nRes, live, reserved)
	}
}

func TestNetworkConfig(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	_, err := r.NetworkConfig(e.ctx())
	if err == nil || !strings.Contains(err.Error(), "/coreos.com/network/config") ||
		!strings.Contains(err.Error(), `etcdctl put /coreos.com/network/config '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'`) ||
		!strings.Contains(err.Error(), "--network-config") {
		t.Fatalf("missing config: err = %v", err)
	}
	e.put(prefix+"/config", `{"Network":"10.50.0.0/16","Backend":{"Type":"host-gw"}}`)
	cfg, err := r.NetworkConfig(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Network.String() != "10.50.0.0/16" || cfg.Backend.Type != "host-gw" {
		t.Fatalf("config %+v", cfg)
	}
	e.put(prefix+"/config", `{"Network":"10.50.0.0/16","SubnetLen":40}`)
	if _, err := r.NetworkConfig(e.ctx()); err == nil || !strings.Contains(err.Error(), "/coreos.com/network/config") {
		t.Fatalf("invalid config: err = %v", err)
	}
}

// watcher runs Watch in the background and hands out its events.
type watcher struct {
	t      *testing.T
	events chan lease.Event
	errc   chan error
	cancel context.CancelFunc
}

func startWatch(t *testing.T, r *Registry, rev int64, known []lease.Lease) *watcher {
	ctx, cancel := context.WithCancel(context.Background())
	w := &watcher{t: t, events: make(chan lease.Event, 100), errc: make(chan error, 1), cancel: cancel}
	go func() {
		w.errc <- r.Watch(ctx, rev, known, func(evs []lease.Event) {
			for _, ev := range evs {
				w.events <- ev
			}
		})
	}()
	t.Cleanup(w.stop)
	return w
}

func (w *watcher) stop() {
	w.cancel()
	select {
	case err := <-w.errc:
		if !errors.Is(err, context.Canceled) {
			w.t.Errorf("Watch returned %v, want context.Canceled", err)
		}
		w.errc <- err // for a second stop
	case <-time.After(waitFor):
		w.t.Error("Watch did not return after cancel")
	}
}

// next returns the next event, failing after waitFor.
func (w *watcher) next() lease.Event {
	w.t.Helper()
	select {
	case ev := <-w.events:
		return ev
	case <-time.After(waitFor):
		w.t.Fatal("no event")
	}
	panic("unreachable")
}

func (w *watcher) expect(typ lease.EventType, key, nodeName string) lease.Event {
	w.t.Helper()
	ev := w.next()
	if ev.Type != typ || ev.Lease.Key() != key || ev.Lease.Attrs.NodeName != nodeName {
		w.t.Fatalf("event %v %v, want %v %s of %s", ev.Type, ev.Lease, typ, key, nodeName)
	}
	return ev
}

func (w *watcher) quiet() {
	w.t.Helper()
	select {
	case ev := <-w.events:
		w.t.Fatalf("unexpected event %v %v", ev.Type, ev.Lease)
	case <-time.After(300 * time.Millisecond):
	}
}

func TestWatchSeesPeers(t *testing.T) {
	e := newEnv(t)
	me, peer := e.registry(0), e.registry(0)
	acquire(t, me, node(1, wide, t)) // the watching node's own lease
	known, rev, err := me.List(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	w := startWatch(t, me, rev, known)
	w.quiet() // what List returned is not reported again

	p := acquire(t, peer, node(2, wide, t))
	key := p.Lease().Key()
	ev := w.expect(lease.Added, key, "n2")
	if ev.Lease.Attrs.PublicIP.String() != "198.18.0.12" || ev.Lease.Reserved() {
		t.Fatalf("added %+v", ev.Lease)
	}

	// The peer restarts with the same attributes: nothing to report.
	if err := p.Close(e.ctx()); err != nil {
		t.Fatal(err)
	}
	p = acquire(t, peer, node(2, wide, t))
	w.quiet()

	// It restarts with a new VTEP MAC: an update, delivered as Added.
	if err := p.Close(e.ctx()); err != nil {
		t.Fatal(err)
	}
	req := node(2, wide, t)
	req.Attrs.BackendData = json.RawMessage(`{"VNI":1,"VtepMAC":"0e:00:00:00:00:22"}`)
	p = acquire(t, peer, req)
	ev = w.expect(lease.Added, key, "n2")
	if !strings.Contains(string(ev.Lease.Attrs.BackendData), "0e:00:00:00:00:22") {
		t.Fatalf("update carried %s", ev.Lease.Attrs.BackendData)
	}

	if err := p.Release(e.ctx()); err != nil {
		t.Fatal(err)
	}
	ev = w.expect(lease.Removed, key, "n2")
	if ev.Lease.Attrs.PublicIP.String() != "198.18.0.12" {
		t.Fatalf("removal lacks the peer's attributes: %+v", ev.Lease)
	}
}

// A watcher that fell behind etcd's compaction re-lists and reports the
// difference, so a lease removed in the gap still arrives as Removed.
func TestWatchAfterCompaction(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	gone := acquire(t, r, node(1, wide, t))
	stays := acquire(t, r, node(2, wide, t))
	known, rev, err := r.List(e.ctx())
	if err != nil {
		t.Fatal(err)
	}

	// The gap: n1 leaves, n3 arrives, n4 comes and goes, n2 is unchanged;
	// then the history is compacted away.
	if err := gone.Release(e.ctx()); err != nil {
		t.Fatal(err)
	}
	added := acquire(t, r, node(3, wide, t))
	brief := acquire(t, r, node(4, wide, t))
	if err := brief.Release(e.ctx()); err != nil {
		t.Fatal(err)
	}
	now := e.get(prefix + "/nothing").Header.Revision
	if _, err := e.raw.Compact(e.ctx(), now, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}

	w := startWatch(t, r, rev, known)
	got := map[string]lease.EventType{}
	for range 2 {
		ev := w.next()
		got[ev.Lease.Key()] = ev.Type
	}
	want := map[string]lease.EventType{gone.Lease().Key(): lease.Removed, added.Lease().Key(): lease.Added}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	w.quiet()

	// And it watches on from the new listing.
	if err := stays.Release(e.ctx()); err != nil {
		t.Fatal(err)
	}
	w.expect(lease.Removed, stays.Lease().Key(), "n2")
}

func TestHeldDoneWhenKeyDeleted(t *testing.T) {
	e := newEnv(t)
	h := acquire(t, e.registry(0), node(1, wide, t))
	select {
	case <-h.Done():
		t.Fatal("Done before anything happened")
	case <-time.After(200 * time.Millisecond):
	}
	e.deleteSubnets()
	select {
	case <-h.Done():
	case <-time.After(waitFor):
		t.Fatal("Done not closed after the key was deleted")
	}
	if !errors.Is(h.Err(), ErrLeaseLost) || !strings.Contains(h.Err().Error(), "deleted") {
		t.Fatalf("Err = %v", h.Err())
	}
}

func TestHeldDoneWhenEtcdLeaseRevoked(t *testing.T) {
	e := newEnv(t)
	h := acquire(t, e.registry(0), node(1, wide, t))
	id := clientv3.LeaseID(e.get(subnets + h.Lease().Key()).Kvs[0].Lease)
	if _, err := e.raw.Revoke(e.ctx(), id); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.Done():
	case <-time.After(waitFor):
		t.Fatal("Done not closed after the etcd lease was revoked")
	}
	if !errors.Is(h.Err(), ErrLeaseLost) {
		t.Fatalf("Err = %v", h.Err())
	}
}

// Keep-alive renews a short lease for longer than its TTL.
func TestKeepAliveRenews(t *testing.T) {
	e := newEnv(t)
	h := acquire(t, e.registry(2*time.Second), node(1, wide, t))
	time.Sleep(4 * time.Second) // two TTLs

	select {
	case <-h.Done():
		t.Fatalf("lease lost: %v", h.Err())
	default:
	}
	kv := e.get(subnets + h.Lease().Key())
	if kv.Count != 1 {
		t.Fatal("the key expired")
	}
	ttl, err := e.raw.TimeToLive(e.ctx(), clientv3.LeaseID(kv.Kvs[0].Lease))
	if err != nil || ttl.TTL < 0 || ttl.GrantedTTL != 2 { // TTL is whole seconds left, rounded down: 0 is alive
		t.Fatalf("TimeToLive of %x: ID %x TTL %d granted %d, err %v", kv.Kvs[0].Lease, ttl.ID, ttl.TTL, ttl.GrantedTTL, err)
	}
}

// Someone deletes every lease: Keep re-acquires, preferring the same subnet,
// and reports it; on shutdown it leaves the key for the next start.
func TestKeepReacquires(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan lease.Lease, 10)
	errc := make(chan error, 1)
	go func() { errc <- r.Keep(ctx, node(1, wide, t), func(l lease.Lease) { changes <- l }) }()

	next := func() lease.Lease {
		select {
		case l := <-changes:
			return l
		case err := <-errc:
			t.Fatalf("Keep returned %v", err)
		case <-time.After(waitFor):
			t.Fatal("no lease reported")
		}
		panic("unreachable")
	}
	first := next()
	e.deleteSubnets()
	second := next()
	if second.Subnet != first.Subnet {
		t.Fatalf("re-acquired %s, want the same %s", second.Subnet, first.Subnet)
	}
	kv := e.get(subnets + second.Key())
	if kv.Count != 1 || kv.Kvs[0].Lease == 0 {
		t.Fatal("re-acquired lease not in etcd")
	}

	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Keep returned %v", err)
		}
	case <-time.After(waitFor):
		t.Fatal("Keep did not return")
	}
	if e.get(subnets+second.Key()).Count != 1 {
		t.Fatal("Keep deleted the lease on shutdown; a restart would lose the subnet")
	}
}

func TestKeepStopsOnPermanentError(t *testing.T) {
	e := newEnv(t)
	r := e.registry(0)
	acquire(t, r, node(1, wide, t))
	dup := node(2, wide, t)
	dup.Attrs.PublicIP = netip.MustParseAddr("198.18.0.11")
	err := r.Keep(e.ctx(), dup, func(lease.Lease) { t.Error("onChange called") })
	if !errors.Is(err, ErrPublicIPInUse) {
		t.Fatalf("Keep returned %v, want ErrPublicIPInUse", err)
	}
}

// Unreachable store: every call fails within the request timeout instead
// of hanging.
func TestRequestTimeout(t *testing.T) {
	// 127.0.0.1:1 refuses connections (tcpmux is never served here).
	r, err := New(context.Background(), Config{Endpoints: []string{"http://127.0.0.1:1"}, RequestTimeout: 500 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	start := time.Now()
	if _, _, err := r.List(context.Background()); err == nil {
		t.Fatal("List succeeded against nothing")
	}
	if _, err := r.Acquire(context.Background(), node(1, wide, t)); err == nil {
		t.Fatal("Acquire succeeded against nothing")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("two calls took %v with a 500ms request timeout", d)
	}
}

// etcd loses its data and comes back empty at the same address: held leases
// notice within the progress interval (not after a third of the 24 h TTL),
// Keep re-claims the same subnet, and watchers re-list and report what went.
func TestStoreLosesData(t *testing.T) {
	e := newEnv(t)
	fast := func() *Registry {
		r := e.registry(0)
		r.probeEvery = 200 * time.Millisecond
		// Long enough for the keeper to re-claim before the watcher's
		// grace runs out, even on a loaded machine.
		r.removeDelay = 3 * time.Second
		return r
	}
	keeper, other, watching := fast(), fast(), fast()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan lease.Lease, 10)
	errc := make(chan error, 1)
	go func() { errc <- keeper.Keep(ctx, node(1, wide, t), func(l lease.Lease) { changes <- l }) }()
	var first lease.Lease
	select {
	case first = <-changes:
	case <-time.After(waitFor):
		t.Fatal("Keep reported no lease")
	}
	n2 := acquire(t, other, node(2, wide, t))
	known, rev, err := watching.List(e.ctx())
	if err != nil {
		t.Fatal(err)
	}
	// Push the old store's revision well past what the new one will reach.
	for i := range 20 {
		e.put(prefix+"/filler", fmt.Sprint(i))
	}
	w := startWatch(t, watching, rev, known)
	time.Sleep(500 * time.Millisecond) // the watcher probes the old store

	e.loseData()
	// The new store moves past the watcher's last event revision (but not
	// past the old store's revision): the watcher must notice all the same.
	for i := range 5 {
		e.put(prefix+"/filler", fmt.Sprint(i))
	}

	select {
	case <-n2.Done():
		if !errors.Is(n2.Err(), ErrLeaseLost) {
			t.Fatalf("n2: Err = %v", n2.Err())
		}
	case <-time.After(waitFor):
		t.Fatal("n2's Held did not notice the store lost its data")
	}
	select {
	case again := <-changes:
		if again.Subnet != first.Subnet {
			t.Fatalf("Keep re-acquired %s, want the same %s", again.Subnet, first.Subnet)
		}
	case err := <-errc:
		t.Fatalf("Keep returned %v", err)
	case <-time.After(waitFor):
		t.Fatal("Keep did not re-acquire after the store lost its data")
	}
	// The watcher must report n2 gone (nobody re-claims it), and must not
	// report n1 at all: its removal waits out the grace a store reset gets,
	// and n1 is back, with the same attributes, before that.
	deadline := time.After(waitFor)
	for {
		select {
		case ev := <-w.events:
			if ev.Lease.Key() == first.Key() {
				t.Fatalf("watcher reported n1's lease %v across the store's data loss: peers would drop their routes to it", ev.Type)
			}
			if ev.Type == lease.Removed && ev.Lease.Key() == n2.Lease().Key() {
				return
			}
		case <-deadline:
			t.Fatal("watcher did not report n2's lease removed")
		}
	}
}

// Two agents started with one node name would take the lease from each
// other forever; the first one's Keep stops and says why.
func TestKeepStopsWhenAnotherAgentTakesOver(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan lease.Lease, 10)
	errc := make(chan error, 1)
	go func() { errc <- e.registry(0).Keep(ctx, node(1, wide, t), func(l lease.Lease) { changes <- l }) }()
	var first lease.Lease
	select {
	case first = <-changes:
	case <-time.After(waitFor):
		t.Fatal("Keep reported no lease")
	}
	second := acquire(t, e.registry(0), node(1, wide, t))
	if second.Lease().Subnet != first.Subnet {
		t.Fatalf("second agent got %s, want a takeover of %s", second.Lease().Subnet, first.Subnet)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, ErrLeaseTakenOver) || !strings.Contains(err.Error(), "n1") {
			t.Fatalf("Keep returned %v, want ErrLeaseTakenOver", err)
		}
	case l := <-changes:
		t.Fatalf("Keep fought back and took %v", l)
	case <-time.After(waitFor):
		t.Fatal("Keep did not stop")
	}
	select {
	case <-second.Done():
		t.Fatalf("the second agent lost its lease: %v", second.Err())
	default:
	}
}

func TestAuth(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx()
	for _, step := range []func() error{
		func() error { _, err := e.raw.RoleAdd(ctx, "root"); return err },
		func() error { _, err := e.raw.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := e.raw.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := e.raw.RoleAdd(ctx, "loom"); return err },
		func() error {
			_, err := e.raw.RoleGrantPermission(ctx, "loom", prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := e.raw.UserAdd(ctx, "agent", "agentpw"); return err },
		func() error { _, err := e.raw.UserGrantRole(ctx, "agent", "loom"); return err },
		func() error { _, err := e.raw.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}

	r, err := New(ctx, Config{Endpoints: []string{e.url}, Username: "agent", Password: "agentpw", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	acquire(t, r, node(1, wide, t))
	if leases, _, err := r.List(ctx); err != nil || len(leases) != 1 {
		t.Fatalf("List as agent: %v %v", leases, err)
	}

	if r, err := New(ctx, Config{Endpoints: []string{e.url}, Username: "agent", Password: "wrong", Logger: testLogger(t)}); err == nil {
		r.Close()
		t.Fatal("New accepted a wrong password")
	}
	anon, err := New(ctx, Config{Endpoints: []string{e.url}, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	if _, _, err := anon.List(ctx); err == nil {
		t.Fatal("List without credentials succeeded on a store with auth")
	}
}
