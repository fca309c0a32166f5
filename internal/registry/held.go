package registry

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/lease"
)

var (
	// ErrLeaseLost is matched (errors.Is) by Held.Err after the lease was
	// lost: its etcd lease expired or was revoked, or its key was deleted or
	// rewritten by someone else.
	ErrLeaseLost = errors.New("subnet lease lost")
	// ErrLeaseTakenOver is matched, with ErrLeaseLost, when the key was
	// taken over by another agent process with the same node name. Two
	// agents of one node would take the lease from each other forever, so
	// Keep stops instead of re-acquiring.
	ErrLeaseTakenOver = errors.New("subnet lease taken over by another agent of the same node")
	// ErrClosed is Held.Err after Close or Release.
	ErrClosed = errors.New("subnet lease closed")
)

// Held is a subnet lease held by this process: the session that keeps it.
// Its etcd lease is renewed by etcd keep-alive (the client renews at a third
// of the TTL and keeps retrying across reconnects until the TTL is spent),
// and its key is watched, so Done closes as soon as the lease is gone for
// any reason. A Held made from a reservation has no etcd lease; only its key
// is watched.
type Held struct {
	r      *Registry
	key    string
	id     clientv3.LeaseID // clientv3.NoLease for a reservation
	cancel context.CancelFunc
	done   chan struct{} // closed when run returns

	mu    sync.Mutex // guards lease and err
	lease lease.Lease
	err   error // nil while held; ErrClosed or an ErrLeaseLost wrap after
}

// hold starts the session for a claimed lease.
func (r *Registry) hold(l lease.Lease, id clientv3.LeaseID) (*Held, error) {
	ctx, cancel := context.WithCancel(context.Background())
	h := &Held{r: r, key: r.SubnetKey(l.Subnet, l.IPv6Subnet), id: id, cancel: cancel, done: make(chan struct{}), lease: l}
	var ka <-chan *clientv3.LeaseKeepAliveResponse // nil for a reservation: never ready
	if id != clientv3.NoLease {
		var err error
		if ka, err = r.cli.KeepAlive(ctx, id); err != nil {
			cancel()
			return nil, fmt.Errorf("keep etcd lease %x alive: %w", int64(id), err)
		}
	}
	go h.run(ctx, ka, l.Revision)
	return h, nil
}

// Lease returns the held lease; Expiration follows the keep-alives.
func (h *Held) Lease() lease.Lease {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lease
}

// Done is closed when the lease is no longer held: lost (Err wraps
// ErrLeaseLost) or closed by Close or Release (Err is ErrClosed).
func (h *Held) Done() <-chan struct{} { return h.done }

// Err says why Done is closed, and is nil before.
func (h *Held) Err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

// Close stops renewing the lease and leaves the key in place, so an agent
// that restarts within the TTL takes its subnet over again. It waits for the
// session to stop, or for ctx.
func (h *Held) Close(ctx context.Context) error {
	h.setErr(ErrClosed)
	h.cancel()
	select {
	case <-h.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("close subnet lease %s: %w", h.key, ctx.Err())
	}
}

// Release gives the subnet up: it stops renewing and revokes the etcd lease,
// which deletes the key. A reservation is left in place: it belongs to the
// operator.
func (h *Held) Release(ctx context.Context) error {
	if err := h.Close(ctx); err != nil {
		return err
	}
	if h.id == clientv3.NoLease {
		return nil
	}
	rctx, cancel := h.r.bounded(ctx)
	defer cancel()
	if _, err := h.r.cli.Revoke(rctx, h.id); err != nil {
		return fmt.Errorf("release subnet lease %s: revoke etcd lease %x: %w", h.key, int64(h.id), err)
	}
	return nil
}

func (h *Held) setErr(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err == nil {
		h.err = err
	}
}

// run drains the keep-alive responses and watches the key until the session
// is closed or the lease is lost.
func (h *Held) run(ctx context.Context, ka <-chan *clientv3.LeaseKeepAliveResponse, rev int64) {
	defer close(h.done)
	defer h.cancel()
	var retry backoff
	for {
		start := time.Now()
		next, loss := h.watchKey(ctx, ka, rev)
		if ctx.Err() != nil {
			return
		}
		if loss == nil {
			// The watch broke (compaction, no leader, closed stream, store
			// went back in time): read the key directly, then watch again.
			// A watch that breaks at once, again and again, is retried ever
			// more slowly.
			if time.Since(start) > time.Minute {
				retry.reset()
			}
			if sleep(ctx, retry.next()) != nil {
				return
			}
			if next, loss = h.recheck(ctx); next == 0 && loss == nil {
				continue // store unreadable: watch from where we were
			}
		}
		if loss != nil {
			h.lost(loss)
			return
		}
		rev = next
	}
}

