package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/lease"
)

var (
	// errCompacted ends a watch whose start revision is gone from etcd's
	// history; only a fresh listing can say what changed in the gap.
	errCompacted = errors.New("watch revision compacted")
	// errStoreReset ends a watch when the store's revision is below the
	// watch's: the store lost its data or was restored from a backup, and
	// a fresh listing is again the only way to know what it holds.
	errStoreReset = errors.New("store revision went backwards")
)

// removeDelay is how long Watch holds back a lease's removal. A lease is
// deleted and written again within milliseconds when an operator deletes a
// node's key or revokes its etcd lease (the agent re-claims the subnet at
// once), and peers must not drop their routes to it for that blink. A node
// that is really gone only keeps its routes a few seconds longer, which
// costs nothing: its traffic had nowhere to go anyway.
const removeDelay = 5 * time.Second

// Watch reports changes to the registry after fromRevision, given that the
// caller's view at fromRevision is known (typically List's result). out
// receives the events of each etcd watch response as one batch: Added for a
// new lease or new attributes of a known one, Removed for a deleted or
// expired one. A write that changes nothing a peer uses (a takeover by the
// same node with the same attributes) is not reported.
//
// A removal is reported only after it has lasted removeDelay (5 s); a lease
// written again with the same attributes meanwhile is not reported at all,
// and with new attributes it is reported as Added at once.
//
// When the history Watch needs is compacted away, or the store turns out to
// have lost its data (its revision went backwards, checked every 30 s), it
// lists the registry again and reports the difference from what it knew,
// so a removal in the gap still arrives as Removed. After a store lost its
// data, removals wait two check intervals instead of removeDelay: every
// agent notices within one and re-claims its subnet, so the leases come
// back and peers never drop a route. Broken watches are re-opened with
// backoff; removals due meanwhile wait until the store can be read again.
// Watch returns only when ctx is done, with ctx.Err(). out is called from
// Watch's goroutine, never concurrently.
func (r *Registry) Watch(ctx context.Context, fromRevision int64, known []lease.Lease, out func([]lease.Event)) error {
	// The watch's state and the damper's share each lease with the
	// caller's list: one copy of every lease, whoever holds it.
	state := make(map[string]*lease.Lease, len(known))
	for i := range known {
		state[known[i].Key()] = &known[i]
	}
	d := newDamper(state, out)
	defer d.stop()
	pos := position{rev: fromRevision, seen: fromRevision}
	var retry backoff
	relist := false
	grace := r.removeDelay // for the removals a re-listing finds
	for {
		if relist {
			entries, lrev, err := r.listing(ctx, true)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				wait := retry.next()
				r.log.Warn("re-listing subnet leases; retrying", "in", wait, "err", err)
				if sleep(ctx, wait) != nil {
					return ctx.Err()
				}
				continue
			}
			d.send(time.Now(), diff(state, entries), grace)
			pos, relist = position{rev: lrev, seen: lrev}, false
		}

		start := time.Now()
		err := r.watchFrom(ctx, &pos, state, d)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, errCompacted) || errors.Is(err, errStoreReset) {
			r.log.Info("re-listing subnet leases", "why", err, "revision", pos.rev)
			relist, grace = true, r.removeDelay
			if errors.Is(err, errStoreReset) {
				grace = max(2*r.probeEvery, r.removeDelay)
			}
			continue
		}
		if time.Since(start) > time.Minute {
			retry.reset() // it worked for a while: this is a new failure
		}
		wait := retry.next()
		r.log.Warn("subnet watch broke; re-opening", "revision", pos.rev, "in", wait, "err", err)
		if sleep(ctx, wait) != nil {
			return ctx.Err()
		}
	}
}

// damper stands between Watch and its caller: it holds removals back and
// drops events that would not change what the caller was told.
type damper struct {
	out     func([]lease.Event)
	told    map[string]*lease.Lease // what the caller believes is in the registry
	pending map[string]time.Time    // removals waiting, by key, with when they are due
	timer   *time.Timer             // fires at the earliest due removal; nil until needed
}

