// Package probe is loom's connectivity probe: a TCP and UDP echo that answers
// every caller with the address it saw the caller come from. The lab's
// connectivity matrix is built on it, so a check can tell "reachable" from
// "reachable but NATed", without relying on ping or curl being installed.
//
// Wire format: the client sends one line "loom-probe <token>\n" (TCP) or one
// datagram "loom-probe <token>" (UDP); the server answers "seen <addr:port>
// <token>". The token ties an answer to its question so a stale UDP reply is
// never taken for a fresh one.
package probe

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"
)

const hello = "loom-probe"

// ServeTCP answers every connection accepted on ln until ln is closed.
func ServeTCP(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("probe accept: %w", err)
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(io1k{c}).ReadString('\n')
			if err != nil {
				return
			}
			token, ok := parseHello(strings.TrimSuffix(line, "\n"))
			if !ok {
				return
			}
			fmt.Fprintf(c, "seen %s %s\n", c.RemoteAddr(), token)
		}()
	}
}

// io1k caps what a caller can make the server buffer.
type io1k struct{ c net.Conn }

func (r io1k) Read(p []byte) (int, error) {
	if len(p) > 1024 {
		p = p[:1024]
	}
	return r.c.Read(p)
}

// ServeUDP answers every datagram on pc until pc is closed.
func ServeUDP(pc net.PacketConn) error {
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("probe read: %w", err)
		}
		token, ok := parseHello(string(buf[:n]))
		if !ok {
			continue
		}
		_, _ = pc.WriteTo(fmt.Appendf(nil, "seen %s %s", from, token), from)
	}
}

func parseHello(s string) (string, bool) {
	token, ok := strings.CutPrefix(s, hello+" ")
	return token, ok && token != "" && !strings.ContainsAny(token, " \n")
}

func newToken() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func parseSeen(reply, token string) (netip.AddrPort, error) {
	fields := strings.Fields(reply)
	if len(fields) != 3 || fields[0] != "seen" {
		return netip.AddrPort{}, fmt.Errorf("probe reply %q is not \"seen ADDR TOKEN\"", reply)
	}
	if fields[2] != token {
		return netip.AddrPort{}, fmt.Errorf("probe reply for another question (token %s, want %s)", fields[2], token)
	}
	ap, err := netip.ParseAddrPort(fields[1])
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("probe reply address %q: %w", fields[1], err)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// Dialer opens sockets; net.Dialer satisfies it. Callers that must dial from
// another network namespace pass a dialer whose sockets are created there.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// TCP connects to addr and returns the source address the server saw.
func TCP(ctx context.Context, d Dialer, addr netip.AddrPort) (netip.AddrPort, error) {
	c, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("probe tcp %s: %w", addr, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	token := newToken()
	if _, err := fmt.Fprintf(c, "%s %s\n", hello, token); err != nil {
		return netip.AddrPort{}, fmt.Errorf("probe tcp %s: %w", addr, err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("probe tcp %s: read reply: %w", addr, err)
	}
	return parseSeen(strings.TrimSuffix(line, "\n"), token)
}

// UDP sends a datagram to addr, resending every 200 ms until an answer comes
// back or ctx ends, and returns the source address the server saw.
func UDP(ctx context.Context, d Dialer, addr netip.AddrPort) (netip.AddrPort, error) {
	c, err := d.DialContext(ctx, "udp", addr.String())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("probe udp %s: %w", addr, err)
	}
	defer c.Close()
	token := newToken()
	msg := []byte(hello + " " + token)
	buf := make([]byte, 1500)
	for {
		if _, err := c.Write(msg); err != nil {
			return netip.AddrPort{}, fmt.Errorf("probe udp %s: %w", addr, err)
		}
		wait := time.Now().Add(200 * time.Millisecond)
		if dl, ok := ctx.Deadline(); ok && dl.Before(wait) {
			wait = dl
		}
		_ = c.SetReadDeadline(wait)
		for {
			n, err := c.Read(buf)
			if err != nil {
				break // timeout or ICMP error: resend (unless ctx is over)
			}
			if seen, err := parseSeen(string(buf[:n]), token); err == nil {
				return seen, nil
			}
		}
		if err := ctx.Err(); err != nil {
			return netip.AddrPort{}, fmt.Errorf("probe udp %s: no answer: %w", addr, err)
		}
	}
}
