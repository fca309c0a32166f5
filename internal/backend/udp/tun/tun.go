// Package tun is the TUN device of the udp backend: a layer-3 device
// (IFF_TUN|IFF_NO_PI) whose packets are read and written by the process
// that holds it open, in batches and with the kernel's offloads.
//
// Design notes.
//
// What it owns: one TUN device, opened as Queues file descriptors
// (IFF_MULTI_QUEUE), each read by one goroutine. The kernel spreads the
// packets it sends to the device over the queues by flow hash, so two
// cores read two flows at once; any queue may be written. The device is
// persistent (TUNSETPERSIST): when the process exits, the device, its
// addresses and its routes stay, and a restarted process attaches to it
// again by name, so the data path comes back without the kernel state
// being rebuilt.
//
// Offloads: with Config.Offload the device is opened with IFF_VNET_HDR and
// TUNSETOFFLOAD(TUN_F_CSUM|TUN_F_TSO4|TUN_F_TSO6). The kernel then hands us
// TCP super-packets of up to 64 KiB (one read instead of forty) and leaves
// checksums to us; Read cuts them into MSS-sized packets with correct
// checksums (offload.go), because every packet on the udp backend's wire
// must be a plain IP packet. Write merges runs of one flow's consecutive
// TCP segments back into one GSO frame (user-space GRO), so the kernel
// forwards one 64 KiB packet to the pod instead of forty. When the kernel
// refuses the offloads, the device is opened without IFF_VNET_HDR and every
// read and write is one plain packet: Offload reports which.
//
// Batching: a TUN has no recvmmsg. Read drains a queue without blocking
// until its batch is full or the queue is empty, so one wake-up serves a
// burst; with offloads one read is already up to 64 KiB. Write issues one
// writev per frame.
//
// Buffers: a Reader or Writer holds all the memory one goroutine needs,
// allocated once; nothing is allocated per packet. Callers pool them.
//
// Kernel quirks, each handled where it bites:
//   - In the forwarding path the kernel may report hdr_len as the length of
//     the whole first segment; the headers are measured from the packet.
//   - When the device is deleted (ip link del), its file descriptors stay
//     open but detached: reads and writes fail with EBADFD. Gone reports it.
//   - The IFF_VNET_HDR and multi-queue flags of a persistent device are the
//     last attacher's: all queues of one Device use the same flags, and a
//     device made by someone else without IFF_MULTI_QUEUE (flanneld's) is
//     refused with EINVAL, which Open explains.
package tun

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Config says which device to open and how.
type Config struct {
	// Name is the device name, e.g. "flannel0".
	Name string
	// Queues is the number of file descriptors (queues) to open; 0 means 1.
	Queues int
	// Offload asks for IFF_VNET_HDR with TSO and checksum offload; Open
	// falls back to plain packets when the kernel refuses.
	Offload bool
}

// Device is one TUN device held open by this process.
type Device struct {
	name    string
	offload bool
	queues  []*Queue
}

// Queue is one file descriptor of the device. Reads of one Queue must come
// from one goroutine at a time; writes may come from any.
type Queue struct {
	f       *os.File
	rc      syscall.RawConn
	offload bool
	// closed is set before f is closed: the RawConn of an os.File reports
	// a closed file with an internal error value, not os.ErrClosed.
	closed atomic.Bool
}

// Open creates the device, or attaches to an existing persistent one of
// that name, in the calling thread's network namespace (run it inside the
// namespace: a TUN is created in the namespace of the thread that opens
// /dev/net/tun). The device is made persistent.
func Open(cfg Config) (*Device, error) {
	if cfg.Queues <= 0 {
		cfg.Queues = 1
	}
	if len(cfg.Name) == 0 || len(cfg.Name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tun: device name %q must have 1 to %d characters", cfg.Name, unix.IFNAMSIZ-1)
	}
	d := &Device{name: cfg.Name}
	flags := uint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_MULTI_QUEUE)

	first, err := openQueue(cfg.Name, flags|vnetFlag(cfg.Offload))
	if err != nil {
		return nil, err
	}
	if cfg.Offload {
		err := first.control(func(fd int) error {
			return unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6)
		})
		if err != nil {
			// No offloads: reattach without the virtio header.
			first.f.Close()
			if first, err = openQueue(cfg.Name, flags); err != nil {
				return nil, err
			}
		} else {
			d.offload = true
			first.offload = true
		}
	}
	d.queues = append(d.queues, first)
	if err := first.control(func(fd int) error { return unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1) }); err != nil {
		d.Close()
		return nil, fmt.Errorf("tun: make %s persistent: %w", cfg.Name, err)
	}
	for range cfg.Queues - 1 {
		q, err := openQueue(cfg.Name, flags|vnetFlag(d.offload))
		if err != nil {
			d.Close()
			return nil, err
		}
		q.offload = d.offload
		d.queues = append(d.queues, q)
	}
	return d, nil
}

