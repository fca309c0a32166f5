package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/registry"
)

// recorder is a backend that records what the agent hands it.
type recorder struct{ handled []string }

func (r *recorder) SetLocal(lease.Lease) {}
func (r *recorder) Handle(events []lease.Event) {
	for _, e := range events {
		r.handled = append(r.handled, fmt.Sprintf("%s %s", e.Type, e.Lease))
	}
}
func (r *recorder) Run(ctx context.Context) error { <-ctx.Done(); return nil }
func (r *recorder) Ready() bool                   { return true }

func nodeLease(node string, third int) lease.Lease {
	return lease.Lease{
		Subnet:     netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", third)),
		Attrs:      lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "vxlan", NodeName: node},
		Expiration: time.Now().Add(time.Hour),
	}
}

// loom_peers (what the lab and operators wait on) counts the leases of
// other nodes after a partition longer than the TTL: n3 took n1's old
// subnet, and the watch reports n1's new lease before the agent records
// it as its own. That lease must not stay counted as a peer, and n3's
// lease for n1's old subnet must reach the backend.
func TestPeerCountAcrossSubnetChange(t *testing.T) {
	cfg, err := netconf.Parse([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`))
	if err != nil {
		t.Fatal(err)
	}
	be := &recorder{}
	a := &agent{log: slog.New(slog.DiscardHandler), be: be, known: map[string]string{},
		guard: registry.NewGuard(registry.GuardConfig{Network: cfg})}
	setOwn := func(l lease.Lease) {
		a.mu.Lock()
		a.own = l
		a.mu.Unlock()
	}
	n1Old, n1New, n2, n3Old := nodeLease("n1", 112), nodeLease("n1", 62), nodeLease("n2", 39), nodeLease("n3", 154)
	n3New := nodeLease("n3", 112)

	setOwn(n1Old)
	a.deliver([]lease.Event{{Type: lease.Added, Lease: &n1Old}, {Type: lease.Added, Lease: &n2}, {Type: lease.Added, Lease: &n3Old}})
	if got := a.peerCount(); got != 2 {
		t.Fatalf("before the partition: %d peers, want 2", got)
	}
	// Partition: n1's lease expires; n3 moves onto n1's old subnet.
	a.deliver([]lease.Event{{Type: lease.Removed, Lease: &n1Old}, {Type: lease.Removed, Lease: &n3Old}, {Type: lease.Added, Lease: &n3New}})
	// Healed: n1 claims a new subnet; the watch is faster than setLease.
	a.deliver([]lease.Event{{Type: lease.Added, Lease: &n1New}})
	setOwn(n1New)
	if got := a.peerCount(); got != 2 {
		t.Errorf("after the move: %d peers, want 2 (n2 and n3)", got)
	}
	if !slices.Contains(be.handled, "added "+n3New.String()) {
		t.Errorf("n3's lease for n1's old subnet never reached the backend; it got:\n%q", be.handled)
	}
	if slices.Contains(be.handled, "added "+n1Old.String()) {
		t.Errorf("n1's own lease reached the backend as a peer; it got:\n%q", be.handled)
	}
}
