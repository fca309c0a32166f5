package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// obj is a fake kernel object: key k holds value v; owned marks loom's.
type obj struct {
	k, v  string
	owned bool
}

func (o obj) String() string { return o.k + "=" + o.v }

type cmp struct{}

func (cmp) Key(o obj) string          { return o.k }
func (cmp) Equal(want, have obj) bool { return want.v == have.v }

// fakeKernel is a Kind over a map, safe for a test goroutine to change
// behind the reconciler's back.
type fakeKernel struct {
	cmp
	mu         sync.Mutex // guards objs and failCreate
	objs       map[string]obj
	failCreate int // fail this many Create calls
}

func newFakeKernel(objs ...obj) *fakeKernel {
	k := &fakeKernel{objs: map[string]obj{}}
	for _, o := range objs {
		k.objs[o.k] = o
	}
	return k
}

func (f *fakeKernel) Dump() (owned, foreign []obj, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range slices.Sorted(maps.Keys(f.objs)) {
		if o := f.objs[k]; o.owned {
			owned = append(owned, o)
		} else {
			foreign = append(foreign, o)
		}
	}
	return owned, foreign, nil
}

func (f *fakeKernel) Create(w obj) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failCreate > 0 {
		f.failCreate--
		return errors.New("injected create failure")
	}
	if _, ok := f.objs[w.k]; ok {
		return fmt.Errorf("create %v: exists", w)
	}
	w.owned = true
	f.objs[w.k] = w
	return nil
}

func (f *fakeKernel) Update(w obj) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.objs[w.k].owned {
		return fmt.Errorf("update %v: not owned", w)
	}
	w.owned = true
	f.objs[w.k] = w
	return nil
}

func (f *fakeKernel) Delete(h obj) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if o, ok := f.objs[h.k]; ok && !o.owned {
		return fmt.Errorf("delete %v: not owned", h)
	}
	delete(f.objs, h.k)
	return nil
}

func (f *fakeKernel) get(k string) (obj, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	o, ok := f.objs[k]
	return o, ok
}

func (f *fakeKernel) set(o obj) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.objs[o.k] = o
}

func (f *fakeKernel) remove(k string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.objs, k)
}

// desiredSet is the backend side: a desired state a test can change.
type desiredSet struct {
	mu   sync.Mutex // guards objs and err
	objs []obj
	err  error
}

func (d *desiredSet) get() ([]obj, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.objs), d.err
}

func (d *desiredSet) set(objs []obj, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.objs, d.err = objs, err
}

func TestDiff(t *testing.T) {
	tests := []struct {
		name           string
		desired        []obj
		owned, foreign []obj
		scope          []string // nil: every key
		wantCreate     []obj
		wantUpdate     []obj
		wantDelete     []obj
		wantConflicts  int
		wantDuplicates int
	}{
		{
			name:       "empty kernel: create everything",
			desired:    []obj{{k: "a", v: "1"}, {k: "b", v: "2"}},
			wantCreate: []obj{{k: "a", v: "1"}, {k: "b", v: "2"}},
		},
		{
			name:    "in sync: nothing",
			desired: []obj{{k: "a", v: "1"}},
			owned:   []obj{{k: "a", v: "1", owned: true}},
		},
		{
			name:       "owned differs: update",
			desired:    []obj{{k: "a", v: "1"}},
			owned:      []obj{{k: "a", v: "0", owned: true}},
			wantUpdate: []obj{{k: "a", v: "1"}},
		},
		{
			name:       "owned unwanted: delete",
			owned:      []obj{{k: "stale", v: "0", owned: true}},
			wantDelete: []obj{{k: "stale", v: "0", owned: true}},
		},
		{
			name:    "foreign unwanted: untouched",
			foreign: []obj{{k: "x", v: "0"}},
		},
		{
			name:          "foreign on a wanted key: conflict, untouched",
			desired:       []obj{{k: "a", v: "1"}},
			foreign:       []obj{{k: "a", v: "9"}},
			wantConflicts: 1,
		},
		{
			name:    "foreign equal to wanted: satisfied as it is",
			desired: []obj{{k: "a", v: "1"}},
			foreign: []obj{{k: "a", v: "1"}},
		},
		{
			name:           "duplicate desired key: first wins",
			desired:        []obj{{k: "a", v: "1"}, {k: "a", v: "2"}},
			wantCreate:     []obj{{k: "a", v: "1"}},
			wantDuplicates: 1,
		},
		{
			name:       "scope limits every change",
			desired:    []obj{{k: "a", v: "1"}, {k: "b", v: "2"}},
			owned:      []obj{{k: "a", v: "0", owned: true}, {k: "stale", v: "0", owned: true}},
			scope:      []string{"b"},
			wantCreate: []obj{{k: "b", v: "2"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var scope func(string) bool
			if tt.scope != nil {
				scope = func(k string) bool { return slices.Contains(tt.scope, k) }
			}
			p := Diff(cmp{}, tt.desired, tt.owned, tt.foreign, scope)
			if !slices.Equal(p.Create, tt.wantCreate) || !slices.Equal(p.Update, tt.wantUpdate) || !slices.Equal(p.Delete, tt.wantDelete) {
				t.Errorf("plan create %v update %v delete %v, want create %v update %v delete %v",
					p.Create, p.Update, p.Delete, tt.wantCreate, tt.wantUpdate, tt.wantDelete)
			}
			if len(p.Conflicts) != tt.wantConflicts || len(p.Duplicates) != tt.wantDuplicates {
				t.Errorf("conflicts %v duplicates %v, want %d and %d", p.Conflicts, p.Duplicates, tt.wantConflicts, tt.wantDuplicates)
			}
		})
	}
}

// start runs r against kind until the test ends, and checks that Run
// returns nil and promptly when its context ends.
func start(t *testing.T, r *Reconciler[string, obj], kind Kind[string, obj], d *desiredSet) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx, kind, d.get) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after its context ended")
		}
	})
}