func vnetFlag(on bool) uint16 {
	if on {
		return unix.IFF_VNET_HDR
	}
	return 0
}

func openQueue(name string, flags uint16) (*Queue, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("tun: open /dev/net/tun: %w (load the tun module: modprobe tun)", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun: %w", err)
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("tun: attach to %s: %w: a device of that name exists that is not a multi-queue TUN or is in use "+
				"(flanneld's?): stop its owner, or delete it with `ip link del %s`", name, err, name)
		}
		return nil, fmt.Errorf("tun: create %s: %w", name, err)
	}
	// The descriptor is non-blocking, so os.NewFile registers it with the
	// runtime's poller and reads park the goroutine, not the thread.
	f := os.NewFile(uintptr(fd), "/dev/net/tun:"+name)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("tun: %w", err)
	}
	return &Queue{f: f, rc: rc}, nil
}

// control runs fn with the queue's descriptor.
func (q *Queue) control(fn func(fd int) error) error {
	var err error
	if cerr := q.rc.Control(func(fd uintptr) { err = fn(int(fd)) }); cerr != nil {
		return cerr
	}
	return err
}

// Name is the device's name.
func (d *Device) Name() string { return d.name }

// Offload reports whether the device runs with the virtio header (TSO and
// checksum offload, user-space segmentation and GRO).
func (d *Device) Offload() bool { return d.offload }

// Queues returns the device's queues.
func (d *Device) Queues() []*Queue { return d.queues }

// Gone reports whether the device was deleted under us: its descriptors
// are then detached (EBADFD) and a new device must be opened.
func (d *Device) Gone() bool {
	if len(d.queues) == 0 {
		return true
	}
	// TUNGETIFF fails with EBADFD on a detached descriptor.
	err := d.queues[0].control(func(fd int) error {
		return unix.IoctlIfreq(fd, unix.TUNGETIFF, &unix.Ifreq{})
	})
	return err != nil
}

// Close closes every queue. A persistent device stays; the goroutines
// blocked in Read return os.ErrClosed.
func (d *Device) Close() error {
	var errs []error
	for _, q := range d.queues {
		q.closed.Store(true)
		errs = append(errs, q.f.Close())
	}
	return errors.Join(errs...)
}

// ErrGone is returned by Read and Write when the device was deleted.
var ErrGone = errors.New("tun: the device was deleted")

func (q *Queue) classify(op string, err error) error {
	switch {
	case q.closed.Load() || errors.Is(err, os.ErrClosed):
		return os.ErrClosed
	case errors.Is(err, unix.EBADFD):
		return ErrGone
	}
	return fmt.Errorf("tun: %s: %w", op, err)
}

// Reader is the memory of one reading goroutine. It is reused for every
// Read; the packets a Read returns are valid until the next.
type Reader struct {
	frame   []byte   // one frame as read: virtio header, packet
	arena   []byte   // the packets handed out, back to back
	used    int      // bytes of arena in use
	pkts    [][]byte // packets of the current batch
	max     int      // packets per batch
	pending tso      // a super-packet not fully emitted into the last batch

	// Malformed counts frames dropped because their virtio header or
	// headers made no sense, since the Reader was made.
	Malformed uint64
}

// NewReader returns a Reader for batches of up to maxPackets packets.
func NewReader(maxPackets int) *Reader {
	return &Reader{
		frame: make([]byte, vnetHdrLen+MaxPacket),
		arena: make([]byte, 4*MaxPacket),
		pkts:  make([][]byte, 0, maxPackets),
		max:   maxPackets,
	}
}

// full reports whether the batch can take no further frame: a frame may
// need up to MaxPacket bytes of arena (a super-packet being cut needs more,
// and is continued in the next batch).
func (r *Reader) full() bool {
	return len(r.pkts) >= r.max || len(r.arena)-r.used < MaxPacket || r.pending.active()
}

func (r *Reader) add(n int) {
	r.pkts = append(r.pkts, r.arena[r.used:r.used+n:r.used+n])
	r.used += n
}

