// Package batch is the UDP socket of the udp backend, read and written many
// datagrams per system call.
//
// Design notes.
//
// What it owns: UDP sockets bound to one address and port (flannel's
// <PublicIP>:8285), several of them with SO_REUSEPORT so several goroutines
// can receive at once (the kernel spreads datagrams over the sockets by
// 4-tuple hash: across peers, not within one peer's stream).
//
// Batching: Read is one recvmmsg(2) for up to a Reader's slots; Write is
// one sendmmsg(2) for everything a Writer has queued. With UDP GSO
// (UDP_SEGMENT, Linux 4.18) consecutive datagrams to one peer whose sizes
// are equal (the last may be shorter) go out as one message: one trip
// through the socket layer and the stack for up to 64 datagrams, cut by
// the kernel (or the NIC) at the last moment. With UDP GRO (UDP_GRO, Linux
// 5.0) the kernel hands up such a train of datagrams as one buffer and the
// segment size; Read cuts it back into datagrams. Either is detected when
// the socket is opened and otherwise falls back to one datagram per
// message. Every datagram remains exactly one inner packet on the wire:
// GSO and GRO change how many datagrams cross the system-call boundary at
// once, never what a peer receives.
//
// Buffers: a Reader or Writer holds all the memory of one goroutine
// (message headers, iovecs, addresses, control messages, receive slots),
// allocated once. Writer sends straight from the caller's buffers.
//
// Kernel quirks, handled where they bite:
//   - UDP_SEGMENT needs TX checksum offload on the egress device; without it
//     sendmsg fails with EIO. Write then turns GSO off for the socket, logs
//     it once, and resends the batch datagram by datagram.
//   - A GSO message whose segments exceed the path MTU fails (EMSGSIZE;
//     EINVAL on older kernels) where a plain datagram would be fragmented:
//     such a message is resent datagram by datagram, and that logged once.
package batch

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Limits of one GSO message.
const (
	// maxSegments is the kernel's UDP_MAX_SEGMENTS on the kernels we
	// support (raised to 128 only in Linux 6.x).
	maxSegments = 64
	// maxGSOBytes4 and maxGSOBytes6 bound the payload of one GSO message:
	// it must fit one IPv4 packet (64 KiB less the IP and UDP headers), or
	// one UDP length field over IPv6.
	maxGSOBytes4 = 65535 - 20 - 8
	maxGSOBytes6 = 65535 - 8
)

// Config says how to open a Conn.
type Config struct {
	// Addr is the local address and port to bind.
	Addr netip.AddrPort
	// ReusePort sets SO_REUSEPORT, so several Conns can share Addr.
	ReusePort bool
	// Offload turns on UDP GSO and GRO where the kernel supports them.
	Offload bool
	// Buffer is the send and receive buffer size to ask for (forced past
	// net.core.[rw]mem_max when the process may); 0 leaves the defaults.
	Buffer int
	// Logger receives the one-time notice that GSO was turned off; nil
	// means slog.Default().
	Logger *slog.Logger
}

// Conn is one UDP socket. Read must be called from one goroutine at a
// time; Write from any.
type Conn struct {
	c   *net.UDPConn
	rc  syscall.RawConn
	v6  bool
	gro bool
	gso atomic.Bool // cleared for good when the kernel refuses GSO (EIO)
	log *slog.Logger
	// resent is set once a GSO message has been resent datagram by
	// datagram for another reason (over the path MTU), so that is logged
	// once.
	resent atomic.Bool
}

