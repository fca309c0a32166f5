package tun

import (
	"bytes"
	"testing"
)

// Packets received from peers are outside input: whatever they hold,
// coalesce must not panic, must account for every packet once and in
// order, and what it merges must cut back into the packets it merged.
func FuzzCoalesce(f *testing.F) {
	seed := segments(false, mss, mss, 100)
	f.Add(bytes.Join(seed, nil), uint16(len(seed[0])), uint16(len(seed[1])))
	seed6 := segments(true, mss, mss)
	f.Add(bytes.Join(seed6, nil), uint16(len(seed6[0])), uint16(len(seed6[1])))
	f.Fuzz(func(t *testing.T, data []byte, cut1, cut2 uint16) {
		// Cut data into up to three packets at the fuzzed offsets.
		var pkts [][]byte
		rest := data
		for _, c := range []int{int(cut1), int(cut2)} {
			if c > 0 && c < len(rest) {
				pkts = append(pkts, bytes.Clone(rest[:c]))
				rest = rest[c:]
			}
		}
		if len(rest) > 0 {
			pkts = append(pkts, bytes.Clone(rest))
		}
		orig := clonePkts(pkts)
		runs, hdrs := coalesce(pkts, nil, nil)
		next := 0
		for k, r := range runs {
			if r.first != next || r.n < 1 {
				t.Fatalf("run %d: %+v, want it to start at packet %d", k, r, next)
			}
			next += r.n
			if r.n == 1 {
				continue
			}
			var h vnetHdr
			h.decode(hdrs[k][:])
			frame := bytes.Clone(pkts[r.first])
			for _, p := range pkts[r.first+1 : r.first+r.n] {
				frame = append(frame, p[r.seg.hdrLen:]...)
			}
			var ts tso
			if err := ts.start(frame, h); err != nil {
				t.Fatalf("run %d: merged frame rejected: %v", k, err)
			}
			buf := make([]byte, 2*MaxPacket)
			used, i := 0, r.first
			ts.emit(buf, r.n+1, func(n int) {
				if i < r.first+r.n && !bytes.Equal(buf[used:used+n], orig[i]) {
					t.Errorf("run %d: packet %d does not cut back", k, i)
				}
				used += n
				i++
			})
			if i != r.first+r.n {
				t.Errorf("run %d: cut into %d packets, merged %d", k, i-r.first, r.n)
			}
		}
		if next != len(pkts) {
			t.Fatalf("runs cover %d packets of %d", next, len(pkts))
		}
	})
}

// Frames read from the TUN come from the kernel, but a parser must not
// trust them either: any frame either becomes packets within the arena or
// is counted as malformed.
func FuzzConsume(f *testing.F) {
	frame, h := tsoFrame(false, tcpACK|tcpPSH, payloadOf(5000))
	hdr := make([]byte, vnetHdrLen)
	h.encode(hdr)
	f.Add(append(hdr, frame...))
	frame6, h6 := tsoFrame(true, tcpACK, payloadOf(3000))
	h6.encode(hdr)
	f.Add(append(bytes.Clone(hdr), frame6...))
	f.Add(append(make([]byte, vnetHdrLen), 0x45, 0, 0, 20))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > vnetHdrLen+MaxPacket {
			return
		}
		r := NewReader(16)
		r.consume(bytes.Clone(data), true)
		for r.pending.active() {
			before := len(r.pkts)
			r.pkts, r.used = r.pkts[:0], 0
			r.emit()
			if len(r.pkts) == 0 && before == 0 {
				t.Fatal("pending super-packet makes no progress")
			}
		}
		total := 0
		for _, p := range r.pkts {
			total += len(p)
		}
		if total > len(r.arena) {
			t.Fatalf("%d bytes of packets from a %d-byte arena", total, len(r.arena))
		}
		if len(r.pkts) == 0 && r.Malformed == 0 && len(data) > vnetHdrLen {
			t.Fatalf("a %d-byte frame vanished without being counted", len(data))
		}
	})
}
