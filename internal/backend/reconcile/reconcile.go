// Package reconcile keeps one kind of kernel object (routes today;
// neighbours, FDB entries and links for vxlan later) equal to a desired state
// that a backend computes from its peer cache.
//
// The loop, in one sentence: compute the whole desired state as data, dump
// what the kernel holds, diff against the objects loom owns, apply only the
// difference. Nothing is applied "because an event said so"; events only
// decide when to look and where:
//
//   - a full sync diffs every key. It runs at start, every Resync (default
//     5 s), after any failure, and when a watcher says events may have been
//     lost. It is what removes stale objects and brings back objects deleted
//     without a notification (the kernel does not notify every deletion:
//     IPv4 routes flushed by a link going down are removed silently).
//   - a partial sync diffs only the keys someone named with Trigger: the keys
//     of a peer that changed, or of an object a kernel event touched. A peer
//     event therefore changes only that peer's objects.
//
// Triggers coalesce: a burst of them (a thousand leases in one watch batch,
// the echo of our own changes) wakes the loop once, after Settle.
//
// Ownership: each Kind marks the objects loom creates (routes carry a
// dedicated protocol number) and reports everything else as foreign. The
// reconciler never modifies or deletes a foreign object. A foreign object on a
// key loom wants is a conflict: logged once with both objects, counted, and
// left alone; a foreign object that already does exactly what loom wants (a
// route flanneld left behind) satisfies the key as it is.
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults for Config.
const (
	DefaultResync = 5 * time.Second
	DefaultSettle = 100 * time.Millisecond
)

// Comparer identifies objects and compares them. It is the part of a Kind
// that the pure Diff needs.
type Comparer[K comparable, V any] interface {
	// Key is the identity the kernel enforces: two objects with one key
	// cannot coexist (for a route: destination and metric in one table).
	Key(V) K
	// Equal reports whether have already does what want asks. It ignores
	// the ownership marker, so a foreign object can be compared too.
	Equal(want, have V) bool
}

// Kind is the kernel side of one object kind, bound to one namespace.
// Its methods are called from Run's goroutine only.
type Kind[K comparable, V any] interface {
	Comparer[K, V]
	// Dump lists the kernel's objects in the space the kind manages (for
	// routes: one table). owned carries loom's ownership marker; foreign is
	// everything else, so a conflict on a key can be seen.
	Dump() (owned, foreign []V, err error)
	// Create adds want, whose key is free.
	Create(want V) error
	// Update replaces the owned object at want's key with want.
	Update(want V) error
	// Delete removes an owned object. An object that is already gone is
	// not an error.
	Delete(have V) error
}

// Notifier is how a watcher tells the reconciler where to look.
// Its methods are safe for concurrent use and never block.
type Notifier[K comparable] interface {
	// Trigger asks for a partial sync of keys.
	Trigger(keys ...K)
	// TriggerFull asks for a full sync (events may have been lost, or an
	// event says something outside the keys changed).
	TriggerFull()
	// Wants reports whether k was in the desired state at the last sync.
	Wants(k K) bool
}

// Watcher is implemented by kinds that can follow kernel change events.
type Watcher[K comparable] interface {
	// Watch subscribes to the kernel's change events and feeds n until ctx
	// is done. It returns once the subscription is established, or with
	// the error that prevented it; wait blocks until the goroutines Watch
	// started have exited after ctx ends. A subscription that breaks later
	// is re-established by the watcher, which calls n.TriggerFull because
	// events were lost.
	Watch(ctx context.Context, n Notifier[K]) (wait func(), err error)
}

