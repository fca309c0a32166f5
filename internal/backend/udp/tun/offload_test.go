package tun

// Packets here are built by hand; no kernel involved. Addresses:
// 10.244.1.10 → 10.244.2.10 and fc00:0:0:1::10 → fc00:0:0:2::10, ports
// 40000 → 5201.

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// refChecksum is RFC 1071 done the slow, obvious way.
func refChecksum(parts ...[]byte) uint16 {
	var all []byte
	for _, p := range parts {
		all = append(all, p...)
	}
	if len(all)%2 == 1 {
		all = append(all, 0)
	}
	var s uint32
	for i := 0; i < len(all); i += 2 {
		s += uint32(all[i])<<8 | uint32(all[i+1])
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

func TestChecksum(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := range 300 {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.UintN(256))
		}
		if got, want := Checksum(b, 0), refChecksum(b); got != want {
			t.Fatalf("len %d: Checksum %#04x, want %#04x", n, got, want)
		}
	}
	// All ones: the sum saturates, which exercises every carry.
	ones := bytes.Repeat([]byte{0xff}, 4096)
	if got, want := Checksum(ones, 0), refChecksum(ones); got != want {
		t.Errorf("all ones: %#04x, want %#04x", got, want)
	}
	// A packet with its checksum in place sums to 0xffff.
	b := []byte{0x45, 0, 0, 20, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 244, 1, 10, 10, 244, 2, 10}
	binary.BigEndian.PutUint16(b[10:], Checksum(b, 0))
	if fold(sum(b, 0)) != 0xffff {
		t.Error("a header with its own checksum does not verify")
	}
}

const (
	mss   = 1448
	tsOpt = 12 // timestamps: NOP NOP TS
)

// tcpPacket builds an IPv4 or IPv6 TCP packet with a timestamp option and
// payload, checksums correct.
func tcpPacket(v6 bool, seq uint32, flags byte, payload []byte) []byte {
	l3 := 20
	if v6 {
		l3 = ipv6HdrLen
	}
	tcpLen := tcpMinLen + tsOpt
	p := make([]byte, l3+tcpLen+len(payload))
	if v6 {
		p[0] = 0x60
		p[1] = 0x0a // traffic class bits, flow label
		binary.BigEndian.PutUint16(p[ipv6PayLen:], uint16(len(p)-l3))
		p[ipv6Next] = protoTCP
		p[7] = 63
		src, dst := netip.MustParseAddr("fc00:0:0:1::10").As16(), netip.MustParseAddr("fc00:0:0:2::10").As16()
		copy(p[ipv6Src:], src[:])
		copy(p[ipv6Src+16:], dst[:])
	} else {
		p[0] = 0x45
		binary.BigEndian.PutUint16(p[ipv4TotalLen:], uint16(len(p)))
		binary.BigEndian.PutUint16(p[ipv4ID:], 0xfff0) // wraps while segmenting
		p[ipv4Flags] = 0x40                            // DF
		p[ipv4TTL] = 63
		p[ipv4Proto] = protoTCP
		copy(p[ipv4Src:], []byte{10, 244, 1, 10, 10, 244, 2, 10})
		binary.BigEndian.PutUint16(p[ipv4Csum:], Checksum(p[:20], 0))
	}
	tcp := p[l3:]
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 5201)
	binary.BigEndian.PutUint32(tcp[tcpSeq:], seq)
	binary.BigEndian.PutUint32(tcp[tcpAck:], 0x01020304)
	tcp[tcpOff] = byte(tcpLen/4) << 4
	tcp[tcpFlags] = flags
	binary.BigEndian.PutUint16(tcp[14:], 501) // window
	copy(tcp[tcpMinLen:], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2})
	copy(tcp[tcpLen:], payload)
	fixTCPChecksum(p, l3, v6)
	return p
}

func fixTCPChecksum(p []byte, l3 int, v6 bool) {
	src, dst := addrs(p, v6)
	p[l3+tcpCsum], p[l3+tcpCsum+1] = 0, 0
	binary.BigEndian.PutUint16(p[l3+tcpCsum:], refChecksum(pseudo(src, dst, len(p)-l3), p[l3:]))
}