func newReconciler(t *testing.T, resync time.Duration) *Reconciler[string, obj] {
	t.Helper()
	r, err := New[string, obj](Config{
		Name:   "obj",
		Resync: resync,
		Settle: time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRunConverges(t *testing.T) {
	kernel := newFakeKernel(
		obj{k: "a", v: "0", owned: true},     // ours, wrong value
		obj{k: "stale", v: "0", owned: true}, // ours, unwanted
		obj{k: "x", v: "0"},                  // foreign, unwanted
		obj{k: "b", v: "9"},                  // foreign, on a wanted key
	)
	d := &desiredSet{objs: []obj{{k: "a", v: "1"}, {k: "b", v: "2"}, {k: "c", v: "3"}}}
	r := newReconciler(t, time.Hour)
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(r.Collector()); err != nil {
		t.Fatal(err)
	}
	start(t, r, kernel, d)
	eventually(t, "ready", r.Ready)

	for _, want := range []obj{{k: "a", v: "1", owned: true}, {k: "c", v: "3", owned: true}, {k: "x", v: "0"}, {k: "b", v: "9"}} {
		if got, _ := kernel.get(want.k); got != want {
			t.Errorf("kernel[%s] = %+v, want %+v", want.k, got, want)
		}
	}
	if _, ok := kernel.get("stale"); ok {
		t.Error("stale owned object survived a full sync")
	}
	s := r.Stats()
	if s.Created != 1 || s.Updated != 1 || s.Deleted != 1 || s.Conflicts != 1 || s.Owned != 2 {
		t.Errorf("stats %+v, want 1 created, 1 updated, 1 deleted, 1 conflict, 2 owned", s)
	}
	if !r.Wants("b") || r.Wants("x") {
		t.Error("Wants does not follow the desired state")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			got[mf.GetName()] += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	if got[metricChanges] != 3 || got[metricConflicts] != 1 || got[metricSyncs] < 1 {
		t.Errorf("metrics %v, want 3 changes, 1 conflict, at least 1 sync", got)
	}
}

func TestResyncRestoresSilentDeletion(t *testing.T) {
	kernel := newFakeKernel()
	d := &desiredSet{objs: []obj{{k: "a", v: "1"}}}
	r := newReconciler(t, 20*time.Millisecond)
	start(t, r, kernel, d)
	eventually(t, "ready", r.Ready)

	kernel.remove("a") // no event: only the timer can notice
	eventually(t, "a to come back", func() bool { _, ok := kernel.get("a"); return ok })

	kernel.set(obj{k: "a", v: "tampered", owned: true})
	eventually(t, "a to be repaired", func() bool { o, _ := kernel.get("a"); return o.v == "1" })
}

func TestConflictResolvedWhenForeignGoes(t *testing.T) {
	kernel := newFakeKernel(obj{k: "a", v: "9"})
	d := &desiredSet{objs: []obj{{k: "a", v: "1"}}}
	r := newReconciler(t, time.Hour)
	start(t, r, kernel, d)
	eventually(t, "ready", r.Ready)
	if s := r.Stats(); s.Conflicts != 1 {
		t.Fatalf("stats %+v, want 1 conflict", s)
	}
	kernel.remove("a") // the operator deletes the foreign object
	r.Trigger("a")     // as a watcher would on its deletion event
	eventually(t, "a installed", func() bool { o, _ := kernel.get("a"); return o.owned && o.v == "1" })
	if s := r.Stats(); s.Conflicts != 0 {
		t.Errorf("stats %+v, want the conflict gone", s)
	}
}

func TestPartialSyncTouchesOnlyTriggeredKeys(t *testing.T) {
	kernel := newFakeKernel()
	d := &desiredSet{objs: []obj{{k: "a", v: "1"}, {k: "b", v: "1"}}}
	r := newReconciler(t, time.Hour)
	start(t, r, kernel, d)
	eventually(t, "ready", r.Ready)

	d.set([]obj{{k: "a", v: "2"}, {k: "b", v: "2"}}, nil)
	kernel.remove("b")
	r.Trigger("a")
	eventually(t, "a updated", func() bool { o, _ := kernel.get("a"); return o.v == "2" })
	if _, ok := kernel.get("b"); ok {
		t.Fatal("a partial sync of a re-created b")
	}
	if s := r.Stats(); s.PartialSyncs == 0 {
		t.Errorf("stats %+v: want a partial sync", s)
	}

	r.TriggerFull()
	eventually(t, "b back after a full sync", func() bool { o, _ := kernel.get("b"); return o.v == "2" })
}

func TestFailureForcesFullSync(t *testing.T) {
	kernel := newFakeKernel()
	kernel.failCreate = 1
	d := &desiredSet{objs: []obj{{k: "a", v: "1"}, {k: "b", v: "1"}}}
	r := newReconciler(t, time.Hour)
	start(t, r, kernel, d)
	eventually(t, "a failed sync", func() bool { return r.Stats().Errors == 1 })
	if r.Ready() {
		t.Fatal("ready after the only full sync failed")
	}

	// A trigger for an unrelated key must run a full sync now.
	r.Trigger("unrelated")
	eventually(t, "ready", r.Ready)
	for _, k := range []string{"a", "b"} {
		if _, ok := kernel.get(k); !ok {
			t.Errorf("%s missing after the full sync that followed a failure", k)
		}
	}
}

func TestDesiredErrorTouchesNothing(t *testing.T) {
	kernel := newFakeKernel(obj{k: "a", v: "1", owned: true})
	d := &desiredSet{err: errors.New("cache not loaded")}
	r := newReconciler(t, time.Hour)
	start(t, r, kernel, d)
	eventually(t, "a failed sync", func() bool { return r.Stats().Errors >= 1 })
	if _, ok := kernel.get("a"); !ok {
		t.Fatal("a failed desired-state computation deleted an owned object")
	}
	if r.Ready() {
		t.Fatal("ready without a successful sync")
	}
}

func TestConfigErrors(t *testing.T) {
	for _, cfg := range []Config{{}, {Name: "x", Resync: -time.Second}} {
		if _, err := New[string, obj](cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}

// A trigger after a quiet spell is served at once, not after Settle.
func TestTriggerAfterQuietSyncsAtOnce(t *testing.T) {
	const settle = time.Second
	kernel := newFakeKernel()
	d := &desiredSet{objs: []obj{{k: "a", v: "1"}}}
	r, err := New[string, obj](Config{Name: "obj", Resync: time.Hour, Settle: settle,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r, kernel, d)
	eventually(t, "ready", r.Ready)
	time.Sleep(settle + settle/10) // quiet

	d.set([]obj{{k: "a", v: "1"}, {k: "b", v: "1"}}, nil)
	began := time.Now()
	r.Trigger("b")
	eventually(t, "b created", func() bool { _, ok := kernel.get("b"); return ok })
	if took := time.Since(began); took > settle/2 {
		t.Errorf("a trigger after a quiet spell took %v to sync; Settle is %v", took, settle)
	}
}

// Triggers that keep coming right after a sync are served together.
func TestBurstCoalesced(t *testing.T) {
	kernel := newFakeKernel()
	d := &desiredSet{}
	r, err := New[string, obj](Config{Name: "obj", Resync: time.Hour, Settle: 500 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r, kernel, d)
	eventually(t, "ready", r.Ready)

	var objs []obj
	for i := range 20 {
		objs = append(objs, obj{k: fmt.Sprint(i), v: "1"})
		d.set(slices.Clone(objs), nil)
		r.Trigger(fmt.Sprint(i))
		time.Sleep(2 * time.Millisecond) // well under a tenth of Settle
	}
	eventually(t, "all created", func() bool { _, ok := kernel.get("19"); return ok })
	// The first trigger syncs at once (quiet before it); the rest of the
	// burst comes within Settle of that sync and waits for the pause.
	if s := r.Stats(); s.PartialSyncs > 5 {
		t.Errorf("a burst of 20 triggers took %d partial syncs, want it coalesced", s.PartialSyncs)
	}
}

// journal records the Create calls of several kinds in one order.
type journal struct {
	mu      sync.Mutex // guards entries
	entries []string
}

func (j *journal) add(s string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.entries = append(j.entries, s)
}

func (j *journal) index(s string) int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Index(j.entries, s)
}

type journaled struct {
	*fakeKernel
	name string
	j    *journal
}

func (k journaled) Create(w obj) error {
	if err := k.fakeKernel.Create(w); err != nil {
		return err
	}
	k.j.add(k.name + " " + w.k)
	return nil
}

// Members of a Group sync in order within a pass: a key triggered in all
// of them in one Batch is created by the first, then the second, then the
// third. A member waits for the first full sync of those before it.
func TestGroupRunsMembersInOrder(t *testing.T) {
	g := NewGroup(time.Millisecond)
	j := &journal{}
	names := []string{"device", "neigh", "route"}
	var rs []*Reconciler[string, obj]
	var kernels []*fakeKernel
	var ds []*desiredSet
	var stages []Stage
	for _, name := range names {
		r, err := New[string, obj](Config{Name: name, Resync: time.Hour, Group: g,
			Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
		if err != nil {
			t.Fatal(err)
		}
		k := newFakeKernel()
		d := &desiredSet{}
		rs, kernels, ds = append(rs, r), append(kernels, k), append(ds, d)
		stages = append(stages, r.Stage(journaled{k, name, j}, func() (*State[string, obj], error) {
			objs, err := d.get()
			if err != nil {
				return nil, err
			}
			return NewState(cmp{}.Key, objs), nil
		}))
	}
	// The first member cannot sync yet (its device is missing, say).
	ds[0].set(nil, errors.New("not yet"))
	if err := rs[0].Run(context.Background(), kernels[0], ds[0].get); err == nil {
		t.Error("Run of a member of a shared Group did not fail")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx, stages...) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Group.Run: %v", err)
		}
	})
	eventually(t, "a failed first sync", func() bool { return rs[0].Stats().Errors > 0 })
	if s := rs[1].Stats(); s.FullSyncs+s.PartialSyncs != 0 {
		t.Fatalf("the second member synced before the first could: %+v", s)
	}

	ds[0].set(nil, nil)
	rs[0].TriggerFull()
	eventually(t, "all ready", func() bool { return rs[0].Ready() && rs[1].Ready() && rs[2].Ready() })

	for i := range 50 {
		k := fmt.Sprint("k", i)
		for _, d := range ds {
			objs, _ := d.get()
			d.set(append(objs, obj{k: k, v: "1"}), nil)
		}
		g.Batch(func() {
			for _, r := range rs {
				r.Trigger(k)
			}
		})
	}
	eventually(t, "the last key routed", func() bool { _, ok := kernels[2].get("k49"); return ok })
	for i := range 50 {
		k := fmt.Sprint(" k", i)
		a, b, c := j.index("device"+k), j.index("neigh"+k), j.index("route"+k)
		if a < 0 || b < 0 || c < 0 || a > b || b > c {
			t.Errorf("key k%d created at positions %d, %d, %d of the journal, want device, then neigh, then route", i, a, b, c)
		}
	}
}

// A partial diff of an indexed state equals the scoped diff of the same
// objects.
func TestDiffStateMatchesDiff(t *testing.T) {
	mk := func(seed, n int, owned bool) []obj {
		var objs []obj
		for i := range n {
			x := (seed*31 + i*17) % 23
			objs = append(objs, obj{k: fmt.Sprint("k", x), v: fmt.Sprint(x % 3), owned: owned})
		}
		return objs
	}
	for seed := range 30 {
		desired, owned, foreign := mk(seed, 15, false), mk(seed+1, 12, true), mk(seed+2, 4, false)
		keys := map[string]struct{}{}
		for i := range seed % 7 {
			keys[fmt.Sprint("k", (seed+i*5)%23)] = struct{}{}
		}
		want := Diff(cmp{}, desired, owned, foreign, func(k string) bool { _, ok := keys[k]; return ok })
		got := DiffState(cmp{}, NewState(cmp{}.Key, desired), owned, foreign, keys)
		if !slices.Equal(got.Create, want.Create) || !slices.Equal(got.Update, want.Update) ||
			!slices.Equal(got.Delete, want.Delete) || !slices.Equal(got.Conflicts, want.Conflicts) {
			t.Errorf("seed %d: DiffState %+v, Diff %+v", seed, got, want)
		}
		full := Diff(cmp{}, desired, owned, foreign, nil)
		gotFull := DiffState(cmp{}, NewState(cmp{}.Key, desired), owned, foreign, nil)
		if !slices.Equal(gotFull.Create, full.Create) || !slices.Equal(gotFull.Update, full.Update) ||
			!slices.Equal(gotFull.Delete, full.Delete) || !slices.Equal(gotFull.Duplicates, full.Duplicates) {
			t.Errorf("seed %d: full DiffState %+v, Diff %+v", seed, gotFull, full)
		}
	}
}