// Listen opens a Conn in the calling thread's network namespace (a socket
// belongs to the namespace it was created in; run Listen inside it).
func Listen(cfg Config) (*Conn, error) {
	if !cfg.Addr.IsValid() {
		return nil, fmt.Errorf("batch: invalid bind address %v", cfg.Addr)
	}
	addr := netip.AddrPortFrom(cfg.Addr.Addr().Unmap(), cfg.Addr.Port())
	network := "udp4"
	if addr.Addr().Is6() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		cerr := rc.Control(func(fd uintptr) {
			if cfg.ReusePort {
				err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}
			if err == nil && cfg.Buffer > 0 {
				setBuffer(int(fd), unix.SO_RCVBUFFORCE, unix.SO_RCVBUF, cfg.Buffer)
				setBuffer(int(fd), unix.SO_SNDBUFFORCE, unix.SO_SNDBUF, cfg.Buffer)
			}
		})
		return errors.Join(cerr, err)
	}}
	pc, err := lc.ListenPacket(context.Background(), network, addr.String())
	if err != nil {
		return nil, fmt.Errorf("batch: listen on %s: %w", addr, err)
	}
	c := &Conn{c: pc.(*net.UDPConn), v6: addr.Addr().Is6(), log: cfg.Logger}
	if c.log == nil {
		c.log = slog.Default()
	}
	if c.rc, err = c.c.SyscallConn(); err != nil {
		c.c.Close()
		return nil, fmt.Errorf("batch: %w", err)
	}
	if cfg.Offload {
		err := c.rc.Control(func(fd uintptr) {
			// Reading UDP_SEGMENT succeeds where the kernel knows it.
			_, gsoErr := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
			c.gso.Store(gsoErr == nil)
			c.gro = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
		})
		if err != nil {
			c.c.Close()
			return nil, fmt.Errorf("batch: %w", err)
		}
	}
	return c, nil
}

func setBuffer(fd, force, plain, size int) {
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, force, size) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, plain, size) // best effort: capped by [rw]mem_max
	}
}

// GSO reports whether sends use UDP GSO.
func (c *Conn) GSO() bool { return c.gso.Load() }

// GRO reports whether receives use UDP GRO.
func (c *Conn) GRO() bool { return c.gro }

// LocalAddr is the bound address.
func (c *Conn) LocalAddr() netip.AddrPort { return c.c.LocalAddr().(*net.UDPAddr).AddrPort() }

// Close closes the socket; a blocked Read returns os.ErrClosed.
func (c *Conn) Close() error { return c.c.Close() }

func (c *Conn) disableGSO(err error) {
	if c.gso.CompareAndSwap(true, false) {
		c.log.Warn("UDP GSO turned off: the kernel refused a segmented send (the underlay device lacks TX checksum offload?); "+
			"sending datagram by datagram", "socket", c.LocalAddr(), "err", err)
	}
}

func classify(op string, err error) error {
	if errors.Is(err, os.ErrClosed) || errors.Is(err, net.ErrClosed) {
		return os.ErrClosed
	}
	return fmt.Errorf("batch: %s: %w", op, err)
}

// Reader is the memory of one receiving goroutine. Packets a Read returns
// are valid until the next Read.
type Reader struct {
	slots [][]byte
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	ctrl  []byte // ctrlLen bytes per slot
	pkts  [][]byte

	// Truncated counts datagrams dropped because they were larger than a
	// slot, since the Reader was made.
	Truncated uint64
}

// ctrlLen is the control buffer of one slot: room for UDP_GRO's int.
const ctrlLen = 64

// NewReader returns a Reader with slots receive buffers of slotSize bytes.
// With GRO a slot holds a train of datagrams: give it 64 KiB.
func NewReader(slots, slotSize int) *Reader {
	r := &Reader{
		slots: make([][]byte, slots),
		hdrs:  make([]unix.Mmsghdr, slots),
		iovs:  make([]unix.Iovec, slots),
		ctrl:  make([]byte, slots*ctrlLen),
		pkts:  make([][]byte, 0, slots*maxSegments),
	}
	arena := make([]byte, slots*slotSize)
	for i := range r.slots {
		r.slots[i] = arena[i*slotSize : (i+1)*slotSize : (i+1)*slotSize]
		r.iovs[i] = unix.Iovec{Base: &r.slots[i][0]}
		r.iovs[i].SetLen(slotSize)
	}
	return r
}

// Read receives the next batch of datagrams, at least one, as many as are
// queued, and returns their payloads. It blocks until one arrives or the
// Conn is closed (os.ErrClosed).
func (c *Conn) Read(r *Reader) ([][]byte, error) {
	for i := range r.hdrs {
		h := &r.hdrs[i]
		*h = unix.Mmsghdr{}
		h.Hdr.Iov = &r.iovs[i]
		h.Hdr.SetIovlen(1)
		if c.gro {
			h.Hdr.Control = &r.ctrl[i*ctrlLen]
			h.Hdr.SetControllen(ctrlLen)
		}
	}
	var n int
	var rerr error
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			r0, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(len(r.hdrs)), 0, 0, 0)
			switch errno {
			case 0:
				n = int(r0)
				return true
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			default:
				rerr = errno
				return true
			}
		}
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return nil, classify("recvmmsg", err)
	}
	r.pkts = r.pkts[:0]
	for i := range n {
		h := &r.hdrs[i]
		if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
			r.Truncated++
			continue
		}
		data := r.slots[i][:h.Len]
		seg := 0
		if c.gro {
			seg = groSize(r.ctrl[i*ctrlLen : i*ctrlLen+int(h.Hdr.Controllen)])
		}
		r.pkts = split(r.pkts, data, seg)
	}
	return r.pkts, nil
}

