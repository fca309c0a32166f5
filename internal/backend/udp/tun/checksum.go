package tun

import (
	"encoding/binary"
	"math/bits"
)

// The Internet checksum (RFC 1071) is the ones' complement of the ones'
// complement sum of the data taken as big-endian 16-bit words. Because
// 2^16 ≡ 1 (mod 2^16-1), a sum of big-endian 64-bit words folded down to
// 16 bits is the same sum, so sum reads eight bytes at a time.

// sum adds b to the running ones' complement sum acc and returns the new,
// unfolded sum. b must start at an even offset of the checksummed data
// (an odd tail byte is the high byte of its word).
func sum(b []byte, acc uint64) uint64 {
	var carries, c uint64
	for len(b) >= 32 {
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[0:8]), 0)
		carries += c
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[8:16]), 0)
		carries += c
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[16:24]), 0)
		carries += c
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b[24:32]), 0)
		carries += c
		b = b[32:]
	}
	for len(b) >= 8 {
		acc, c = bits.Add64(acc, binary.BigEndian.Uint64(b), 0)
		carries += c
		b = b[8:]
	}
	var tail uint64
	if len(b) >= 4 {
		tail += uint64(binary.BigEndian.Uint32(b))
		b = b[4:]
	}
	if len(b) >= 2 {
		tail += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		tail += uint64(b[0]) << 8
	}
	acc, c = bits.Add64(acc, tail, 0)
	carries += c
	// End-around carry: carries is small, so adding it back can carry at
	// most once more, into an acc that is then far from overflowing.
	acc, c = bits.Add64(acc, carries, 0)
	return acc + c
}

// fold reduces an unfolded sum to 16 bits (not complemented).
func fold(acc uint64) uint16 {
	acc = acc>>32 + acc&0xffffffff
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}

// Checksum returns the Internet checksum of b with the unfolded initial sum:
// the value to store in a header's checksum field.
func Checksum(b []byte, initial uint64) uint16 { return ^fold(sum(b, initial)) }

// pseudoHeader returns the unfolded sum of the IPv4 or IPv6 pseudo-header
// for a transport segment of length n: source and destination address
// (both of src's length), protocol and length.
func pseudoHeader(src, dst []byte, proto uint8, n int) uint64 {
	return sum(dst, sum(src, uint64(proto)+uint64(n)))
}
