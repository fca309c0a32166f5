package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/loomnet/loom/internal/netns"
)

// Request/response latency, the way netperf's TCP_RR and TCP_CRR measure it:
//
//	rr   one TCP connection; the client sends 1 byte, waits for the 1-byte
//	     answer, and sends the next: transactions per second.
//	crr  a new connection per transaction: connect, 1 byte each way, close;
//	     connections per second (the client closes first, like netperf).
//
// The server is a goroutine of this process whose listening socket was
// opened inside the server's namespace (netns.Listen). The client loop runs
// on one OS thread that has entered the client's namespace for the whole run
// (netns.Do), so every socket it opens is in that namespace and no
// namespace switch sits inside the timed loop. Both sides are Go, in one
// process, for the pod path and for its baseline alike; the ratio is what
// compares them.

// rrPort is where the request/response server listens.
const rrPort = 7790

// rrRun is one request/response measurement.
type rrRun struct {
	serverNS, clientNS string
	server             netip.Addr
	crr                bool
	duration           time.Duration
}

// runRR returns transactions (rr) or connections (crr) per second.
func runRR(ctx context.Context, r rrRun) (float64, error) {
	addr := netip.AddrPortFrom(r.server, rrPort).String()
	ln, err := netns.Listen(r.serverNS, "tcp", addr)
	if err != nil {
		return 0, fmt.Errorf("listen on %s in %s: %w", addr, r.serverNS, err)
	}
	srv := newEchoServer(ln)
	defer srv.close()
	if r.crr {
		// A closed connection leaves the client's port in TIME_WAIT for 60 s;
		// a few seconds of connections at thousands per second would use up
		// the 28,000 ephemeral ports. Reusing a TIME_WAIT port for a new
		// outgoing connection is safe with timestamps (the kernel default).
		if err := netns.WriteSysctl(r.clientNS, "net/ipv4/tcp_tw_reuse", "1"); err != nil {
			return 0, fmt.Errorf("allow TIME_WAIT reuse in %s: %w", r.clientNS, err)
		}
	}
	var rate float64
	err = netns.Do(r.clientNS, func() error {
		var err error
		if r.crr {
			rate, err = crrLoop(ctx, addr, r.duration)
		} else {
			rate, err = rrLoop(ctx, addr, r.duration)
		}
		return err
	})
	if err != nil {
		kind := "TCP_RR"
		if r.crr {
			kind = "TCP_CRR"
		}
		return 0, fmt.Errorf("%s from %s to %s: %w", kind, r.clientNS, addr, err)
	}
	return rate, nil
}

// rrLoop is the client of rr: warm up, then count transactions for d.
func rrLoop(ctx context.Context, addr string, d time.Duration) (float64, error) {
	dl := net.Dialer{Timeout: 5 * time.Second}
	c, err := dl.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(d + 30*time.Second)); err != nil {
		return 0, err
	}
	var b [1]byte
	txn := func() error {
		if _, err := c.Write(b[:]); err != nil {
			return err
		}
		_, err := io.ReadFull(c, b[:])
		return err
	}
	for range 200 { // warm-up: caches, the scheduler, the conntrack entry
		if err := txn(); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	end := start.Add(d)
	n := 0
	for {
		if err := txn(); err != nil {
			return 0, err
		}
		n++
		if n%256 == 0 {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			if time.Now().After(end) {
				break
			}
		}
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// crrLoop is the client of crr: warm up, then count connections for d.
func crrLoop(ctx context.Context, addr string, d time.Duration) (float64, error) {
	dl := net.Dialer{Timeout: 5 * time.Second}
	var b [1]byte
	conn := func() error {
		c, err := dl.DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
			return err
		}
		if _, err := c.Write(b[:]); err != nil {
			return err
		}
		_, err = io.ReadFull(c, b[:])
		return err
	}
	for range 20 {
		if err := conn(); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	end := start.Add(d)
	n := 0
	for {
		if err := conn(); err != nil {
			return 0, err
		}
		n++
		if n%16 == 0 {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			if time.Now().After(end) {
				break
			}
		}
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// echoServer answers every byte with one byte, on every connection, until
// closed.
type echoServer struct {
	ln net.Listener
	wg sync.WaitGroup

	mu    sync.Mutex // guards conns and done
	conns map[net.Conn]struct{}
	done  bool
}

func newEchoServer(ln net.Listener) *echoServer {
	s := &echoServer{ln: ln, conns: make(map[net.Conn]struct{})}
	s.wg.Go(s.accept)
	return s
}

func (s *echoServer) accept() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return // closed
		}
		s.mu.Lock()
		if s.done {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Go(func() {
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
			var b [1]byte
			for {
				if _, err := c.Read(b[:]); err != nil {
					return // EOF: the client is done
				}
				if _, err := c.Write(b[:]); err != nil {
					return
				}
			}
		})
	}
}

// close stops accepting, drops every open connection and waits for the
// server's goroutines.
func (s *echoServer) close() {
	s.ln.Close()
	s.mu.Lock()
	s.done = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}