// Config configures a Reconciler.
type Config struct {
	// Name names the object kind in logs and metrics ("route").
	Name string
	// Resync is the period of full syncs; 0 means DefaultResync.
	Resync time.Duration
	// Settle is how long a trigger waits for more triggers before syncing,
	// so a burst costs one sync; 0 means DefaultSettle.
	Settle time.Duration
	// Logger receives the reconciler's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Reconciler is the sync loop for one kind of object. Trigger, TriggerFull,
// Wants, Ready and Stats are safe for concurrent use; Run runs at most once
// at a time.
type Reconciler[K comparable, V any] struct {
	name   string
	resync time.Duration
	settle time.Duration
	log    *slog.Logger

	// kick holds at most one pending wake-up for Run. Senders never block,
	// which is what coalesces triggers.
	kick chan struct{}

	// ready is set after the first successful full sync and stays set.
	ready atomic.Bool

	mu sync.Mutex // guards the fields below
	// dirty holds the keys for the next partial sync.
	dirty map[K]struct{}
	// full says the next sync must be full.
	full bool
	// wanted holds the keys of the desired state at the last sync.
	wanted map[K]struct{}
	// conflicts holds the conflicts reported so far, so each is logged
	// once when it appears and once when it goes.
	conflicts map[K]string
	stats     Stats
}

// Stats counts what a Reconciler did since it was made.
type Stats struct {
	FullSyncs    uint64 // completed or failed full syncs
	PartialSyncs uint64 // completed or failed partial syncs
	Errors       uint64 // syncs that failed (each forces a full sync next)

	Created uint64 // objects added
	Updated uint64 // owned objects replaced because they differed
	Deleted uint64 // owned objects removed because nothing wants them

	Owned     int // objects loom owns in the kernel after the last sync
	Conflicts int // wanted keys held by foreign objects

	LastDuration time.Duration // of the last sync, full or partial
	LastFullSync time.Time     // end of the last successful full sync
}

// New returns a Reconciler; call Run to start it.
func New[K comparable, V any](cfg Config) (*Reconciler[K, V], error) {
	if cfg.Name == "" {
		return nil, errors.New("reconcile: Config.Name is empty: name the object kind, e.g. \"route\"")
	}
	if cfg.Resync < 0 || cfg.Settle < 0 {
		return nil, fmt.Errorf("reconcile %s: Resync %v and Settle %v must not be negative", cfg.Name, cfg.Resync, cfg.Settle)
	}
	r := &Reconciler[K, V]{
		name:      cfg.Name,
		resync:    cfg.Resync,
		settle:    cfg.Settle,
		log:       cfg.Logger,
		kick:      make(chan struct{}, 1),
		dirty:     make(map[K]struct{}),
		wanted:    make(map[K]struct{}),
		conflicts: make(map[K]string),
		full:      true,
	}
	if r.resync == 0 {
		r.resync = DefaultResync
	}
	if r.settle == 0 {
		r.settle = DefaultSettle
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	r.log = r.log.With("object", r.name)
	return r, nil
}

// Trigger asks for a partial sync of keys.
func (r *Reconciler[K, V]) Trigger(keys ...K) {
	if len(keys) == 0 {
		return
	}
	r.mu.Lock()
	for _, k := range keys {
		r.dirty[k] = struct{}{}
	}
	r.mu.Unlock()
	r.wake()
}

// TriggerFull asks for a full sync.
func (r *Reconciler[K, V]) TriggerFull() {
	r.mu.Lock()
	r.full = true
	r.mu.Unlock()
	r.wake()
}

func (r *Reconciler[K, V]) wake() {
	select {
	case r.kick <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// Wants reports whether k was in the desired state at the last sync.
func (r *Reconciler[K, V]) Wants(k K) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.wanted[k]
	return ok
}

// Ready reports whether a full sync has succeeded since the Reconciler was
// made: the kernel held the whole desired state at that moment.
func (r *Reconciler[K, V]) Ready() bool { return r.ready.Load() }

// Stats returns a snapshot of the counters.
func (r *Reconciler[K, V]) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats
}

// Run syncs kind towards desired until ctx is done: a full sync at once, then
// on every trigger and every Resync. desired returns the whole desired state;
// when it fails the sync is abandoned before touching the kernel (an empty
// answer from a broken computation must not delete everything). If kind is a
// Watcher, its events trigger syncs. Run returns nil when ctx ends and leaves
// the kernel as it is; it returns an error only if the watch cannot start.
func (r *Reconciler[K, V]) Run(ctx context.Context, kind Kind[K, V], desired func() ([]V, error)) error {
	if w, ok := kind.(Watcher[K]); ok {
		wctx, cancel := context.WithCancel(ctx)
		wait, err := w.Watch(wctx, r)
		if err != nil {
			cancel()
			return fmt.Errorf("watch %s changes: %w", r.name, err)
		}
		defer func() {
			cancel()
			wait()
		}()
	}

	r.mu.Lock()
	r.full = true
	r.mu.Unlock()
	r.syncOnce(kind, desired)
	timer := time.NewTimer(r.resync)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
			r.TriggerFull()
		case <-r.kick:
			// Let the burst this trigger belongs to arrive.
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(r.settle):
			}
		}
		select { // the sync below serves any wake-up queued meanwhile
		case <-r.kick:
		default:
		}
		if r.syncOnce(kind, desired) {
			timer.Reset(r.resync)
		}
	}
}