// Read returns the next batch of packets: at least one, as many as are
// queued without waiting. It blocks until a packet arrives, the queue is
// closed (os.ErrClosed) or the device is deleted (ErrGone).
func (q *Queue) Read(r *Reader) ([][]byte, error) {
	r.pkts, r.used = r.pkts[:0], 0
	if r.pending.active() {
		r.emit()
		if r.full() {
			return r.pkts, nil
		}
	}
	var rerr error
	err := q.rc.Read(func(fd uintptr) bool {
		for !r.full() {
			n, err := unix.Read(int(fd), r.frame)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return len(r.pkts) > 0 // with nothing read yet, wait
			case err != nil:
				rerr = err
				return true
			}
			r.consume(r.frame[:n], q.offload)
		}
		return true
	})
	if err == nil {
		err = rerr
	}
	if err != nil && len(r.pkts) == 0 {
		return nil, q.classify("read", err)
	}
	return r.pkts, nil
}

// consume turns one frame into packets.
func (r *Reader) consume(frame []byte, offload bool) {
	if !offload {
		if len(frame) > 0 {
			copy(r.arena[r.used:], frame)
			r.add(len(frame))
		}
		return
	}
	if len(frame) <= vnetHdrLen {
		r.Malformed++
		return
	}
	var h vnetHdr
	h.decode(frame)
	pkt := frame[vnetHdrLen:]
	if h.gsoType == unix.VIRTIO_NET_HDR_GSO_NONE {
		out := r.arena[r.used : r.used+len(pkt)]
		copy(out, pkt)
		if h.flags&unix.VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
			if completeChecksum(out, int(h.csumStart), int(h.csumOffset)) != nil {
				r.Malformed++
				return
			}
		}
		r.add(len(pkt))
		return
	}
	if r.pending.start(pkt, h) != nil {
		r.Malformed++
		return
	}
	r.emit()
}

// emit cuts as much of the pending super-packet as fits into the arena and
// the batch.
func (r *Reader) emit() { r.pending.emit(r.arena[r.used:], r.max-len(r.pkts), r.add) }

// Writer is the memory of one writing goroutine.
type Writer struct {
	runs []run
	hdrs [][vnetHdrLen]byte
	iovs []unix.Iovec
}

// NewWriter returns a Writer.
func NewWriter() *Writer { return &Writer{} }

// Write writes pkts, each a whole IP packet, to the device: with offloads,
// runs of one TCP flow's segments merge into one frame. Packets may be
// modified (headers of merged runs). It returns the number of packets, and
// of their bytes, written; a packet the kernel refuses (a malformed one, or
// any while the device is down: EIO) is skipped, and the last such error
// returned with the counts. ErrGone and os.ErrClosed end the write.
func (q *Queue) Write(w *Writer, pkts [][]byte) (written, bytes int, err error) {
	if len(pkts) == 0 {
		return 0, 0, nil
	}
	if q.offload {
		w.runs, w.hdrs = coalesce(pkts, w.runs, w.hdrs)
	} else {
		w.runs = w.runs[:0]
		for i := range pkts {
			w.runs = append(w.runs, run{first: i, n: 1})
		}
	}
	next := 0
	var lastErr error
	err = q.rc.Write(func(fd uintptr) bool {
		for ; next < len(w.runs); next++ {
			r := w.runs[next]
			w.iovs = w.iovs[:0]
			if q.offload {
				w.iovs = appendIov(w.iovs, w.hdrs[next][:])
			}
			w.iovs = appendIov(w.iovs, pkts[r.first])
			for _, p := range pkts[r.first+1 : r.first+r.n] {
				w.iovs = appendIov(w.iovs, p[r.seg.hdrLen:])
			}
			_, _, errno := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&w.iovs[0])), uintptr(len(w.iovs)))
			switch errno {
			case 0:
				written += r.n
				for _, p := range pkts[r.first : r.first+r.n] {
					bytes += len(p)
				}
			case unix.EAGAIN:
				return false // wait until writable, then retry this frame
			case unix.EINTR:
				next-- // retry
			case unix.EBADFD:
				lastErr = errno
				return true
			default:
				lastErr = errno
			}
		}
		return true
	})
	if err == nil && errors.Is(lastErr, unix.EBADFD) {
		err = lastErr
	}
	if err != nil {
		return written, bytes, q.classify("write", err)
	}
	if lastErr != nil {
		return written, bytes, q.classify("write", lastErr)
	}
	return written, bytes, nil
}

func appendIov(iovs []unix.Iovec, b []byte) []unix.Iovec {
	iov := unix.Iovec{Base: &b[0]}
	iov.SetLen(len(b))
	return append(iovs, iov)
}
