package tun

// Offloads, in user space, for a TUN with IFF_VNET_HDR: every frame read
// or written starts with a struct virtio_net_hdr. Reading, the kernel hands
// over TCP segmentation (TSO) super-packets of up to 64 KiB and packets
// whose transport checksum is left to us; segment completes both, so every
// packet leaving this package is a plain IP packet with correct checksums,
// as a peer that knows nothing of offloads (flannel's udp backend) expects.
// Writing, coalesce merges runs of consecutive TCP segments of one flow
// into one GSO frame (user-space GRO), so the kernel forwards one big
// packet instead of forty small ones.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// vnetHdrLen is the size of struct virtio_net_hdr, the header the kernel
// uses unless TUNSETVNETHDRSZ says otherwise.
const vnetHdrLen = 10

// MaxPacket is the largest IP packet: IPv4's total length is 16 bits.
// (IPv6 allows 40 bytes more; nothing here needs them.)
const MaxPacket = 65535

// vnetHdr is struct virtio_net_hdr. Its fields are in the host's byte
// order (legacy virtio, as TUN uses unless TUNSETVNETLE is set).
type vnetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16
	gsoSize    uint16
	csumStart  uint16
	csumOffset uint16
}

func (h *vnetHdr) decode(b []byte) {
	h.flags = b[0]
	h.gsoType = b[1]
	h.hdrLen = binary.NativeEndian.Uint16(b[2:])
	h.gsoSize = binary.NativeEndian.Uint16(b[4:])
	h.csumStart = binary.NativeEndian.Uint16(b[6:])
	h.csumOffset = binary.NativeEndian.Uint16(b[8:])
}

func (h vnetHdr) encode(b []byte) {
	b[0] = h.flags
	b[1] = h.gsoType
	binary.NativeEndian.PutUint16(b[2:], h.hdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.gsoSize)
	binary.NativeEndian.PutUint16(b[6:], h.csumStart)
	binary.NativeEndian.PutUint16(b[8:], h.csumOffset)
}

// Header offsets and values used below.
const (
	ipv4TotalLen = 2
	ipv4ID       = 4
	ipv4Flags    = 6
	ipv4TTL      = 8
	ipv4Proto    = 9
	ipv4Csum     = 10
	ipv4Src      = 12 // then 4 bytes of destination
	ipv6PayLen   = 4
	ipv6Next     = 6
	ipv6Src      = 8 // then 16 bytes of destination
	ipv6HdrLen   = 40

	tcpSeq    = 4
	tcpAck    = 8
	tcpOff    = 12 // data offset, in the high nibble
	tcpFlags  = 13
	tcpCsum   = 16
	tcpMinLen = 20

	tcpFIN = 0x01
	tcpPSH = 0x08
	tcpACK = 0x10
	tcpCWR = 0x80

	protoTCP = 6
)

// addrs returns the source and destination address fields of an IPv4 or
// IPv6 header.
func addrs(p []byte, v6 bool) (src, dst []byte) {
	if v6 {
		return p[ipv6Src : ipv6Src+16], p[ipv6Src+16 : ipv6Src+32]
	}
	return p[ipv4Src : ipv4Src+4], p[ipv4Src+4 : ipv4Src+8]
}

var errMalformed = errors.New("malformed frame")

// completeChecksum finishes a checksum the kernel left to us (the frame was
// CHECKSUM_PARTIAL: VIRTIO_NET_HDR_F_NEEDS_CSUM): the field at start+offset
// holds the pseudo-header sum, and the checksum covers p[start:].
func completeChecksum(p []byte, start, offset int) error {
	at := start + offset
	if start < 0 || at+2 > len(p) {
		return fmt.Errorf("%w: checksum at %d+%d beyond a %d-byte packet", errMalformed, start, offset, len(p))
	}
	binary.BigEndian.PutUint16(p[at:], Checksum(p[start:], 0))
	return nil
}

// tso is a TCP segmentation super-packet being cut into segments. The
// frame stays in the reader's frame buffer until done.
type tso struct {
	pkt    []byte // IP header, TCP header, payload; nil when idle
	v6     bool
	l4     int // offset of the TCP header
	hdrLen int // IP and TCP headers
	mss    int
	seq    uint32
	id     uint16 // IPv4 identification of the first segment
	next   int    // offset in pkt of the next payload byte to emit
	index  int    // number of segments emitted so far
}

func (t *tso) active() bool { return t.pkt != nil }