// pseudo renders a pseudo-header as bytes, for refChecksum.
func pseudo(src, dst []byte, n int) []byte {
	b := append(append([]byte{}, src...), dst...)
	if len(src) == 4 {
		return append(b, 0, protoTCP, byte(n>>8), byte(n))
	}
	return append(b, 0, 0, byte(n>>8), byte(n), 0, 0, 0, protoTCP)
}

func payloadOf(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>11)
	}
	return b
}

// checkPacket verifies an IPv4 header checksum and a TCP checksum the slow
// way.
func checkPacket(t *testing.T, p []byte, v6 bool) {
	t.Helper()
	l3 := 20
	if v6 {
		l3 = ipv6HdrLen
	} else if refChecksum(p[:20]) != 0 {
		t.Errorf("IPv4 header checksum wrong")
	}
	src, dst := addrs(p, v6)
	if refChecksum(pseudo(src, dst, len(p)-l3), p[l3:]) != 0 {
		t.Errorf("TCP checksum wrong")
	}
}

// tsoFrame builds what a TUN with TSO hands over: one packet carrying the
// whole payload, its virtio header, and the TCP checksum field holding the
// pseudo-header sum (CHECKSUM_PARTIAL).
func tsoFrame(v6 bool, flags byte, payload []byte) ([]byte, vnetHdr) {
	p := tcpPacket(v6, 0xfffff000, flags, payload) // the sequence wraps too
	l3 := 20
	h := vnetHdr{flags: unix.VIRTIO_NET_HDR_F_NEEDS_CSUM, gsoType: unix.VIRTIO_NET_HDR_GSO_TCPV4, gsoSize: mss, csumOffset: tcpCsum}
	if v6 {
		l3 = ipv6HdrLen
		h.gsoType = unix.VIRTIO_NET_HDR_GSO_TCPV6
	}
	h.csumStart = uint16(l3)
	h.hdrLen = uint16(len(p)) // as the forwarding path reports it: wrong
	src, dst := addrs(p, v6)
	binary.BigEndian.PutUint16(p[l3+tcpCsum:], fold(pseudoHeader(src, dst, protoTCP, len(p)-l3)))
	return p, h
}

func TestSegment(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, size := range []int{1, mss, 3 * mss, 10*mss + 17, 65535 - 100} {
			payload := payloadOf(size)
			l3 := 20
			if v6 {
				l3 = ipv6HdrLen
			}
			if size > MaxPacket-l3-tcpMinLen-tsOpt {
				continue
			}
			frame, h := tsoFrame(v6, tcpACK|tcpPSH|tcpFIN|tcpCWR, payload)
			orig := bytes.Clone(frame)
			var ts tso
			if err := ts.start(frame, h); err != nil {
				t.Fatalf("v6 %v size %d: %v", v6, size, err)
			}
			// Emit into a small buffer, a few segments at a time, as a
			// Reader does when its batch fills up.
			var segs [][]byte
			for ts.active() {
				buf := make([]byte, 3*MaxPacket)
				used := 0
				ts.emit(buf, 3, func(n int) {
					segs = append(segs, buf[used:used+n])
					used += n
				})
			}
			want := (size + mss - 1) / mss
			if len(segs) != want {
				t.Fatalf("v6 %v size %d: %d segments, want %d", v6, size, len(segs), want)
			}
			hdrLen := l3 + tcpMinLen + tsOpt
			var got []byte
			for i, s := range segs {
				checkPacket(t, s, v6)
				tcp := s[l3:]
				if seq := binary.BigEndian.Uint32(tcp[tcpSeq:]); seq != 0xfffff000+uint32(i*mss) {
					t.Errorf("segment %d: seq %#x", i, seq)
				}
				last := i == len(segs)-1
				f := tcp[tcpFlags]
				if (f&tcpFIN != 0) != last || (f&tcpPSH != 0) != last || (f&tcpCWR != 0) != (i == 0) || f&tcpACK == 0 {
					t.Errorf("segment %d of %d: flags %#x", i, len(segs), f)
				}
				if v6 {
					if int(binary.BigEndian.Uint16(s[ipv6PayLen:]))+ipv6HdrLen != len(s) {
						t.Errorf("segment %d: payload length field wrong", i)
					}
				} else {
					if int(binary.BigEndian.Uint16(s[ipv4TotalLen:])) != len(s) {
						t.Errorf("segment %d: total length field wrong", i)
					}
					if id := binary.BigEndian.Uint16(s[ipv4ID:]); id != 0xfff0+uint16(i) {
						t.Errorf("segment %d: IPv4 ID %#x", i, id)
					}
				}
				// Everything else in the headers is the original's.
				if !bytes.Equal(tcp[:tcpSeq], orig[l3:l3+tcpSeq]) || !bytes.Equal(tcp[tcpAck:tcpFlags], orig[l3+tcpAck:l3+tcpFlags]) ||
					!bytes.Equal(tcp[tcpFlags+1:tcpCsum], orig[l3+tcpFlags+1:l3+tcpCsum]) || !bytes.Equal(tcp[tcpCsum+2:hdrLen-l3], orig[l3+tcpCsum+2:hdrLen]) {
					t.Errorf("segment %d: TCP header fields changed", i)
				}
				got = append(got, s[hdrLen:]...)
			}
			if !bytes.Equal(got, payload) {
				t.Errorf("v6 %v size %d: payload not reassembled", v6, size)
			}
		}
	}
}