// syncOnce runs one sync, full or partial as requested, and reports whether
// it was a full one.
func (r *Reconciler[K, V]) syncOnce(kind Kind[K, V], desired func() ([]V, error)) (full bool) {
	r.mu.Lock()
	full = r.full
	keys := r.dirty
	r.full = false
	r.dirty = make(map[K]struct{})
	r.mu.Unlock()
	if !full && len(keys) == 0 {
		return false
	}
	var scope func(K) bool
	if !full {
		scope = func(k K) bool { _, ok := keys[k]; return ok }
	}

	start := time.Now()
	res, err := r.sync(kind, desired, scope)
	elapsed := time.Since(start)

	r.mu.Lock()
	defer r.mu.Unlock()
	if full {
		r.stats.FullSyncs++
	} else {
		r.stats.PartialSyncs++
	}
	r.stats.Created += res.created
	r.stats.Updated += res.updated
	r.stats.Deleted += res.deleted
	r.stats.LastDuration = elapsed
	if res.dumped {
		r.stats.Owned = res.owned
	}
	if err != nil {
		r.stats.Errors++
		r.full = true // whatever went wrong, look at everything next time
		r.log.Error("sync failed; the next sync is a full one", "full", full, "keys", len(keys), "err", err)
		return full
	}
	if full {
		r.stats.LastFullSync = time.Now()
		r.ready.Store(true)
	}
	r.log.Debug("synced", "full", full, "keys", len(keys), "created", res.created,
		"updated", res.updated, "deleted", res.deleted, "duration", elapsed)
	return full
}

type result struct {
	dumped                    bool
	owned                     int
	created, updated, deleted uint64
}

func (r *Reconciler[K, V]) sync(kind Kind[K, V], desired func() ([]V, error), scope func(K) bool) (result, error) {
	var res result
	want, err := desired()
	if err != nil {
		return res, fmt.Errorf("compute desired %ss: %w", r.name, err)
	}
	wanted := make(map[K]struct{}, len(want))
	for _, w := range want {
		wanted[kind.Key(w)] = struct{}{}
	}
	r.mu.Lock()
	r.wanted = wanted
	r.mu.Unlock()

	owned, foreign, err := kind.Dump()
	if err != nil {
		return res, fmt.Errorf("list %ss: %w", r.name, err)
	}
	res.dumped = true
	res.owned = len(owned)

	p := Diff(kind, want, owned, foreign, scope)
	for _, d := range p.Duplicates {
		r.log.Error("two desired objects share one key; keeping the first", "dropped", fmt.Sprint(d))
	}
	r.reportConflicts(kind, p.Conflicts, scope)

	// Apply as much as possible, then report every failure at once.
	var errs []error
	for _, h := range p.Delete {
		if err := kind.Delete(h); err != nil {
			errs = append(errs, err)
			continue
		}
		res.deleted++
		res.owned--
		r.log.Info("deleted, no longer wanted", r.name, fmt.Sprint(h))
	}
	for _, w := range p.Update {
		if err := kind.Update(w); err != nil {
			errs = append(errs, err)
			continue
		}
		res.updated++
		r.log.Info("updated", r.name, fmt.Sprint(w))
	}
	for _, w := range p.Create {
		if err := kind.Create(w); err != nil {
			errs = append(errs, err)
			continue
		}
		res.created++
		res.owned++
		r.log.Info("created", r.name, fmt.Sprint(w))
	}
	return res, errors.Join(errs...)
}

// reportConflicts logs conflicts that appeared or went since the last report,
// for keys in scope (all keys when scope is nil).
func (r *Reconciler[K, V]) reportConflicts(kind Kind[K, V], cs []Conflict[V], scope func(K) bool) {
	now := make(map[K]Conflict[V], len(cs))
	for _, c := range cs {
		now[kind.Key(c.Want)] = c
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, msg := range r.conflicts {
		if scope != nil && !scope(k) {
			continue
		}
		if _, ok := now[k]; !ok {
			delete(r.conflicts, k)
			r.log.Info("conflict resolved", "was", msg)
		}
	}
	for k, c := range now {
		msg := fmt.Sprintf("want %v, kernel has foreign %v", c.Want, c.Have)
		if r.conflicts[k] == msg {
			continue
		}
		r.conflicts[k] = msg
		r.log.Error("a "+r.name+" loom wants is held by an object loom does not own; leaving it alone",
			"want", fmt.Sprint(c.Want), "foreign", fmt.Sprint(c.Have),
			"fix", "delete the foreign "+r.name+" if loom should manage this key; loom installs its own within one resync")
	}
	r.stats.Conflicts = len(r.conflicts)
}