// errKeepAliveEnded is the loss etcd's keep-alive reports: the lease ran
// out (the store was unreachable for a whole TTL) or was revoked.
var errKeepAliveEnded = errors.New("etcd stopped renewing the lease: it expired or was revoked")

// watchKey follows the key from rev+1. It returns the last revision seen,
// and why the lease is lost or nil when the watch ended for another reason.
func (h *Held) watchKey(ctx context.Context, ka <-chan *clientv3.LeaseKeepAliveResponse, rev int64) (int64, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := h.r.cli.Watch(wctx, h.key, clientv3.WithRev(rev+1))
	probe := time.NewTicker(h.r.probeEvery)
	defer probe.Stop()
	for {
		select {
		case <-ctx.Done():
			return rev, nil
		case <-probe.C:
			// Read the key itself: a watch on a store that lost its data
			// hears nothing (see probeEvery).
			cur, loss := h.recheck(ctx)
			if loss != nil {
				return rev, loss
			}
			if cur != 0 && cur < rev {
				h.r.log.Info("store revision went backwards; watching the held key anew", "key", h.key, "revision", cur, "was", rev)
				return rev, nil
			}
		case resp, ok := <-ka:
			if !ok {
				if ctx.Err() != nil {
					return rev, nil
				}
				return rev, errKeepAliveEnded
			}
			h.mu.Lock()
			h.lease.Expiration = time.Now().Add(time.Duration(resp.TTL) * time.Second)
			h.mu.Unlock()
		case wresp, ok := <-wch:
			if !ok || wresp.Canceled || wresp.Err() != nil {
				return rev, nil
			}
			for _, ev := range wresp.Events {
				if loss := h.check(ev.Type == mvccpb.DELETE, ev.Kv); loss != nil {
					return rev, loss
				}
				rev = ev.Kv.ModRevision
			}
		}
	}
}

// recheck reads the key after a broken watch. It returns the revision to
// watch from, or why the lease is lost, or neither if the store could not
// be read.
func (h *Held) recheck(ctx context.Context) (int64, error) {
	rctx, cancel := h.r.bounded(ctx)
	defer cancel()
	resp, err := h.r.kv.Get(rctx, h.key)
	if err != nil {
		h.r.log.Debug("re-reading held subnet key", "key", h.key, "err", err)
		return 0, nil
	}
	if len(resp.Kvs) == 0 {
		return 0, h.check(true, nil)
	}
	if loss := h.check(false, resp.Kvs[0]); loss != nil {
		return 0, loss
	}
	return resp.Header.Revision, nil
}

// check says why a change of the key means the lease is lost, or nil.
func (h *Held) check(deleted bool, kv *mvccpb.KeyValue) error {
	if deleted {
		return errors.New("its key was deleted")
	}
	a, err := lease.UnmarshalAttrs(kv.Value)
	if err != nil {
		return fmt.Errorf("its key was rewritten with an undecodable value: %w", err)
	}
	node := h.lease.Attrs.NodeName
	if clientv3.LeaseID(kv.Lease) != h.id {
		if a.NodeName == node {
			return fmt.Errorf("%w: another agent of node %s took it over", ErrLeaseTakenOver, node)
		}
		return fmt.Errorf("its key was rewritten by another writer (node %q)", a.NodeName)
	}
	if a.NodeName != node {
		// A reservation: an operator may rewrite it, but not for another node.
		return fmt.Errorf("the reservation was rewritten for node %q", a.NodeName)
	}
	return nil
}

func (h *Held) lost(loss error) {
	h.setErr(fmt.Errorf("%w: %s: %w", ErrLeaseLost, h.key, loss))
	h.r.log.Warn("subnet lease lost", "key", h.key, "why", loss)
	if h.id != clientv3.NoLease && !errors.Is(loss, errKeepAliveEnded) {
		// Our etcd lease is still alive, with no key on it.
		h.r.revoke(h.id)
	}
}

