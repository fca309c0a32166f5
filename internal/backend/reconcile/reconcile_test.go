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