func TestSegmentRejects(t *testing.T) {
	frame, h := tsoFrame(false, tcpACK, payloadOf(3000))
	for _, tc := range []struct {
		name   string
		mutate func(p []byte, h *vnetHdr) []byte
	}{
		{"GSO type of the other family", func(p []byte, h *vnetHdr) []byte { h.gsoType = unix.VIRTIO_NET_HDR_GSO_TCPV6; return p }},
		{"UDP GSO", func(p []byte, h *vnetHdr) []byte { h.gsoType = unix.VIRTIO_NET_HDR_GSO_UDP_L4; return p }},
		{"csum_start not the header length", func(p []byte, h *vnetHdr) []byte { h.csumStart = 24; return p }},
		{"csum_offset not TCP's", func(p []byte, h *vnetHdr) []byte { h.csumOffset = 6; return p }},
		{"gso_size 0", func(p []byte, h *vnetHdr) []byte { h.gsoSize = 0; return p }},
		{"TCP data offset too small", func(p []byte, h *vnetHdr) []byte { p[20+tcpOff] = 4 << 4; return p }},
		{"no payload", func(p []byte, h *vnetHdr) []byte { return p[:20+tcpMinLen+tsOpt] }},
		{"truncated header", func(p []byte, h *vnetHdr) []byte { return p[:30] }},
		{"empty", func(p []byte, h *vnetHdr) []byte { return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hh := h
			p := tc.mutate(bytes.Clone(frame), &hh)
			var ts tso
			if err := ts.start(p, hh); err == nil {
				t.Errorf("accepted")
			}
			if ts.active() {
				t.Errorf("left active")
			}
		})
	}
}

func TestCompleteChecksum(t *testing.T) {
	// A UDP datagram left CHECKSUM_PARTIAL: the field holds the
	// pseudo-header sum.
	p := []byte{0x45, 0, 0, 32, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 244, 1, 10, 10, 244, 2, 10,
		0x9c, 0x40, 0x27, 0x0f, 0, 12, 0, 0, 'l', 'o', 'o', 'm'}
	src, dst := addrs(p, false)
	binary.BigEndian.PutUint16(p[26:], fold(sum(dst, sum(src, 17+12))))
	if err := completeChecksum(p, 20, 6); err != nil {
		t.Fatal(err)
	}
	ps := append(append(append([]byte{}, src...), dst...), 0, 17, 0, 12)
	if refChecksum(ps, p[20:]) != 0 {
		t.Error("completed checksum does not verify")
	}
	if completeChecksum(p, 20, 20) == nil || completeChecksum(p, -1, 0) == nil {
		t.Error("out-of-range checksum positions accepted")
	}
}

