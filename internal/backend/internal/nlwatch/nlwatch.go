// Package nlwatch runs one netlink event subscription for a reconcile.Watcher
// and keeps it alive: when the library closes the subscription (the socket
// failed, typically ENOBUFS after a burst outran the reader), it subscribes
// again with backoff and reports that events were lost, so the caller can ask
// for a full sync.
//
// The socket is opened inside the target namespace by the netlink library
// (briefly, on a locked thread) and stays bound there; no goroutine of ours
// runs inside another namespace.
package nlwatch

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/vishvananda/netns"
)

// ReceiveBuffer is the receive buffer asked for every event socket, so a
// burst (a link flap taking a thousand neighbours with it) fits without
// ENOBUFS.
const ReceiveBuffer = 1 << 20

// Open starts one subscription of the netlink library: it sends updates to ch
// until done is closed, reports socket errors to onErr, and closes ch when
// the subscription ends. ns is the namespace to open the socket in. Example:
//
//	func(ch chan netlink.LinkUpdate, done chan struct{}, ns *netns.NsHandle, onErr func(error)) error {
//		return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
//			Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: nlwatch.ReceiveBuffer})
//	}
type Open[T any] func(ch chan T, done chan struct{}, ns *netns.NsHandle, onErr func(error)) error

// Config names the subscription for logs and says where to open it.
type Config struct {
	What      string // "link events"
	NetNSPath string // empty: the agent's own namespace
	Logger    *slog.Logger
}

// Watch subscribes once (returning the error if that fails), then passes
// every update to handle from one goroutine until ctx ends. When the
// subscription breaks, it calls lost, re-subscribes with backoff, and calls
// lost again once the new socket exists (to cover the gap). wait blocks until
// the goroutine has exited after ctx ends.
func Watch[T any](ctx context.Context, cfg Config, open Open[T], handle func(T), lost func()) (wait func(), err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	w := &watcher[T]{cfg: cfg, open: open}
	sub, err := w.subscribe(ctx)
	if err != nil {
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		w.loop(ctx, sub, handle, lost)
	}()
	return func() { <-done }, nil
}

type watcher[T any] struct {
	cfg  Config
	open Open[T]
}

// subscription is one event socket: updates arrive on ch until stop is
// closed, after which the library's reader goroutine closes ch.
type subscription[T any] struct {
	ch   chan T
	stop chan struct{}
}

func (w *watcher[T]) subscribe(ctx context.Context) (subscription[T], error) {
	nsh := netns.None()
	if w.cfg.NetNSPath != "" {
		h, err := netns.GetFromPath(w.cfg.NetNSPath)
		if err != nil {
			return subscription[T]{}, fmt.Errorf("open namespace %s: %w", w.cfg.NetNSPath, err)
		}
		// The socket is created inside the namespace and stays there; the
		// handle is needed only while it is opened.
		defer h.Close()
		nsh = h
	}
	s := subscription[T]{ch: make(chan T, 256), stop: make(chan struct{})}
	onErr := func(err error) {
		if ctx.Err() == nil { // closing the socket at shutdown is not news
			w.cfg.Logger.Warn(w.cfg.What+" subscription", "err", err)
		}
	}
	if err := w.open(s.ch, s.stop, &nsh, onErr); err != nil {
		close(s.stop)
		where := w.cfg.NetNSPath
		if where == "" {
			where = "the agent's namespace"
		}
		return subscription[T]{}, fmt.Errorf("subscribe to %s in %s: %w", w.cfg.What, where, err)
	}
	return s, nil
}

func (w *watcher[T]) loop(ctx context.Context, sub subscription[T], handle func(T), lost func()) {
	backoff := 100 * time.Millisecond
	for {
		select {
		case u, ok := <-sub.ch:
			if ok {
				handle(u)
				continue
			}
			// The library closed the subscription: events were lost.
			// Closing stop ends the library's goroutine that waits on it
			// to close the (already failed) socket.
			close(sub.stop)
			lost()
			for {
				var err error
				if sub, err = w.subscribe(ctx); err == nil {
					break
				}
				w.cfg.Logger.Error("re-subscribe to "+w.cfg.What+"; the periodic resync still runs", "err", err, "retry_in", backoff)
				select {
				case <-ctx.Done():
					return
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, 10*time.Second)
			}
			backoff = 100 * time.Millisecond
			lost() // cover the gap before the new socket existed
		case <-ctx.Done():
			close(sub.stop)
			// Drain until the library's reader exits, so it never blocks
			// forever on a send nobody receives.
			for range sub.ch {
			}
			return
		}
	}
}