// groSize finds UDP_GRO's segment size in a control buffer; 0 when absent.
func groSize(ctrl []byte) int {
	for len(ctrl) >= unix.SizeofCmsghdr {
		h, data, rest, err := unix.ParseOneSocketControlMessage(ctrl)
		if err != nil {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO {
			switch {
			case len(data) >= 4:
				return int(binary.NativeEndian.Uint32(data))
			case len(data) >= 2:
				return int(binary.NativeEndian.Uint16(data))
			}
		}
		ctrl = rest
	}
	return 0
}

// split appends the datagrams of a GRO train (segments of seg bytes, the
// last possibly shorter) to pkts; seg 0 means one datagram.
func split(pkts [][]byte, data []byte, seg int) [][]byte {
	if len(data) == 0 {
		return pkts
	}
	if seg <= 0 || seg >= len(data) {
		return append(pkts, data)
	}
	for len(data) > 0 {
		n := min(seg, len(data))
		pkts = append(pkts, data[:n:n])
		data = data[n:]
	}
	return pkts
}

// Writer is the memory of one sending goroutine: the datagrams queued by
// Add, and the message headers Write builds from them.
type Writer struct {
	eps   []netip.AddrPort
	iovs  []unix.Iovec // one per datagram, pointing at the caller's buffer
	msgs  []message
	hdrs  []unix.Mmsghdr
	names []unix.RawSockaddrInet6 // one per message; IPv4 ones use its first 16 bytes
	ctrl  []byte                  // ctrlGSOLen bytes per message
}

// ctrlGSOLen is the space of one UDP_SEGMENT control message (a uint16).
var ctrlGSOLen = unix.CmsgSpace(2)

// message is a run of queued datagrams sent as one message: one datagram,
// or a GSO train of n datagrams of seg bytes (the last possibly shorter).
type message struct {
	first, n int
	seg      int // 0: no UDP_SEGMENT
	bytes    int
}

// NewWriter returns a Writer for up to maxPackets datagrams per Write.
func NewWriter(maxPackets int) *Writer {
	return &Writer{
		eps:   make([]netip.AddrPort, 0, maxPackets),
		iovs:  make([]unix.Iovec, 0, maxPackets),
		msgs:  make([]message, 0, maxPackets),
		hdrs:  make([]unix.Mmsghdr, maxPackets),
		names: make([]unix.RawSockaddrInet6, maxPackets),
		ctrl:  make([]byte, maxPackets*ctrlGSOLen),
	}
}

// Add queues pkt (not copied: it must stay untouched until Write returns)
// for ep. It reports false, queuing nothing, when the Writer is full.
func (w *Writer) Add(ep netip.AddrPort, pkt []byte) bool {
	if len(w.eps) == cap(w.eps) || len(pkt) == 0 {
		return false
	}
	w.eps = append(w.eps, ep)
	iov := unix.Iovec{Base: &pkt[0]}
	iov.SetLen(len(pkt))
	w.iovs = append(w.iovs, iov)
	return true
}

// Len is the number of queued datagrams.
func (w *Writer) Len() int { return len(w.eps) }

// Reset drops the queued datagrams.
func (w *Writer) Reset() {
	w.eps, w.iovs, w.msgs = w.eps[:0], w.iovs[:0], w.msgs[:0]
}

// plan groups the datagrams from index from on into messages: with gso,
// consecutive datagrams to one endpoint whose sizes are equal (a shorter
// one ends the message) within the kernel's limits.
func (w *Writer) plan(from int, gso, v6 bool) {
	w.msgs = w.msgs[:0]
	maxBytes := maxGSOBytes4
	if v6 {
		maxBytes = maxGSOBytes6
	}
	var cur message
	short := false
	for i := from; i < len(w.eps); i++ {
		size := int(w.iovs[i].Len)
		if gso && cur.n > 0 && w.eps[i] == w.eps[cur.first] && !short &&
			size <= cur.seg && cur.n < maxSegments && cur.bytes+size <= maxBytes {
			cur.n++
			cur.bytes += size
			short = size < cur.seg
			continue
		}
		if cur.n > 0 {
			w.msgs = append(w.msgs, cur)
		}
		cur, short = message{first: i, n: 1, seg: size, bytes: size}, false
	}
	if cur.n > 0 {
		w.msgs = append(w.msgs, cur)
	}
	for i := range w.msgs {
		if w.msgs[i].n == 1 {
			w.msgs[i].seg = 0
		}
	}
}

// header fills the kernel's header of message k.
func (w *Writer) header(k int, v6 bool) {
	m := w.msgs[k]
	h := &w.hdrs[k]
	*h = unix.Mmsghdr{}
	ep := w.eps[m.first]
	sa := &w.names[k]
	if v6 {
		*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: ep.Addr().As16()}
		putPort(&sa.Port, ep.Port())
		h.Hdr.Namelen = unix.SizeofSockaddrInet6
	} else {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: ep.Addr().Unmap().As4()}
		putPort(&sa4.Port, ep.Port())
		h.Hdr.Namelen = unix.SizeofSockaddrInet4
	}
	h.Hdr.Name = (*byte)(unsafe.Pointer(sa))
	h.Hdr.Iov = &w.iovs[m.first]
	h.Hdr.SetIovlen(m.n)
	if m.seg > 0 {
		c := w.ctrl[k*ctrlGSOLen : (k+1)*ctrlGSOLen]
		ch := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
		ch.Level = unix.SOL_UDP
		ch.Type = unix.UDP_SEGMENT
		ch.SetLen(unix.CmsgLen(2))
		binary.NativeEndian.PutUint16(c[unix.CmsgLen(0):], uint16(m.seg))
		h.Hdr.Control = &c[0]
		h.Hdr.SetControllen(len(c))
	}
}