// start checks a TSO frame (without its virtio header) and prepares it for
// emit. The kernel's hdr_len is not trusted (in the forwarding path it can
// be the length of the whole first segment): the headers are measured from
// the packet itself.
func (t *tso) start(pkt []byte, h vnetHdr) error {
	*t = tso{}
	if len(pkt) == 0 {
		return errMalformed
	}
	v6 := pkt[0]>>4 == 6
	switch {
	case h.gsoType&^unix.VIRTIO_NET_HDR_GSO_ECN == unix.VIRTIO_NET_HDR_GSO_TCPV4 && pkt[0]>>4 == 4:
	case h.gsoType&^unix.VIRTIO_NET_HDR_GSO_ECN == unix.VIRTIO_NET_HDR_GSO_TCPV6 && v6:
	default:
		return fmt.Errorf("%w: GSO type %d for an IPv%d packet", errMalformed, h.gsoType, pkt[0]>>4)
	}
	l4 := int(h.csumStart)
	minL3 := 20
	if v6 {
		minL3 = ipv6HdrLen
	} else if l4 != int(pkt[0]&0x0f)*4 {
		return fmt.Errorf("%w: csum_start %d is not the IPv4 header length %d", errMalformed, l4, int(pkt[0]&0x0f)*4)
	}
	if l4 < minL3 || l4+tcpMinLen > len(pkt) || h.csumOffset != tcpCsum {
		return fmt.Errorf("%w: TCP header at %d (checksum at +%d) in a %d-byte packet", errMalformed, l4, h.csumOffset, len(pkt))
	}
	hdrLen := l4 + int(pkt[l4+tcpOff]>>4)*4
	if hdrLen < l4+tcpMinLen || hdrLen >= len(pkt) || h.gsoSize == 0 {
		return fmt.Errorf("%w: TCP headers end at %d in a %d-byte packet, gso_size %d", errMalformed, hdrLen, len(pkt), h.gsoSize)
	}
	*t = tso{
		pkt: pkt, v6: v6, l4: l4, hdrLen: hdrLen, mss: int(h.gsoSize),
		seq: binary.BigEndian.Uint32(pkt[l4+tcpSeq:]), next: hdrLen,
	}
	if !v6 {
		t.id = binary.BigEndian.Uint16(pkt[ipv4ID:])
	}
	return nil
}

// emit writes up to limit segments into dst, back to back, for as long as
// they fit, and reports each one's length through add. It returns the
// bytes of dst used. Each segment is a complete packet: the super-packet's headers with
// length, IPv4 identification and header checksum, sequence number and
// flags adjusted (FIN and PSH only on the last segment, CWR only on the
// first, as the kernel's own segmentation does), then its share of the
// payload, and a full TCP checksum.
func (t *tso) emit(dst []byte, limit int, add func(n int)) (used int) {
	src, dstAddr := addrs(t.pkt, t.v6)
	for ; t.next < len(t.pkt); limit-- {
		chunk := min(t.mss, len(t.pkt)-t.next)
		n := t.hdrLen + chunk
		if len(dst)-used < n || limit <= 0 {
			return used
		}
		seg := dst[used : used+n]
		copy(seg, t.pkt[:t.hdrLen])
		copy(seg[t.hdrLen:], t.pkt[t.next:t.next+chunk])
		last := t.next+chunk == len(t.pkt)

		if t.v6 {
			binary.BigEndian.PutUint16(seg[ipv6PayLen:], uint16(n-ipv6HdrLen))
		} else {
			binary.BigEndian.PutUint16(seg[ipv4TotalLen:], uint16(n))
			binary.BigEndian.PutUint16(seg[ipv4ID:], t.id+uint16(t.index))
			seg[ipv4Csum], seg[ipv4Csum+1] = 0, 0
			binary.BigEndian.PutUint16(seg[ipv4Csum:], Checksum(seg[:t.l4], 0))
		}
		tcp := seg[t.l4:]
		binary.BigEndian.PutUint32(tcp[tcpSeq:], t.seq+uint32(t.next-t.hdrLen))
		if !last {
			tcp[tcpFlags] &^= tcpFIN | tcpPSH
		}
		if t.index > 0 {
			tcp[tcpFlags] &^= tcpCWR
		}
		tcp[tcpCsum], tcp[tcpCsum+1] = 0, 0
		binary.BigEndian.PutUint16(tcp[tcpCsum:], Checksum(tcp, pseudoHeader(src, dstAddr, protoTCP, len(tcp))))

		used += n
		t.next += chunk
		t.index++
		add(n)
	}
	t.pkt = nil
	return used
}

