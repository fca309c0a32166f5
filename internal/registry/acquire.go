package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
)

// maxClaimTries bounds Acquire's list-plan-claim rounds. A round fails only
// when another node's claim landed between our listing and our transaction;
// ten in a row means something is rewriting the registry in a loop.
const maxClaimTries = 10

// ErrPublicIPInUse is matched (errors.Is) by the error Acquire returns when
// another live node already uses this node's public IP.
var ErrPublicIPInUse = errors.New("public IP in use by another node")

// PublicIPInUseError says which node holds the public IP.
type PublicIPInUseError struct {
	IP     netip.Addr
	Holder string // the node that has the IP
	Subnet string // its lease, e.g. 10.244.1.0-24
	Key    string // its lease's etcd key, when known
	Node   string // the node that was refused
}

func (e *PublicIPInUseError) Error() string {
	s := fmt.Sprintf("public IP %s is already used by node %s (lease %s); node %s cannot share it: "+
		"start %s with -iface=<its own interface> or -public-ip=<its own address>",
		e.IP, e.Holder, e.Subnet, e.Node, e.Node)
	if e.Key != "" {
		s += fmt.Sprintf(" (if node %s no longer exists, delete its lease: etcdctl del %s)", e.Holder, e.Key)
	}
	return s
}

// Is makes errors.Is(err, ErrPublicIPInUse) true.
func (e *PublicIPInUseError) Is(target error) bool { return target == ErrPublicIPInUse }

// Request says who wants a lease and what it should say.
type Request struct {
	// NodeName identifies the node; required.
	NodeName string
	// Attrs is written as the lease value; NodeName is filled in from the
	// request. At least one public IP must be set.
	Attrs lease.Attrs
	// Previous and PreviousV6 are the subnets in the node's old subnet.env:
	// reclaimed if the node has no live lease and they are still free.
	Previous, PreviousV6 netip.Prefix
	// Config is the network config the lease must fit.
	Config netconf.Config
}

// claimKind is how a planned claim is written.
type claimKind int

const (
	claimNew         claimKind = iota // a free subnet: create the key
	claimTakeover                     // our own live lease: re-attach it to our etcd lease
	claimReservation                  // a reservation made for us: rewrite it, still without a lease
)

func (k claimKind) String() string {
	switch k {
	case claimNew:
		return "new"
	case claimTakeover:
		return "takeover"
	case claimReservation:
		return "reservation"
	}
	return fmt.Sprintf("claimKind(%d)", int(k))
}

// claim is the outcome of planning: which subnet to take and how.
type claim struct {
	kind   claimKind
	v4, v6 netip.Prefix
	rev    int64 // ModRevision the existing key was listed at (takeover, reservation)
}

// Acquire takes a subnet lease for req.NodeName, in this order of
// preference:
//
//  1. a reservation made for this node (its value names the node, or has no
//     node name and the node's public IP);
//  2. the node's own live lease (same NodeName; or, for a lease written by
//     flanneld, which has no NodeName, the same public IP), re-attached to a
//     new etcd lease held by this process;
//  3. req.Previous, if it fits the config and is free;
//  4. a random free subnet (lease.Allocate).
//
// A lease that no longer fits the config is skipped (and deleted once the
// new claim holds). Each claim is one transaction that fails if the key
// changed since it was listed; Acquire then re-lists and plans again, up to
// ten times. Acquire refuses with ErrPublicIPInUse if another live node has
// this node's public IP, and fails with lease.ErrNoFreeSubnet when the range
// is full.
func (r *Registry) Acquire(ctx context.Context, req Request) (*Held, error) {
	if req.NodeName == "" {
		return nil, &invalidRequestError{"acquire a subnet lease: no node name given"}
	}
	req.Attrs.NodeName = req.NodeName
	value, err := lease.MarshalAttrs(req.Attrs)
	if err != nil {
		return nil, &invalidRequestError{fmt.Sprintf("acquire a subnet lease for node %s: %v", req.NodeName, err)}
	}

	rctx, cancel := r.bounded(ctx)
	grant, err := r.cli.Grant(rctx, int64(r.cfg.TTL/time.Second))
	cancel()
	if err != nil {
		return nil, fmt.Errorf("acquire a subnet lease for node %s: grant an etcd lease: %w", req.NodeName, err)
	}
	id := grant.ID
	held := false
	defer func() {
		if !held {
			r.revoke(id)
		}
	}()

	for range maxClaimTries {
		entries, _, err := r.list(ctx)
		if err != nil {
			return nil, fmt.Errorf("acquire a subnet lease for node %s: %w", req.NodeName, err)
		}
		c, err := plan(req, entries)
		if e, ok := errors.AsType[*PublicIPInUseError](err); ok {
			e.Key = r.subnets + e.Subnet
		}
		if err != nil {
			return nil, fmt.Errorf("acquire a subnet lease for node %s: %w", req.NodeName, err)
		}
		ok, rev, err := r.claim(ctx, c, id, value)
		if err != nil {
			return nil, fmt.Errorf("acquire a subnet lease for node %s: claim %s: %w", req.NodeName, lease.MakeKey(c.v4, c.v6), err)
		}
		if !ok {
			r.log.Debug("subnet claim lost a race; re-listing", "node", req.NodeName, "subnet", lease.MakeKey(c.v4, c.v6), "kind", c.kind)
			continue
		}
		if err := r.checkAfterClaim(ctx, req, c, rev); err != nil {
			return nil, fmt.Errorf("acquire a subnet lease for node %s: %w", req.NodeName, err)
		}
		l := lease.Lease{Subnet: c.v4, IPv6Subnet: c.v6, Attrs: req.Attrs, Revision: rev}
		var leaseID clientv3.LeaseID
		if c.kind != claimReservation {
			leaseID = id
			l.Expiration = time.Now().Add(time.Duration(grant.TTL) * time.Second)
		} else {
			r.revoke(id) // a reservation lives without an etcd lease
		}
		h, err := r.hold(l, leaseID)
		if err != nil {
			return nil, fmt.Errorf("acquire a subnet lease for node %s: %w", req.NodeName, err)
		}
		held = true
		r.log.Info("acquired subnet lease", "node", req.NodeName, "subnet", l.Key(), "kind", c.kind)
		return h, nil
	}
	return nil, fmt.Errorf("acquire a subnet lease for node %s: %d claims in a row lost to concurrent writers", req.NodeName, maxClaimTries)
}