// putPort stores port in network byte order in a sockaddr's port field.
func putPort(field *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(field))
	binary.BigEndian.PutUint16(b[:], port)
}

// Write sends every queued datagram and resets w. It returns how many
// datagrams, and bytes of payload, were sent; a datagram the kernel refuses
// is skipped, and the last such error is returned with the counts.
// os.ErrClosed means the Conn was closed.
func (c *Conn) Write(w *Writer) (sent, bytes int, err error) {
	defer w.Reset()
	if len(w.eps) == 0 {
		return 0, 0, nil
	}
	w.plan(0, c.gso.Load(), c.v6)
	for k := range w.msgs {
		w.header(k, c.v6)
	}
	next := 0
	var lastErr error
	werr := c.rc.Write(func(fd uintptr) bool {
		for next < len(w.msgs) {
			r0, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&w.hdrs[next])), uintptr(len(w.msgs)-next), 0, 0, 0)
			switch {
			case errno == 0 && r0 == 0: // cannot happen; never spin on it
				errno = unix.EIO
			case errno == 0:
				for _, m := range w.msgs[next : next+int(r0)] {
					sent += m.n
					bytes += m.bytes
				}
				next += int(r0)
				continue
			case errno == unix.EINTR:
				continue
			case errno == unix.EAGAIN:
				return false // wait until writable
			}
			m := w.msgs[next]
			if m.seg > 0 {
				// Resend the rest datagram by datagram (see the notes).
				if errno == unix.EIO {
					c.disableGSO(errno)
				} else if c.resent.CompareAndSwap(false, true) {
					c.log.Warn("the kernel refused a segmented UDP send; resending datagram by datagram "+
						"(datagrams larger than the path MTU? check the MTU of the underlay and of flannel0)",
						"socket", c.LocalAddr(), "to", w.eps[m.first], "size", m.seg, "err", errno)
				}
				w.plan(m.first, false, c.v6)
				for k := range w.msgs {
					w.header(k, c.v6)
				}
				next = 0
				continue
			}
			lastErr = errno
			next++
		}
		return true
	})
	if werr != nil {
		return sent, bytes, classify("sendmmsg", werr)
	}
	if lastErr != nil {
		return sent, bytes, classify("sendmmsg", lastErr)
	}
	return sent, bytes, nil
}