func newDamper(known map[string]*lease.Lease, out func([]lease.Event)) *damper {
	return &damper{out: out, told: maps.Clone(known), pending: map[string]time.Time{}}
}

// send passes evs on, except that removals wait for delay.
func (d *damper) send(now time.Time, evs []lease.Event, delay time.Duration) {
	var pass []lease.Event
	for _, ev := range evs {
		key := ev.Lease.Key()
		switch ev.Type {
		case lease.Added:
			delete(d.pending, key)
			if old, ok := d.told[key]; ok && sameLease(old, ev.Lease) {
				continue
			}
			d.told[key] = ev.Lease
			pass = append(pass, ev)
		case lease.Removed:
			if _, ok := d.told[key]; !ok {
				delete(d.pending, key)
				continue
			}
			if delay <= 0 {
				delete(d.told, key)
				delete(d.pending, key)
				pass = append(pass, ev)
				continue
			}
			if due, ok := d.pending[key]; !ok || due.Before(now.Add(delay)) {
				d.pending[key] = now.Add(delay)
			}
		}
	}
	if len(pass) > 0 {
		d.out(pass)
	}
	d.arm(now)
}

// flush reports the removals that are due.
func (d *damper) flush(now time.Time) {
	var pass []lease.Event
	for key, due := range d.pending {
		if due.After(now) {
			continue
		}
		delete(d.pending, key)
		if l, ok := d.told[key]; ok {
			delete(d.told, key)
			pass = append(pass, lease.Event{Type: lease.Removed, Lease: l})
		}
	}
	if len(pass) > 0 {
		d.out(pass)
	}
	d.arm(now)
}

// arm sets the timer for the earliest pending removal.
func (d *damper) arm(now time.Time) {
	var first time.Time
	for _, due := range d.pending {
		if first.IsZero() || due.Before(first) {
			first = due
		}
	}
	if first.IsZero() {
		if d.timer != nil {
			d.timer.Stop()
		}
		return
	}
	if d.timer == nil {
		d.timer = time.NewTimer(first.Sub(now))
		return
	}
	d.timer.Reset(first.Sub(now))
}

// due fires when a removal may be due; nil (never ready) when none waits.
func (d *damper) due() <-chan time.Time {
	if d.timer == nil || len(d.pending) == 0 {
		return nil
	}
	return d.timer.C
}

func (d *damper) stop() {
	if d.timer != nil {
		d.timer.Stop()
	}
}

// position is how far a Watch has come.
type position struct {
	rev  int64 // every event up to this revision is applied
	seen int64 // the highest store revision observed: it never decreases in one history
}