// tcpSeg describes a packet as a candidate for coalescing.
type tcpSeg struct {
	ok      bool // a plain TCP data segment that may be merged
	v6      bool
	l4      int // offset of the TCP header
	hdrLen  int // IP and TCP headers
	payload int
	seq     uint32
	flags   byte
}

// parseSeg recognises the segments coalesce may merge: IPv4 without options
// and not fragmented, or IPv6 with TCP as the first next header; lengths
// that agree with the packet; flags ACK or ACK|PSH; a non-empty payload.
func parseSeg(p []byte) tcpSeg {
	var s tcpSeg
	if len(p) < 20 {
		return s
	}
	switch p[0] >> 4 {
	case 4:
		if p[0]&0x0f != 5 || p[ipv4Proto] != protoTCP ||
			int(binary.BigEndian.Uint16(p[ipv4TotalLen:])) != len(p) ||
			binary.BigEndian.Uint16(p[ipv4Flags:])&0x3fff != 0 { // MF or a fragment offset
			return s
		}
		s.l4 = 20
	case 6:
		if len(p) < ipv6HdrLen || p[ipv6Next] != protoTCP ||
			int(binary.BigEndian.Uint16(p[ipv6PayLen:]))+ipv6HdrLen != len(p) {
			return s
		}
		s.v6, s.l4 = true, ipv6HdrLen
	default:
		return s
	}
	if s.l4+tcpMinLen > len(p) {
		return s
	}
	s.hdrLen = s.l4 + int(p[s.l4+tcpOff]>>4)*4
	if s.hdrLen < s.l4+tcpMinLen || s.hdrLen >= len(p) {
		return s
	}
	s.flags = p[s.l4+tcpFlags]
	if s.flags != tcpACK && s.flags != tcpACK|tcpPSH {
		return s
	}
	s.payload = len(p) - s.hdrLen
	s.seq = binary.BigEndian.Uint32(p[s.l4+tcpSeq:])
	s.ok = true
	return s
}

// sameFlow reports whether b may follow a in one GSO frame, as far as the
// headers go: the same addresses, ports, IP header bits (TOS/traffic class,
// DF, TTL/hop limit, flow label), acknowledgment, window and TCP options.
// This is what the kernel's GRO compares too.
func sameFlow(a, b []byte, sa, sb tcpSeg) bool {
	if sa.v6 != sb.v6 || sa.hdrLen != sb.hdrLen {
		return false
	}
	if sa.v6 {
		if !bytes.Equal(a[0:4], b[0:4]) || !bytes.Equal(a[ipv6Next:ipv6Src+32], b[ipv6Next:ipv6Src+32]) {
			return false
		}
	} else {
		if a[1] != b[1] || a[ipv4Flags]&0xe0 != b[ipv4Flags]&0xe0 || a[ipv4TTL] != b[ipv4TTL] ||
			!bytes.Equal(a[ipv4Src:ipv4Src+8], b[ipv4Src:ipv4Src+8]) {
			return false
		}
	}
	ta, tb := a[sa.l4:sa.hdrLen], b[sb.l4:sb.hdrLen]
	return bytes.Equal(ta[0:4], tb[0:4]) && // ports
		bytes.Equal(ta[tcpAck:tcpFlags], tb[tcpAck:tcpFlags]) && // ack, data offset
		bytes.Equal(ta[tcpFlags+1:tcpCsum], tb[tcpFlags+1:tcpCsum]) && // window
		bytes.Equal(ta[tcpCsum+2:], tb[tcpCsum+2:]) // urgent pointer, options
}

// checksumOK verifies the checksums of a segment parseSeg accepted: TCP's
// and, for IPv4, the header's. Merging rewrites the headers and the kernel
// checks only the merged frame's, so a segment whose IPv4 header checksum
// is wrong would otherwise come out repaired instead of dropped (found by
// FuzzCoalesce).
func checksumOK(p []byte, s tcpSeg) bool {
	if !s.v6 && fold(sum(p[:s.l4], 0)) != 0xffff {
		return false
	}
	src, dst := addrs(p, s.v6)
	return fold(sum(p[s.l4:], pseudoHeader(src, dst, protoTCP, len(p)-s.l4))) == 0xffff
}

// run is a group of consecutive packets written as one frame: pkts[first]
// whole, then the payloads of the next n-1 packets.
type run struct {
	first, n int
	seg      tcpSeg // of the first packet
	bytes    int    // length of the merged packet
	lastLen  int    // payload length of the last packet
	verified bool   // the first packet's checksum has been checked
}

