// Package backend holds what every data-plane backend (host-gw, vxlan, udp,
// wireguard) has in common: the contract the agent drives them through.
//
// A backend turns the peer leases the lease manager reports into kernel
// state, and keeps that state true: it computes the desired objects from its
// peer cache and hands them to a reconciler (package reconcile, with one Kind
// per object type: package routes for routes), which diffs them against what
// loom owns in the kernel and applies the difference, on peer events, on
// kernel events and on a periodic resync.
package backend

import (
	"context"

	"github.com/loomnet/loom/internal/lease"
)

// Network is one backend's data path on this node.
//
// The agent calls SetLocal with its own lease before Run, then feeds every
// batch of peer events to Handle, from any goroutine. Run programs the
// kernel until its context ends and then returns, leaving the data path in
// place so pods keep working while the agent restarts. Ready reports whether
// the data path has been fully programmed at least once (for /readyz).
type Network interface {
	SetLocal(own lease.Lease)
	Handle(events []lease.Event)
	Run(ctx context.Context) error
	Ready() bool
}