// plan picks the subnet to claim from a listing. It is pure, so the order of
// preference is testable without a store.
func plan(req Request, entries []entry) (claim, error) {
	ours := func(e entry) bool {
		if e.hasName {
			return e.Attrs.NodeName == req.NodeName
		}
		return samePublicIP(e.Attrs, req.Attrs) // flanneld's identity
	}
	// Refuse to share a public IP with another live named node: peers would
	// send both nodes' traffic to one machine.
	for _, e := range entries {
		if e.Reserved() || !e.hasName || e.Attrs.NodeName == req.NodeName {
			continue
		}
		if ip, ok := sharedIP(e.Attrs, req.Attrs); ok {
			return claim{}, &PublicIPInUseError{IP: ip, Holder: e.Attrs.NodeName, Subnet: e.Key(), Node: req.NodeName}
		}
	}

	fits := func(e entry) bool { return lease.Fits(req.Config, e.Subnet, e.IPv6Subnet) }
	isPrevious := func(e entry) bool { return e.Subnet == req.Previous && e.IPv6Subnet == req.PreviousV6 }
	// pick returns the first matching entry, preferring the previous subnet.
	pick := func(match func(entry) bool) (entry, bool) {
		var found entry
		ok := false
		for _, e := range entries {
			if match(e) && fits(e) {
				if isPrevious(e) {
					return e, true
				}
				if !ok {
					found, ok = e, true
				}
			}
		}
		return found, ok
	}

	if e, ok := pick(func(e entry) bool { return e.Reserved() && ours(e) }); ok {
		return claim{kind: claimReservation, v4: e.Subnet, v6: e.IPv6Subnet, rev: e.Revision}, nil
	}
	if e, ok := pick(func(e entry) bool { return !e.Reserved() && e.hasName && ours(e) }); ok {
		return claim{kind: claimTakeover, v4: e.Subnet, v6: e.IPv6Subnet, rev: e.Revision}, nil
	}
	if e, ok := pick(func(e entry) bool { return !e.Reserved() && !e.hasName && ours(e) }); ok {
		return claim{kind: claimTakeover, v4: e.Subnet, v6: e.IPv6Subnet, rev: e.Revision}, nil
	}

	taken := make([]lease.Lease, len(entries))
	for i, e := range entries {
		taken[i] = e.Lease
	}
	if (req.Previous.IsValid() || req.PreviousV6.IsValid()) && lease.Fits(req.Config, req.Previous, req.PreviousV6) && free(taken, req.Previous, req.PreviousV6) {
		return claim{kind: claimNew, v4: req.Previous, v6: req.PreviousV6}, nil
	}
	v4, v6, err := lease.Allocate(req.Config, taken, nil)
	if err != nil {
		return claim{}, err
	}
	return claim{kind: claimNew, v4: v4, v6: v6}, nil
}