// Keep holds a subnet lease for req until ctx is done, and calls onChange
// with every lease it acquires: the first one, and each replacement.
//
// When the held lease is lost (an operator deleted the subnet keys, etcd
// lost its data or was down past the TTL, another writer took the key),
// Keep acquires again with Previous set to the lost subnet, so the node gets
// the same subnet back when it is still free, and reports the result,
// which may be a different subnet: then it logs at error level which node
// holds the old one and what to do about the node's pods. Store errors are
// retried with backoff; Keep returns early only for errors that retrying
// cannot fix (ErrPublicIPInUse, lease.ErrNoFreeSubnet, ErrLeaseTakenOver,
// an invalid request). When ctx is done it closes the lease without
// releasing it, so a restarted agent keeps its subnet, and returns
// ctx.Err(). onChange runs on Keep's goroutine. Close the Registry only
// after Keep has returned.
func (r *Registry) Keep(ctx context.Context, req Request, onChange func(lease.Lease)) error {
	var retry backoff
	again := false // acquiring to replace a lost lease
	defer r.setHeld(nil)
	for {
		h, err := r.Acquire(ctx, req)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if permanent(err) {
				return err
			}
			d := retry.next()
			r.log.Warn("could not acquire subnet lease; retrying", "node", req.NodeName, "in", d, "err", err)
			if sleep(ctx, d) != nil {
				return ctx.Err()
			}
			continue
		}
		retry.reset()
		l := h.Lease()
		r.setHeld(h)
		r.reportChange(ctx, req, l, again)
		if onChange != nil {
			onChange(l)
		}
		select {
		case <-ctx.Done():
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.RequestTimeout)
			err := h.Close(cctx)
			cancel()
			if err != nil {
				r.log.Warn("closing subnet lease", "err", err)
			}
			return ctx.Err()
		case <-h.Done():
			if errors.Is(h.Err(), ErrLeaseTakenOver) {
				return fmt.Errorf("hold subnet lease for node %s: %w", req.NodeName, h.Err())
			}
			r.log.Warn("re-acquiring subnet lease", "node", req.NodeName, "previous", l.Key(), "why", h.Err())
			req.Previous, req.PreviousV6 = l.Subnet, l.IPv6Subnet
			again = true
		}
	}
}

// reportChange logs a lease that is not the subnet the node had before
// (req.Previous: its subnet.env, or the lease it just lost), loudly: pods
// made with addresses of the old subnet are cut off until they are made
// again, and the CNI bridge keeps the old gateway until then. again says
// the lease replaces a lost one, for loom_lease_reacquired_total.
func (r *Registry) reportChange(ctx context.Context, req Request, l lease.Lease, again bool) {
	hadPrevious := req.Previous.IsValid() || req.PreviousV6.IsValid()
	changed := hadPrevious && (l.Subnet != req.Previous || l.IPv6Subnet != req.PreviousV6)
	if again {
		label := "same"
		if changed {
			label = "changed"
		}
		r.metrics.reacquired.WithLabelValues(label).Inc()
	}
	if !changed {
		return
	}
	old := lease.MakeKey(req.Previous, req.PreviousV6)
	holder := "nobody now (it did not fit the network config, or was reserved)"
	if entries, _, err := r.list(ctx); err == nil {
		for _, e := range entries {
			if free([]lease.Lease{e.Lease}, req.Previous, req.PreviousV6) {
				continue
			}
			holder = "node " + e.Attrs.NodeName
			if e.Attrs.NodeName == "" {
				holder = "a node without a name (flanneld) at " + e.Attrs.PublicIP.String()
			}
			if e.Reserved() {
				holder = "a reservation for " + holder
			}
			break
		}
	}
	r.log.Error("SUBNET CHANGED: the subnet this node had could not be taken back, so it holds a new one (subnet.env is rewritten with it). "+
		"Pods created with addresses of the old subnet have no connectivity: delete and recreate them, and the cni0 bridge, which keeps the old gateway",
		"node", req.NodeName, "old", old, "new", l.Key(), "old-subnet-held-by", holder)
}

// permanent reports whether retrying Acquire cannot help.
func permanent(err error) bool {
	var invalid *invalidRequestError
	return errors.Is(err, ErrPublicIPInUse) || errors.Is(err, lease.ErrNoFreeSubnet) || errors.As(err, &invalid)
}

// invalidRequestError is an Acquire request that can never succeed.
type invalidRequestError struct{ msg string }

func (e *invalidRequestError) Error() string { return e.msg }

// backoff is a capped exponential delay with jitter, so a fleet of agents
// does not retry a recovering store in lockstep.
type backoff struct{ cur time.Duration }

const (
	backoffMin = 200 * time.Millisecond
	backoffMax = 15 * time.Second
)

func (b *backoff) next() time.Duration {
	b.cur = min(max(2*b.cur, backoffMin), backoffMax)
	return b.cur/2 + rand.N(b.cur/2+1)
}

func (b *backoff) reset() { b.cur = 0 }

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
