// Package reconcile keeps one kind of kernel object (routes, neighbours, FDB
// entries, devices) equal to a desired state that a backend computes from
// its peer cache.
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
// When to sync: at once on the first trigger after a quiet spell (no sync
// for Settle), so a lone change (a new node, a route someone deleted) is
// programmed within milliseconds. A trigger that comes within Settle of the
// end of a sync is taken for part of a burst (a thousand leases in a few
// watch batches, the echo of our own changes): the next sync waits until
// triggers pause for a tenth of Settle, and at most Settle, so the rest of
// the burst is served by one sync rather than one per trigger, and a sync
// never waits long for triggers that are not coming.
//
// Groups: reconcilers whose objects depend on one another (vxlan's device,
// then its neighbours and FDB entries, then the routes through them) run in
// one Group: one goroutine syncs them one after another, in the order given,
// in every round ("pass") where any of them has work, so a new peer's
// neighbour and FDB entry are in the kernel before its route, in the same
// pass. A member starts only once every member before it has completed a
// full sync (a route through a device needs the device). A lone reconciler
// is a Group of one.
//
// Cost: the desired state is a State, indexed by key when it is built (once
// per change of what the backend wants, not once per sync), so a partial
// sync looks only at the keys it was given; the kernel's objects are still
// dumped at every sync (O(objects), a few milliseconds for thousands), since
// that is what catches whatever changed behind loom's back. A watcher
// ignores the echo of the reconciler's own changes (Satisfied), so a sync
// that made thousands of changes is not followed by one that checks them
// all again. Every change is logged at debug level, with one info line per
// sync that changed something, giving the counts.
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
// Its methods are called from the goroutine that runs the reconciler only.
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

// Wanter is implemented by the Notifier a Reconciler gives its kind's
// Watch: Wanted returns the object wanted at k at the last sync.
type Wanter[K comparable, V any] interface {
	Wanted(k K) (V, bool)
}

// Satisfied reports whether n wants exactly have at have's key, as c
// compares them: an event showing that the kernel now holds have, as loom's
// own object, asks for no sync. That is the echo of the reconciler's own
// changes (thousands of events after a cold start), which would otherwise
// cost a sync that finds nothing to do. It is false when n cannot tell.
func Satisfied[K comparable, V any](n Notifier[K], c Comparer[K, V], have V) bool {
	w, ok := n.(Wanter[K, V])
	if !ok {
		return false
	}
	want, ok := w.Wanted(c.Key(have))
	return ok && c.Equal(want, have)
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
	// Settle is the longest a trigger that comes right after a sync waits
	// for the rest of its burst, and the quiet spell after which a trigger
	// syncs at once (see the package notes); 0 means DefaultSettle.
	// Ignored with Group: the Group's applies.
	Settle time.Duration
	// Group, when set, is the Group the reconciler runs in (Group.Run);
	// nil means a Group of its own (Run, RunState).
	Group *Group
	// Logger receives the reconciler's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Reconciler is the sync loop for one kind of object. Trigger, TriggerFull,
// Wants, Ready and Stats are safe for concurrent use; it is run by one
// goroutine at a time (Run, RunState or its Group's Run).
type Reconciler[K comparable, V any] struct {
	name   string
	resync time.Duration
	log    *slog.Logger
	group  *Group
	shared bool // group was given in Config, with other members

	// ready is set after the first successful full sync and stays set.
	ready atomic.Bool

	mu sync.Mutex // guards the fields below
	// dirty holds the keys for the next partial sync.
	dirty map[K]struct{}
	// full says the next sync must be full.
	full bool
	// wanted is the desired state at the last sync (nil: none yet).
	wanted *State[K, V]
	// conflicts holds the conflicts reported so far, so each is logged
	// once when it appears and once when it goes.
	conflicts map[K]string
	stats     Stats
	// lastFull is when the last full sync (successful or not) started.
	lastFull time.Time
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
		log:       cfg.Logger,
		group:     cfg.Group,
		shared:    cfg.Group != nil,
		dirty:     make(map[K]struct{}),
		conflicts: make(map[K]string),
		full:      true,
	}
	if r.resync == 0 {
		r.resync = DefaultResync
	}
	if r.group == nil {
		r.group = NewGroup(cfg.Settle)
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
	r.group.wake()
}

// TriggerFull asks for a full sync.
func (r *Reconciler[K, V]) TriggerFull() {
	r.mu.Lock()
	r.full = true
	r.mu.Unlock()
	r.group.wake()
}

// Wants reports whether k was in the desired state at the last sync.
func (r *Reconciler[K, V]) Wants(k K) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.wanted.Has(k)
}