// coalesce groups pkts into runs, in order, merging consecutive segments of
// one TCP flow while the result stays a valid GSO frame: sequence numbers
// and IPv4 identifications contiguous, every payload but the last exactly
// gso_size long, PSH only on the last, at most MaxPacket bytes, and every
// checksum verified first (a merged frame carries a checksum the kernel
// computes afresh, so a corrupted segment must never be merged: it goes
// alone, and the kernel drops it). It rewrites the headers of merged runs'
// first packets and fills in each run's virtio header; single packets get
// an empty one.
func coalesce(pkts [][]byte, runs []run, hdrs [][vnetHdrLen]byte) ([]run, [][vnetHdrLen]byte) {
	runs, hdrs = runs[:0], hdrs[:0]
	var cur run
	open := false
	flush := func() {
		if open {
			runs = append(runs, cur)
			open = false
		}
	}
	for i, p := range pkts {
		s := parseSeg(p)
		if open && cur.seg.ok && s.ok && cur.lastLen == cur.seg.payload && // no short segment yet
			pkts[cur.first+cur.n-1][cur.seg.l4+tcpFlags]&tcpPSH == 0 &&
			s.payload <= cur.seg.payload && cur.bytes+s.payload <= MaxPacket &&
			s.seq == cur.seg.seq+uint32(cur.bytes-cur.seg.hdrLen) &&
			// Segmentation numbers IPv4 IDs first, first+1, ...: any other
			// ID would come out changed (the kernel's GRO checks this too).
			(s.v6 || binary.BigEndian.Uint16(p[ipv4ID:]) == binary.BigEndian.Uint16(pkts[cur.first][ipv4ID:])+uint16(cur.n)) &&
			sameFlow(pkts[cur.first], p, cur.seg, s) {
			if !cur.verified {
				cur.verified = true
				if !checksumOK(pkts[cur.first], cur.seg) {
					cur.seg.ok = false // goes alone; p may start a run
				}
			}
			if cur.seg.ok && checksumOK(p, s) {
				cur.n++
				cur.bytes += s.payload
				cur.lastLen = s.payload
				continue
			}
			if cur.seg.ok { // p is corrupt: it goes alone
				flush()
				runs = append(runs, run{first: i, n: 1})
				continue
			}
		}
		flush()
		cur = run{first: i, n: 1, seg: s, bytes: len(p), lastLen: s.payload}
		open = true
	}
	flush()

	for _, r := range runs {
		var h vnetHdr
		if r.n > 1 {
			h = merge(pkts[r.first:r.first+r.n], r)
		}
		var b [vnetHdrLen]byte
		h.encode(b[:])
		hdrs = append(hdrs, b)
	}
	return runs, hdrs
}

// merge rewrites the first packet's headers for the merged frame of a run
// and returns its virtio header. The TCP checksum field gets the
// pseudo-header sum, as CHECKSUM_PARTIAL wants: the kernel completes it
// for each segment it makes (or trusts it if it delivers the frame whole).
func merge(pkts [][]byte, r run) vnetHdr {
	p := pkts[0]
	s := r.seg
	if pkts[len(pkts)-1][s.l4+tcpFlags]&tcpPSH != 0 {
		p[s.l4+tcpFlags] |= tcpPSH
	}
	h := vnetHdr{
		flags:      unix.VIRTIO_NET_HDR_F_NEEDS_CSUM,
		gsoType:    unix.VIRTIO_NET_HDR_GSO_TCPV4,
		hdrLen:     uint16(s.hdrLen),
		gsoSize:    uint16(s.payload),
		csumStart:  uint16(s.l4),
		csumOffset: tcpCsum,
	}
	if s.v6 {
		h.gsoType = unix.VIRTIO_NET_HDR_GSO_TCPV6
		binary.BigEndian.PutUint16(p[ipv6PayLen:], uint16(r.bytes-ipv6HdrLen))
	} else {
		binary.BigEndian.PutUint16(p[ipv4TotalLen:], uint16(r.bytes))
		p[ipv4Csum], p[ipv4Csum+1] = 0, 0
		binary.BigEndian.PutUint16(p[ipv4Csum:], Checksum(p[:s.l4], 0))
	}
	src, dst := addrs(p, s.v6)
	binary.BigEndian.PutUint16(p[s.l4+tcpCsum:], fold(pseudoHeader(src, dst, protoTCP, r.bytes-s.l4)))
	return h
}