// claim writes c in one transaction and reports whether it won, and the
// revision it was written at.
//
// A new subnet is created only if no key starts with its first part: that
// covers the key itself and, in a dual-stack registry, a key holding the
// same IPv4 subnet with another IPv6 pairing (written by flanneld). An
// existing key is rewritten only if it is unchanged since it was listed.
func (r *Registry) claim(ctx context.Context, c claim, id clientv3.LeaseID, value []byte) (bool, int64, error) {
	key := r.SubnetKey(c.v4, c.v6)
	var cmp clientv3.Cmp
	var put clientv3.Op
	switch c.kind {
	case claimNew:
		first := r.subnets + lease.MakeKey(c.v4, netip.Prefix{})
		if !c.v4.IsValid() {
			first = key
		}
		cmp = clientv3.Compare(clientv3.CreateRevision(first), "=", 0).WithPrefix()
		put = clientv3.OpPut(key, string(value), clientv3.WithLease(id))
	case claimTakeover:
		cmp = clientv3.Compare(clientv3.ModRevision(key), "=", c.rev)
		put = clientv3.OpPut(key, string(value), clientv3.WithLease(id))
	case claimReservation:
		cmp = clientv3.Compare(clientv3.ModRevision(key), "=", c.rev)
		put = clientv3.OpPut(key, string(value))
	}
	rctx, cancel := r.bounded(ctx)
	defer cancel()
	resp, err := r.kv.Txn(rctx).If(cmp).Then(put).Commit()
	if err != nil {
		return false, 0, err
	}
	return resp.Succeeded, resp.Header.Revision, nil
}

// checkAfterClaim closes the race the planning check cannot: two nodes with
// one public IP claiming at the same moment both pass it. After the claim
// each re-lists; the node whose lease was created later backs off, so
// exactly one of them keeps running. It also deletes the node's other,
// stale leases (left by a config change), so peers stop routing them here.
func (r *Registry) checkAfterClaim(ctx context.Context, req Request, c claim, rev int64) error {
	entries, _, err := r.list(ctx)
	if err != nil {
		return fmt.Errorf("re-check registry after claim: %w", err)
	}
	key := lease.MakeKey(c.v4, c.v6)
	var mine *entry
	for i := range entries {
		if entries[i].Key() == key {
			mine = &entries[i]
		}
	}
	if mine == nil {
		return fmt.Errorf("lease %s vanished right after it was claimed", key)
	}
	for _, e := range entries {
		if e.Reserved() || !e.hasName || e.Attrs.NodeName == req.NodeName || e.create >= mine.create {
			continue
		}
		if ip, ok := sharedIP(e.Attrs, req.Attrs); ok {
			if c.kind != claimReservation {
				r.deleteIfUnchanged(ctx, r.SubnetKey(c.v4, c.v6), rev)
			}
			return &PublicIPInUseError{IP: ip, Holder: e.Attrs.NodeName, Subnet: e.Key(), Key: r.subnets + e.Key(), Node: req.NodeName}
		}
	}
	for _, e := range entries {
		if e.Key() == key || e.Reserved() {
			continue
		}
		if e.Attrs.NodeName == req.NodeName || (!e.hasName && samePublicIP(e.Attrs, req.Attrs)) {
			r.log.Info("deleting the node's stale subnet lease", "node", req.NodeName, "subnet", e.Key())
			r.deleteIfUnchanged(ctx, r.SubnetKey(e.Subnet, e.IPv6Subnet), e.Revision)
		}
	}
	return nil
}

// deleteIfUnchanged deletes key if it still is at rev. Best effort: a
// failure leaves a lease that runs out with its TTL.
func (r *Registry) deleteIfUnchanged(ctx context.Context, key string, rev int64) {
	rctx, cancel := r.bounded(ctx)
	defer cancel()
	_, err := r.kv.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
		Then(clientv3.OpDelete(key)).
		Commit()
	if err != nil {
		r.log.Warn("could not delete subnet lease", "key", key, "err", err)
	}
}

// revoke drops an etcd lease this process granted and no longer needs.
// Best effort: an unrevoked lease without keys just runs out.
func (r *Registry) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.RequestTimeout)
	defer cancel()
	if _, err := r.cli.Revoke(ctx, id); err != nil {
		r.log.Debug("could not revoke unused etcd lease", "id", int64(id), "err", err)
	}
}

// free reports whether no listed lease overlaps v4 or v6.
func free(taken []lease.Lease, v4, v6 netip.Prefix) bool {
	for _, l := range taken {
		if (v4.IsValid() && l.Subnet.IsValid() && v4.Overlaps(l.Subnet)) ||
			(v6.IsValid() && l.IPv6Subnet.IsValid() && v6.Overlaps(l.IPv6Subnet)) {
			return false
		}
	}
	return true
}

// sharedIP returns a public address that a and b both have.
func sharedIP(a, b lease.Attrs) (netip.Addr, bool) {
	if a.PublicIP.IsValid() && a.PublicIP == b.PublicIP {
		return a.PublicIP, true
	}
	if a.PublicIPv6 != nil && b.PublicIPv6 != nil && *a.PublicIPv6 == *b.PublicIPv6 {
		return *a.PublicIPv6, true
	}
	return netip.Addr{}, false
}

// samePublicIP is flannel's node identity, for leases without a node name:
// the same public address.
func samePublicIP(a, b lease.Attrs) bool {
	_, ok := sharedIP(a, b)
	return ok
}