// watchFrom runs one etcd watch from pos.rev+1, applying events to state
// and advancing pos, until the watch ends. It returns errCompacted when the
// start revision is no longer in etcd's history, and errStoreReset when the
// store shows a revision below one it showed before.
func (r *Registry) watchFrom(ctx context.Context, pos *position, state map[string]*lease.Lease, d *damper) error {
	// RequireLeader: a member cut off from its cluster closes the watch
	// instead of leaving it silent, and the re-open finds a healthy member.
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := r.cli.Watch(wctx, r.subnets, clientv3.WithPrefix(), clientv3.WithRev(pos.rev+1), clientv3.WithProgressNotify())
	probe := time.NewTicker(r.probeEvery)
	defer probe.Stop()
	for {
		var wresp clientv3.WatchResponse
		var ok bool
		select {
		case now := <-d.due():
			d.flush(now)
			continue
		case <-probe.C:
			// A store that lost its data resumes the watch silently (see
			// probeEvery). This catches it unless the new store has already
			// passed the highest revision seen of the old one.
			cur, err := r.storeRevision(ctx)
			if err != nil {
				continue // the watch reports an unreachable store
			}
			if cur < pos.seen {
				return fmt.Errorf("%w: at %d, had seen %d", errStoreReset, cur, pos.seen)
			}
			pos.seen = cur
			continue
		case wresp, ok = <-wch:
		}
		if !ok {
			break
		}
		if wresp.CompactRevision != 0 {
			return errCompacted
		}
		if err := wresp.Err(); err != nil {
			return err
		}
		if wresp.Canceled {
			return errors.New("watch canceled by the server")
		}
		now := time.Now()
		var evs []lease.Event
		for _, ev := range wresp.Events {
			key := string(ev.Kv.Key)
			pos.rev = ev.Kv.ModRevision
			if ev.Type == clientv3.EventTypeDelete {
				old, ok := state[r.leaseKey(key)]
				if !ok {
					v4, v6, err := r.parseKey(ev.Kv.Key)
					if err != nil {
						continue
					}
					old = &lease.Lease{Subnet: v4, IPv6Subnet: v6}
				}
				delete(state, old.Key())
				evs = append(evs, lease.Event{Type: lease.Removed, Lease: old})
				continue
			}
			e, err := r.decode(ev.Kv, now)
			if err != nil {
				r.log.Warn("skipping registry entry", "key", key, "err", err)
				r.metrics.skipped.WithLabelValues(SkipUndecodable).Inc()
				// A known lease that no longer decodes is unusable to peers.
				if old, ok := state[r.leaseKey(key)]; ok {
					delete(state, old.Key())
					evs = append(evs, lease.Event{Type: lease.Removed, Lease: old})
				}
				continue
			}
			l := &e.Lease
			old, ok := state[e.Key()]
			state[e.Key()] = l
			if !ok || !sameLease(old, l) {
				evs = append(evs, lease.Event{Type: lease.Added, Lease: l})
			}
		}
		if wresp.IsProgressNotify() {
			pos.rev = max(pos.rev, wresp.Header.Revision)
		}
		pos.seen = max(pos.seen, pos.rev, wresp.Header.Revision)
		if len(evs) > 0 {
			d.send(now, evs, r.removeDelay)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("watch channel closed")
}

// leaseKey is the state-map key (lease.Lease.Key form) for an etcd key, or
// "" if it is not a subnet key.
func (r *Registry) leaseKey(key string) string {
	v4, v6, err := r.parseKey([]byte(key))
	if err != nil {
		return ""
	}
	return lease.MakeKey(v4, v6)
}

// diff replaces state with a fresh listing and returns what changed:
// removals first, so a subnet that moved is withdrawn before it reappears.
func diff(state map[string]*lease.Lease, entries []entry) []lease.Event {
	fresh := make(map[string]bool, len(entries))
	for _, e := range entries {
		fresh[e.Key()] = true
	}
	var evs []lease.Event
	for k, old := range state {
		if _, ok := fresh[k]; !ok {
			evs = append(evs, lease.Event{Type: lease.Removed, Lease: old})
			delete(state, k)
		}
	}
	for i := range entries {
		l := &entries[i].Lease
		old, ok := state[l.Key()]
		if !ok || !sameLease(old, l) {
			evs = append(evs, lease.Event{Type: lease.Added, Lease: l})
		}
		state[l.Key()] = l
	}
	return evs
}

// sameLease reports whether a and b look the same to a peer.
func sameLease(a, b *lease.Lease) bool {
	return a.Subnet == b.Subnet && a.IPv6Subnet == b.IPv6Subnet && a.Reserved() == b.Reserved() && sameAttrs(a.Attrs, b.Attrs)
}

func sameAttrs(a, b lease.Attrs) bool {
	samePtr := (a.PublicIPv6 == nil) == (b.PublicIPv6 == nil) && (a.PublicIPv6 == nil || *a.PublicIPv6 == *b.PublicIPv6)
	return a.PublicIP == b.PublicIP && samePtr && a.BackendType == b.BackendType && a.NodeName == b.NodeName &&
		bytes.Equal(a.BackendData, b.BackendData) && bytes.Equal(a.BackendV6Data, b.BackendV6Data)
}
