package probe

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// Address plan: loopback only.

func TestTCPAndUDPReportSource(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go ServeTCP(ln)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go ServeUDP(pc)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Bind the client to 127.0.0.2 so "the address the server saw" is not
	// trivially the server's own.
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	seen, err := TCP(ctx, d, netip.MustParseAddrPort(ln.Addr().String()))
	if err != nil {
		t.Fatal(err)
	}
	if seen.Addr() != netip.MustParseAddr("127.0.0.2") {
		t.Errorf("tcp: server saw %s, want 127.0.0.2", seen)
	}
	ud := &net.Dialer{LocalAddr: &net.UDPAddr{IP: net.ParseIP("127.0.0.3")}}
	seen, err = UDP(ctx, ud, netip.MustParseAddrPort(pc.LocalAddr().String()))
	if err != nil {
		t.Fatal(err)
	}
	if seen.Addr() != netip.MustParseAddr("127.0.0.3") {
		t.Errorf("udp: server saw %s, want 127.0.0.3", seen)
	}
}

func TestTCPRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := TCP(ctx, &net.Dialer{}, addr); err == nil {
		t.Fatal("probe to a closed port succeeded")
	}
}

func TestParseSeenRejectsOtherToken(t *testing.T) {
	if _, err := parseSeen("seen 10.244.1.2:5000 abc", "def"); err == nil {
		t.Fatal("accepted an answer to another question")
	}
	if _, err := parseSeen("garbage", "def"); err == nil {
		t.Fatal("accepted garbage")
	}
}