// segments returns the plain packets a stream of payload sizes makes,
// with consecutive IPv4 identifications as a sender gives them.
func segments(v6 bool, sizes ...int) [][]byte {
	var pkts [][]byte
	seq := uint32(1000)
	for i, n := range sizes {
		p := tcpPacket(v6, seq, tcpACK, payloadOf(n))
		if !v6 {
			binary.BigEndian.PutUint16(p[ipv4ID:], 0xfff0+uint16(i))
			p[ipv4Csum], p[ipv4Csum+1] = 0, 0
			binary.BigEndian.PutUint16(p[ipv4Csum:], Checksum(p[:20], 0))
		}
		pkts = append(pkts, p)
		seq += uint32(n)
	}
	return pkts
}

// clonePkts copies packets (coalesce rewrites headers in place).
func clonePkts(pkts [][]byte) [][]byte {
	out := make([][]byte, len(pkts))
	for i, p := range pkts {
		out[i] = bytes.Clone(p)
	}
	return out
}

func TestCoalesce(t *testing.T) {
	other := func(p []byte, v6 bool, off int, b byte) []byte { // a packet with one header byte changed
		q := bytes.Clone(p)
		q[off] ^= b
		l3 := 20
		if v6 {
			l3 = ipv6HdrLen
		} else {
			q[ipv4Csum], q[ipv4Csum+1] = 0, 0
			binary.BigEndian.PutUint16(q[ipv4Csum:], Checksum(q[:20], 0))
		}
		fixTCPChecksum(q, l3, v6)
		return q
	}
	for _, v6 := range []bool{false, true} {
		l3 := 20
		if v6 {
			l3 = ipv6HdrLen
		}
		five := segments(v6, mss, mss, mss, mss, 100)
		psh := clonePkts(five)
		psh[2][l3+tcpFlags] |= tcpPSH
		fixTCPChecksum(psh[2], l3, v6)
		corrupt := clonePkts(five)
		corrupt[2][len(corrupt[2])-1] ^= 1
		corruptFirst := clonePkts(five)
		corruptFirst[0][len(corruptFirst[0])-1] ^= 1
		big := segments(v6, 60000)[0]
		var many []int // 46 full segments: one more than fits 64 KiB
		for range 46 {
			many = append(many, mss)
		}
		udp := []byte{0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 244, 1, 10, 10, 244, 2, 10, 0, 1, 0, 2, 0, 8, 0, 0}
		ttl := ipv4TTL
		if v6 {
			ttl = 7
		}
		tests := []struct {
			name string
			pkts [][]byte
			runs []int // packets per run
		}{
			{"one flow in order", five, []int{5}},
			{"a lone segment", five[:1], []int{1}},
			{"out of order", [][]byte{five[0], five[2], five[1]}, []int{1, 1, 1}},
			{"duplicate", [][]byte{five[0], five[0]}, []int{1, 1}},
			{"short segment ends the run", [][]byte{five[0], five[4], five[1]}, []int{1, 1, 1}},
			{"larger after the first", segments(v6, 100, mss), []int{1, 1}},
			{"PSH ends the run", psh, []int{3, 2}},
			{"corrupt segment goes alone", corrupt, []int{2, 1, 2}},
			{"corrupt first segment goes alone", corruptFirst, []int{1, 4}},
			{"64 KiB at most", segments(v6, many...), []int{45, 1}},
			{"other TTL", [][]byte{five[0], other(five[1], v6, ttl, 1)}, []int{1, 1}},
			{"other ack", [][]byte{five[0], other(five[1], v6, l3+tcpAck, 1)}, []int{1, 1}},
			{"other window", [][]byte{five[0], other(five[1], v6, l3+15, 1)}, []int{1, 1}},
			{"other options", [][]byte{five[0], other(five[1], v6, l3+tcpMinLen+7, 1)}, []int{1, 1}},
			{"other port", [][]byte{five[0], other(five[1], v6, l3+1, 1)}, []int{1, 1}},
			{"not TCP", [][]byte{udp, five[0], udp}, []int{1, 1, 1}},
			{"a whole 64 KiB packet", [][]byte{big}, []int{1}},
		}
		if !v6 {
			// Merging rewrites the IPv4 header: a segment whose header
			// checksum is wrong would come out repaired.
			badIPSum := clonePkts(five)
			badIPSum[2][ipv4Csum] ^= 1
			tests = append(tests, struct {
				name string
				pkts [][]byte
				runs []int
			}{"bad IPv4 header checksum goes alone", badIPSum, []int{2, 1, 2}})
		}
		for _, tc := range tests {
			t.Run(map[bool]string{false: "v4 ", true: "v6 "}[v6]+tc.name, func(t *testing.T) {
				pkts := clonePkts(tc.pkts)
				orig := clonePkts(tc.pkts)
				runs, hdrs := coalesce(pkts, nil, nil)
				var got []int
				for _, r := range runs {
					got = append(got, r.n)
				}
				if !equalInts(got, tc.runs) {
					t.Fatalf("runs %v, want %v", got, tc.runs)
				}
				// Each run must cut back into exactly its original packets.
				for k, r := range runs {
					var h vnetHdr
					h.decode(hdrs[k][:])
					if r.n == 1 {
						if h != (vnetHdr{}) {
							t.Errorf("run %d: single packet with virtio header %+v", k, h)
						}
						if !bytes.Equal(pkts[r.first], orig[r.first]) {
							t.Errorf("run %d: single packet modified", k)
						}
						continue
					}
					frame := bytes.Clone(pkts[r.first])
					for _, p := range pkts[r.first+1 : r.first+r.n] {
						frame = append(frame, p[r.seg.hdrLen:]...)
					}
					if r.bytes != len(frame) {
						t.Errorf("run %d: bytes %d, frame %d", k, r.bytes, len(frame))
					}
					var ts tso
					if err := ts.start(frame, h); err != nil {
						t.Fatalf("run %d: merged frame rejected: %v (header %+v)", k, err, h)
					}
					// CHECKSUM_PARTIAL: the field holds the pseudo-header sum.
					src, dst := addrs(frame, v6)
					if binary.BigEndian.Uint16(frame[l3+tcpCsum:]) != fold(pseudoHeader(src, dst, protoTCP, len(frame)-l3)) {
						t.Errorf("run %d: TCP checksum field is not the pseudo-header sum", k)
					}
					if !v6 && refChecksum(frame[:20]) != 0 {
						t.Errorf("run %d: IPv4 header checksum wrong", k)
					}
					buf := make([]byte, 2*MaxPacket)
					used, i := 0, r.first
					ts.emit(buf, r.n+1, func(n int) {
						if i >= r.first+r.n {
							t.Errorf("run %d: more segments than packets", k)
							return
						}
						if !bytes.Equal(buf[used:used+n], orig[i]) {
							t.Errorf("run %d: segment %d differs from the original packet", k, i-r.first)
						}
						used += n
						i++
					})
					if i != r.first+r.n {
						t.Errorf("run %d: %d segments, want %d", k, i-r.first, r.n)
					}
				}
			})
		}
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestParseSeg(t *testing.T) {
	ok := tcpPacket(false, 1, tcpACK, payloadOf(10))
	frag := bytes.Clone(ok)
	frag[ipv4Flags] |= 0x20 // MF
	opts := append([]byte{0x46}, ok[1:]...)
	syn := tcpPacket(false, 1, tcpACK|0x02, payloadOf(10))
	empty := tcpPacket(false, 1, tcpACK, nil)
	lenMismatch := append(bytes.Clone(ok), 0)
	v6ext := tcpPacket(true, 1, tcpACK, payloadOf(10))
	v6ext[ipv6Next] = 0 // hop-by-hop options first
	for _, tc := range []struct {
		name string
		p    []byte
		ok   bool
	}{
		{"plain segment", ok, true},
		{"IPv6 segment", tcpPacket(true, 1, tcpACK|tcpPSH, payloadOf(10)), true},
		{"fragment", frag, false},
		{"IPv4 options", opts, false},
		{"SYN", syn, false},
		{"no payload", empty, false},
		{"trailing bytes", lenMismatch, false},
		{"IPv6 extension header", v6ext, false},
		{"short", ok[:19], false},
	} {
		if got := parseSeg(tc.p).ok; got != tc.ok {
			t.Errorf("%s: ok %v, want %v", tc.name, got, tc.ok)
		}
	}
}

func BenchmarkChecksum(b *testing.B) {
	buf := payloadOf(65536)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		Checksum(buf, 0)
	}
}