// Wanted returns the object wanted at k at the last sync (see Satisfied).
func (r *Reconciler[K, V]) Wanted(k K) (V, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.wanted.Get(k)
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
// the kernel as it is; it returns an error only if the watch cannot start,
// or if the reconciler belongs to a shared Group (run the Group instead).
func (r *Reconciler[K, V]) Run(ctx context.Context, kind Kind[K, V], desired func() ([]V, error)) error {
	return r.RunState(ctx, kind, func() (*State[K, V], error) {
		objs, err := desired()
		if err != nil {
			return nil, err
		}
		return NewState(kind.Key, objs), nil
	})
}

// RunState is Run with a desired state that is already indexed: a backend
// that keeps its State until its peers change makes a partial sync cost
// only the keys it names (and the kernel dump).
func (r *Reconciler[K, V]) RunState(ctx context.Context, kind Kind[K, V], desired func() (*State[K, V], error)) error {
	if r.shared {
		return fmt.Errorf("reconcile %s: it belongs to a Group: run the Group", r.name)
	}
	return r.group.Run(ctx, r.Stage(kind, desired))
}

// Stage binds r to its kernel Kind and desired state, for Group.Run. The
// reconciler must have been made with that Group in its Config.
func (r *Reconciler[K, V]) Stage(kind Kind[K, V], desired func() (*State[K, V], error)) Stage {
	return Stage{s: &stage[K, V]{r: r, kind: kind, desired: desired}}
}

// Group runs reconcilers one after another on one goroutine, and coalesces
// their triggers (see the package notes). Make it with NewGroup, give it to
// each member's Config, and call Run with their Stages in order.
type Group struct {
	settle time.Duration
	// kick holds at most one pending wake-up of Run. Senders never block,
	// which is what coalesces triggers.
	kick chan struct{}
	// lastWake is when the last wake-up was sent (UnixNano), to tell
	// when a burst pauses.
	lastWake atomic.Int64
	// batch is held shared by Batch and exclusively by a pass while it
	// takes its members' triggers, so a pass sees a batch whole or not
	// at all.
	batch sync.RWMutex
}

// NewGroup returns a Group whose triggers that come within settle of a pass
// wait at most settle for the rest of their burst; 0 means DefaultSettle.
func NewGroup(settle time.Duration) *Group {
	if settle <= 0 {
		settle = DefaultSettle
	}
	return &Group{settle: settle, kick: make(chan struct{}, 1)}
}

// Batch runs fn, whose triggers for several members (a peer's neighbour,
// FDB entry and route) then reach one pass together: a pass takes the keys
// triggered in its members either before fn or after it, never half-way,
// so each member's objects for those keys are synced in member order.
// fn must not call Batch.
func (g *Group) Batch(fn func()) {
	g.batch.RLock()
	defer g.batch.RUnlock()
	fn()
}

func (g *Group) wake() {
	g.lastWake.Store(time.Now().UnixNano())
	select {
	case g.kick <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// Stage is a member of a Group, bound to its Kind and desired state
// (Reconciler.Stage).
type Stage struct{ s stager }

// stager is what Run needs of a Stage, whatever its key and value types.
type stager interface {
	watch(ctx context.Context) (wait func(), err error)
	// take moves the keys triggered so far into the stage's work for the
	// coming pass. A full sync asked for is taken at syncOnce instead, so
	// an earlier member can ask for one within the pass (a device
	// re-created: replay what lives on it).
	take()
	// syncOnce runs one sync, full or partial, if there is work.
	syncOnce()
	Ready() bool
	// resyncDue is when the next periodic full sync is due (zero: no
	// full sync has run yet, so one is pending anyway).
	resyncDue() time.Time
	TriggerFull()
}

// Run syncs the stages until ctx is done: a pass at once (full syncs), then
// a pass on every trigger of a member and when a member's Resync is due. A
// pass syncs each member with work, in order; a member whose predecessors
// have not all completed a full sync yet waits for a later pass. Run
// returns nil when ctx ends and leaves the kernel as it is; it returns an
// error only if a member's watch cannot start.
func (g *Group) Run(ctx context.Context, stages ...Stage) error {
	wctx, cancel := context.WithCancel(ctx)
	var waits []func()
	defer func() {
		cancel()
		for _, wait := range waits {
			wait()
		}
	}()
	for _, st := range stages {
		wait, err := st.s.watch(wctx)
		if err != nil {
			return err
		}
		if wait != nil {
			waits = append(waits, wait)
		}
	}
	for _, st := range stages {
		st.s.TriggerFull()
	}
	select { // the first pass serves every trigger made so far
	case <-g.kick:
	default:
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		g.pass(stages)
		lastEnd := time.Now()
		timer.Reset(g.nextResync(stages, lastEnd))
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
			now := time.Now()
			for _, st := range stages {
				if due := st.s.resyncDue(); !due.IsZero() && !now.Before(due) {
					st.s.TriggerFull()
				}
			}
		case <-g.kick:
			// Within Settle of the last pass, let the rest of the burst
			// arrive; after a quiet spell, go at once.
			if time.Since(lastEnd) < g.settle && !g.quiesce(ctx) {
				return nil
			}
		}
		select { // the pass below serves any wake-up queued meanwhile
		case <-g.kick:
		default:
		}
	}
}

// quiesce waits until no wake-up has come for a tenth of Settle, or Settle
// has passed. It returns false if ctx ended meanwhile.
func (g *Group) quiesce(ctx context.Context) bool {
	pause := g.settle / 10
	deadline := time.Now().Add(g.settle)
	for {
		now := time.Now()
		wait := min(pause-now.Sub(time.Unix(0, g.lastWake.Load())), deadline.Sub(now))
		if wait <= 0 {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(wait):
		}
	}
}

func (g *Group) pass(stages []Stage) {
	g.batch.Lock()
	for _, st := range stages {
		st.s.take()
	}
	g.batch.Unlock()
	for _, st := range stages {
		st.s.syncOnce()
		if !st.s.Ready() {
			return // the members after it wait for its first full sync
		}
	}
}

// nextResync returns how long until the earliest periodic full sync due.
func (g *Group) nextResync(stages []Stage, now time.Time) time.Duration {
	next := time.Hour
	for _, st := range stages {
		if due := st.s.resyncDue(); !due.IsZero() {
			next = min(next, max(due.Sub(now), 0))
		}
	}
	return next
}

// stage is a Reconciler bound to its Kind and desired state.
type stage[K comparable, V any] struct {
	r       *Reconciler[K, V]
	kind    Kind[K, V]
	desired func() (*State[K, V], error)

	// keys is the work taken for the coming pass; touched only by the
	// goroutine running the Group. It stays for a later pass while the
	// stage waits for the members before it.
	keys map[K]struct{}
}

func (s *stage[K, V]) watch(ctx context.Context) (func(), error) {
	w, ok := s.kind.(Watcher[K])
	if !ok {
		return nil, nil
	}
	wait, err := w.Watch(ctx, s.r)
	if err != nil {
		return nil, fmt.Errorf("watch %s changes: %w", s.r.name, err)
	}
	return wait, nil
}

func (s *stage[K, V]) Ready() bool  { return s.r.Ready() }
func (s *stage[K, V]) TriggerFull() { s.r.TriggerFull() }

func (s *stage[K, V]) resyncDue() time.Time {
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	if s.r.lastFull.IsZero() {
		return time.Time{}
	}
	return s.r.lastFull.Add(s.r.resync)
}

func (s *stage[K, V]) take() {
	r := s.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.dirty) == 0 {
		return
	}
	if len(s.keys) == 0 {
		s.keys, r.dirty = r.dirty, make(map[K]struct{})
		return
	}
	for k := range r.dirty {
		s.keys[k] = struct{}{}
	}
	clear(r.dirty)
}

func (s *stage[K, V]) syncOnce() {
	r := s.r
	r.mu.Lock()
	full := r.full
	r.full = false
	if full {
		// A full sync covers every key, also those triggered since
		// the pass took its work.
		clear(r.dirty)
	}
	r.mu.Unlock()
	keys := s.keys
	s.keys = nil
	if !full && len(keys) == 0 {
		return
	}
	if full {
		keys = nil // every key
	}

	start := time.Now()
	res, err := r.sync(s.kind, s.desired, keys)
	elapsed := time.Since(start)

	r.mu.Lock()
	defer r.mu.Unlock()
	if full {
		r.stats.FullSyncs++
		r.lastFull = start
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
		return
	}
	if full {
		r.stats.LastFullSync = time.Now()
		r.ready.Store(true)
	}
	level := slog.LevelDebug
	if res.created+res.updated+res.deleted > 0 {
		level = slog.LevelInfo
	}
	r.log.Log(context.Background(), level, "synced", "full", full, "keys", len(keys), "created", res.created,
		"updated", res.updated, "deleted", res.deleted, "duration", elapsed)
}

type result struct {
	dumped                    bool
	owned                     int
	created, updated, deleted uint64
}

// sync makes the kernel's objects at keys (all of them when keys is nil)
// match the desired state.
func (r *Reconciler[K, V]) sync(kind Kind[K, V], desired func() (*State[K, V], error), keys map[K]struct{}) (result, error) {
	var res result
	want, err := desired()
	if err != nil {
		return res, fmt.Errorf("compute desired %ss: %w", r.name, err)
	}
	r.mu.Lock()
	r.wanted = want
	r.mu.Unlock()

	owned, foreign, err := kind.Dump()
	if err != nil {
		return res, fmt.Errorf("list %ss: %w", r.name, err)
	}
	res.dumped = true
	res.owned = len(owned)

	p := DiffState(kind, want, owned, foreign, keys)
	for _, d := range p.Duplicates {
		r.log.Error("two desired objects share one key; keeping the first", "dropped", fmt.Sprint(d))
	}
	r.reportConflicts(kind, p.Conflicts, keys)

	// Apply as much as possible, then report every failure at once. Each
	// change is logged at debug level only: a cold start with thousands of
	// peers makes thousands, and the sync's info line counts them.
	debug := r.log.Enabled(context.Background(), slog.LevelDebug)
	var errs []error
	for _, h := range p.Delete {
		if err := kind.Delete(h); err != nil {
			errs = append(errs, err)
			continue
		}
		res.deleted++
		res.owned--
		if debug {
			r.log.Debug("deleted, no longer wanted", r.name, fmt.Sprint(h))
		}
	}
	for _, w := range p.Update {
		if err := kind.Update(w); err != nil {
			errs = append(errs, err)
			continue
		}
		res.updated++
		if debug {
			r.log.Debug("updated", r.name, fmt.Sprint(w))
		}
	}
	for _, w := range p.Create {
		if err := kind.Create(w); err != nil {
			errs = append(errs, err)
			continue
		}
		res.created++
		res.owned++
		if debug {
			r.log.Debug("created", r.name, fmt.Sprint(w))
		}
	}
	return res, errors.Join(errs...)
}

// reportConflicts logs conflicts that appeared or went since the last report,
// for keys in scope (all keys when keys is nil).
func (r *Reconciler[K, V]) reportConflicts(kind Kind[K, V], cs []Conflict[V], keys map[K]struct{}) {
	now := make(map[K]Conflict[V], len(cs))
	for _, c := range cs {
		now[kind.Key(c.Want)] = c
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, msg := range r.conflicts {
		if _, in := keys[k]; keys != nil && !in {
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
