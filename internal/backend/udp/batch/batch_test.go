package batch

// Pure tests use endpoints 198.18.0.12:8285 (a) and 198.18.0.13:8285 (b).
// Kernel tests run in a namespace of their own (testnet), on loopback:
// a receiver on 127.0.0.1:8285 (or [::1]:8285), senders on other ports.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"golang.org/x/sys/unix"
)

var (
	epA = netip.MustParseAddrPort("198.18.0.12:8285")
	epB = netip.MustParseAddrPort("198.18.0.13:8285")
)

func TestPlan(t *testing.T) {
	type dg struct {
		ep   netip.AddrPort
		size int
	}
	repeat := func(ep netip.AddrPort, size, n int) []dg {
		var d []dg
		for range n {
			d = append(d, dg{ep, size})
		}
		return d
	}
	tests := []struct {
		name string
		dgs  []dg
		gso  bool
		v6   bool
		want []message
	}{{
		name: "equal sizes, one peer",
		dgs:  repeat(epA, 1400, 5),
		gso:  true,
		want: []message{{first: 0, n: 5, seg: 1400, bytes: 7000}},
	}, {
		name: "shorter last one joins, then ends the message",
		dgs:  append(repeat(epA, 1400, 3), dg{epA, 100}, dg{epA, 1400}),
		gso:  true,
		want: []message{{first: 0, n: 4, seg: 1400, bytes: 4300}, {first: 4, n: 1, bytes: 1400}},
	}, {
		name: "a larger one starts a new message",
		dgs:  []dg{{epA, 100}, {epA, 1400}, {epA, 1400}},
		gso:  true,
		want: []message{{first: 0, n: 1, bytes: 100}, {first: 1, n: 2, seg: 1400, bytes: 2800}},
	}, {
		name: "another peer starts a new message",
		dgs:  []dg{{epA, 1400}, {epB, 1400}, {epB, 1400}, {epA, 1400}},
		gso:  true,
		want: []message{{first: 0, n: 1, bytes: 1400}, {first: 1, n: 2, seg: 1400, bytes: 2800}, {first: 3, n: 1, bytes: 1400}},
	}, {
		name: "at most 64 datagrams",
		dgs:  repeat(epA, 100, 65),
		gso:  true,
		want: []message{{first: 0, n: 64, seg: 100, bytes: 6400}, {first: 64, n: 1, bytes: 100}},
	}, {
		name: "at most one IPv4 packet of payload",
		dgs:  repeat(epA, 1472, 45), // 44 fit in 65507 bytes
		gso:  true,
		want: []message{{first: 0, n: 44, seg: 1472, bytes: 44 * 1472}, {first: 44, n: 1, bytes: 1472}},
	}, {
		name: "IPv6 allows 20 bytes more",
		dgs:  repeat(epA, 65527/2, 2),
		gso:  true,
		v6:   true,
		want: []message{{first: 0, n: 2, seg: 65527 / 2, bytes: 65526}},
	}, {
		name: "without GSO, one datagram per message",
		dgs:  repeat(epA, 1400, 3),
		want: []message{{first: 0, n: 1, bytes: 1400}, {first: 1, n: 1, bytes: 1400}, {first: 2, n: 1, bytes: 1400}},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w := NewWriter(len(tc.dgs))
			for _, d := range tc.dgs {
				if !w.Add(d.ep, make([]byte, d.size)) {
					t.Fatal("Add refused a datagram below capacity")
				}
			}
			if w.Add(epA, []byte{1}) {
				t.Error("Add accepted a datagram beyond capacity")
			}
			w.plan(0, tc.gso, tc.v6)
			if fmt.Sprint(w.msgs) != fmt.Sprint(tc.want) {
				t.Errorf("messages\n%v\nwant\n%v", w.msgs, tc.want)
			}
		})
	}
}

func TestSplit(t *testing.T) {
	data := bytes.Repeat([]byte("abcdefghij"), 10) // 100 bytes
	for _, tc := range []struct {
		seg  int
		want []int
	}{
		{seg: 0, want: []int{100}},
		{seg: 100, want: []int{100}},
		{seg: 200, want: []int{100}},
		{seg: 30, want: []int{30, 30, 30, 10}},
		{seg: 25, want: []int{25, 25, 25, 25}},
	} {
		var sizes []int
		total := 0
		for _, p := range split(nil, data, tc.seg) {
			sizes = append(sizes, len(p))
			if !bytes.Equal(p, data[total:total+len(p)]) {
				t.Errorf("seg %d: datagram at %d has the wrong bytes", tc.seg, total)
			}
			if cap(p) != len(p) {
				t.Errorf("seg %d: datagram at %d can grow into the next", tc.seg, total)
			}
			total += len(p)
		}
		if fmt.Sprint(sizes) != fmt.Sprint(tc.want) {
			t.Errorf("seg %d: sizes %v, want %v", tc.seg, sizes, tc.want)
		}
	}
	if got := split(nil, nil, 10); len(got) != 0 {
		t.Errorf("empty datagram split into %d", len(got))
	}
}

