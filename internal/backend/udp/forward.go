package udp

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/loomnet/loom/internal/backend/udp/batch"
	"github.com/loomnet/loom/internal/backend/udp/tun"
)

// innerDst returns the destination address of an IPv4 or IPv6 packet.
func innerDst(p []byte) (netip.Addr, bool) {
	if len(p) == 0 {
		return netip.Addr{}, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) >= 20 && p[0]&0x0f >= 5 {
			return netip.AddrFrom4([4]byte(p[16:20])), true
		}
	case 6:
		if len(p) >= 40 {
			return netip.AddrFrom16([16]byte(p[24:40])), true
		}
	}
	return netip.Addr{}, false
}

// sender queues a datagram for a peer (a batch.Writer).
type sender interface {
	Add(ep netip.AddrPort, pkt []byte) bool
}

// route queues each packet read from flannel0 for the peer whose subnet
// holds its destination, and counts the ones it drops in c.
func route(t *table, pkts [][]byte, out sender, c *tally) {
	var last netip.Addr // the segments of a super-packet share a destination
	var ep netip.AddrPort
	found := false
	for _, p := range pkts {
		dst, ok := innerDst(p)
		if !ok {
			c.drops[dropMalformed]++
			continue
		}
		if dst != last {
			last = dst
			ep, found = t.lookup(dst)
		}
		switch {
		case found:
			if !out.Add(ep, p) {
				c.drops[dropSendError]++ // cannot happen: the writer holds a whole batch
			}
		case dst.IsMulticast() || dst.IsLinkLocalUnicast():
			c.drops[dropLinkLocal]++
		default:
			c.drops[dropNoPeer]++
		}
	}
}

// deliverable appends to keep the packets received from peers that are for
// this node's subnets, and counts the others in c.
func deliverable(t *table, pkts, keep [][]byte, c *tally) [][]byte {
	for _, p := range pkts {
		dst, ok := innerDst(p)
		switch {
		case !ok:
			c.drops[dropMalformed]++
		case !t.isLocal(dst):
			c.drops[dropNotLocal]++
		default:
			keep = append(keep, p)
		}
	}
	return keep
}

// txBuffers is the memory of one transmit worker. Transmit workers end and
// start with each incarnation of flannel0, so their memory is pooled.
type txBuffers struct {
	r *tun.Reader
	w *batch.Writer
}

func newTxBuffers() *txBuffers {
	return &txBuffers{r: tun.NewReader(txBatch), w: batch.NewWriter(txBatch)}
}

// rxBuffers is the memory of one receive worker, which lives as long as
// Run: allocated once.
type rxBuffers struct {
	r    *batch.Reader
	w    *tun.Writer
	keep [][]byte
}

func newRxBuffers(gro bool, extMTU int) *rxBuffers {
	// With GRO a slot takes a train of datagrams of up to 64 KiB; without,
	// one datagram, which fits the underlay MTU (a bigger one, from a peer
	// with a bigger MTU, is counted as truncated).
	slots, size := rxSlots, 1<<16
	if !gro {
		slots, size = rxSlotsMTU, max(extMTU, 1500)
	}
	return &rxBuffers{
		r:    batch.NewReader(slots, size),
		w:    tun.NewWriter(),
		keep: make([][]byte, 0, slots*64),
	}
}

// transmit forwards packets from one queue of flannel0 to peers until the
// queue is closed or the device deleted.
func (n *Network) transmit(q *tun.Queue, c *batch.Conn) {
	b := n.txPool.Get().(*txBuffers)
	defer n.txPool.Put(b)
	errs := errLog{log: n.log, what: "read from " + DeviceName}
	var t tally
	for {
		pkts, err := q.Read(b.r)
		if m := b.r.Malformed; m > 0 {
			n.stats.drops[dropMalformed].Add(m)
			b.r.Malformed = 0
		}
		switch {
		case errors.Is(err, os.ErrClosed):
			return
		case errors.Is(err, tun.ErrGone):
			n.kickDevice()
			return
		case err != nil:
			errs.report(err)
			time.Sleep(10 * time.Millisecond) // an unexpected error must not spin
			continue
		}
		route(n.table.Load(), pkts, b.w, &t)
		queued := b.w.Len()
		sent, bytes, err := c.Write(b.w)
		if err != nil && !errors.Is(err, os.ErrClosed) {
			errs.report(err)
		}
		t.packets, t.bytes = uint64(sent), uint64(bytes)
		t.drops[dropSendError] += uint64(queued - sent)
		n.stats.addTx(&t)
		if !c.GSO() && n.stats.gso.Load() { // the kernel refused it
			n.stats.gso.Store(false)
		}
	}
}

// receive forwards datagrams from one socket to flannel0 until the socket
// is closed. Worker i writes to queue i of the current device.
func (n *Network) receive(c *batch.Conn, i int) {
	b := newRxBuffers(c.GRO(), n.cfg.ExtMTU)
	errs := errLog{log: n.log, what: "receive from peers"}
	var t tally
	for {
		pkts, err := c.Read(b.r)
		if m := b.r.Truncated; m > 0 {
			n.stats.drops[dropTruncated].Add(m)
			b.r.Truncated = 0
		}
		switch {
		case errors.Is(err, os.ErrClosed):
			return
		case err != nil:
			errs.report(err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		b.keep = deliverable(n.table.Load(), pkts, b.keep[:0], &t)
		d := n.dev.Load()
		if d == nil {
			t.drops[dropTUNError] += uint64(len(b.keep))
			n.stats.addRx(&t)
			continue
		}
		qs := d.tun.Queues()
		written, bytes, err := qs[i%len(qs)].Write(b.w, b.keep)
		switch {
		case errors.Is(err, tun.ErrGone):
			n.kickDevice()
		case err != nil && !errors.Is(err, os.ErrClosed):
			errs.report(err)
		}
		t.packets, t.bytes = uint64(written), uint64(bytes)
		t.drops[dropTUNError] += uint64(len(b.keep) - written)
		n.stats.addRx(&t)
	}
}

// errLog logs a worker's errors without flooding: a new error at once, the
// same one again at most once a minute, with how often it happened.
type errLog struct {
	log   *slog.Logger
	what  string
	last  string
	at    time.Time
	count int
}

func (e *errLog) report(err error) {
	msg := err.Error()
	e.count++
	if msg == e.last && time.Since(e.at) < time.Minute {
		return
	}
	e.log.Warn(e.what+" failed", "err", err, "times", e.count)
	e.last, e.at, e.count = msg, time.Now(), 0
}