func TestGROSize(t *testing.T) {
	msg := func(level, typ int32, data []byte) []byte {
		b := make([]byte, unix.CmsgSpace(len(data)))
		h := (*unix.Cmsghdr)(unsafePointer(b))
		h.Level, h.Type = level, typ
		h.SetLen(unix.CmsgLen(len(data)))
		copy(b[unix.CmsgLen(0):], data)
		return b
	}
	four := make([]byte, 4)
	binary.NativeEndian.PutUint32(four, 1448)
	other := msg(unix.SOL_IP, unix.IP_TOS, []byte{0})
	for _, tc := range []struct {
		name string
		ctrl []byte
		want int
	}{
		{"none", nil, 0},
		{"UDP_GRO", msg(unix.SOL_UDP, unix.UDP_GRO, four), 1448},
		{"after another message", append(other, msg(unix.SOL_UDP, unix.UDP_GRO, four)...), 1448},
		{"only another message", other, 0},
		{"truncated", msg(unix.SOL_UDP, unix.UDP_GRO, four)[:10], 0},
	} {
		if got := groSize(tc.ctrl); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}

// listenIn opens a Conn inside n.
func listenIn(t *testing.T, n ns.NetNS, cfg Config) *Conn {
	t.Helper()
	var c *Conn
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = Listen(cfg)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Datagrams of mixed sizes to one receiver arrive whole, in order, one per
// Write call's queued packet, with and without offloads; with them, the
// trains travel as GSO messages and GRO buffers.
func TestLoopback(t *testing.T) {
	for _, tc := range []struct {
		name    string
		offload bool
		lo      string
	}{
		{name: "offload", offload: true, lo: "127.0.0.1"},
		{name: "plain", offload: false, lo: "127.0.0.1"},
		{name: "offload IPv6", offload: true, lo: "::1"},
		{name: "plain IPv6", offload: false, lo: "::1"},
	} {
		offload := tc.offload
		ap := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr(tc.lo), port) }
		t.Run(tc.name, func(t *testing.T) {
			nstest.NoLeaks(t)
			n, _ := nstest.NewNode(t, "batch")
			rx := listenIn(t, n, Config{Addr: ap(8285), ReusePort: true, Offload: offload, Buffer: 4 << 20})
			tx := listenIn(t, n, Config{Addr: ap(9000), Offload: offload})
			if tx.GSO() != offload || rx.GRO() != offload {
				t.Fatalf("offloads: GSO %v, GRO %v; want %v", tx.GSO(), rx.GRO(), offload)
			}
			// A second socket can share the receiver's port (SO_REUSEPORT);
			// closed again, so the datagrams below all go to rx.
			listenIn(t, n, Config{Addr: ap(8285), ReusePort: true}).Close()
			rx.c.SetReadDeadline(time.Now().Add(5 * time.Second))

			var sent [][]byte
			w := NewWriter(256)
			for i := range 200 {
				size := 1400
				switch {
				case i%50 == 49:
					size = 300 // ends a train
				case i%70 == 69:
					size = 1472
				}
				p := make([]byte, size)
				binary.BigEndian.PutUint32(p, uint32(i))
				for j := 4; j < size; j++ {
					p[j] = byte(i + j)
				}
				sent = append(sent, p)
				w.Add(rx.LocalAddr(), p)
			}
			m, bytesSent, err := tx.Write(w)
			if err != nil || m != len(sent) {
				t.Fatalf("Write: %d datagrams, %v", m, err)
			}
			total := 0
			for _, p := range sent {
				total += len(p)
			}
			if bytesSent != total {
				t.Errorf("Write: %d bytes, want %d", bytesSent, total)
			}

			r := NewReader(8, 1<<16)
			var got [][]byte
			calls := 0
			for len(got) < len(sent) {
				pkts, err := rx.Read(r)
				if err != nil {
					t.Fatal(err)
				}
				calls++
				for _, p := range pkts {
					got = append(got, bytes.Clone(p))
				}
			}
			if len(got) != len(sent) {
				t.Fatalf("received %d datagrams, want %d", len(got), len(sent))
			}
			for i := range sent {
				if !bytes.Equal(got[i], sent[i]) {
					t.Fatalf("datagram %d differs (len %d, want %d)", i, len(got[i]), len(sent[i]))
				}
			}
			t.Logf("%d datagrams in %d reads", len(got), calls)
			if offload && calls > 20 {
				t.Errorf("%d reads for %d datagrams: GRO did not coalesce", calls, len(got))
			}

			// Close wakes a blocked Read with os.ErrClosed.
			rx.c.SetReadDeadline(time.Time{})
			done := make(chan error, 1)
			go func() {
				_, err := rx.Read(r)
				done <- err
			}()
			time.Sleep(20 * time.Millisecond)
			rx.Close()
			select {
			case err := <-done:
				if !errors.Is(err, os.ErrClosed) {
					t.Errorf("Read after Close: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Read still blocked after Close")
			}
		})
	}
}

// Datagrams too big for a slot are dropped and counted, not cut.
func TestTruncated(t *testing.T) {
	n, _ := nstest.NewNode(t, "batch")
	rx := listenIn(t, n, Config{Addr: netip.MustParseAddrPort("127.0.0.1:8285")})
	tx := listenIn(t, n, Config{Addr: netip.MustParseAddrPort("127.0.0.1:9000")})
	w := NewWriter(2)
	w.Add(rx.LocalAddr(), make([]byte, 3000))
	w.Add(rx.LocalAddr(), []byte("small"))
	if m, _, err := tx.Write(w); err != nil || m != 2 {
		t.Fatalf("Write: %d, %v", m, err)
	}
	r := NewReader(4, 2048)
	var got []string
	for len(got) == 0 {
		pkts, err := rx.Read(r)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pkts {
			got = append(got, string(p))
		}
	}
	if len(got) != 1 || got[0] != "small" || r.Truncated != 1 {
		t.Errorf("got %q, truncated %d; want only \"small\" and 1 truncated", got, r.Truncated)
	}
}

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }
