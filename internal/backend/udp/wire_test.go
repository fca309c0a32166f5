package udp

// The wire format, byte by byte (topology in topo_test.go): pod p1 sends a
// UDP probe it builds to the last byte (raw socket, header included) to
// p2; a packet socket in rt, on n2's bridge port v2, captures the datagram
// the udp backend sends, and p2 receives the probe.
//
// The datagram must go from 198.18.0.11:8285 to 198.18.0.12:8285, and its
// payload must be exactly the pod's packet, as n1's kernel forwarded it to
// flannel0: TTL (hop limit) one less and, for IPv4, the header checksum
// updated; nothing else changed, nothing added.

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/udp/tun"
	"golang.org/x/sys/unix"
)

// probe builds an IPv4 or IPv6 UDP packet from src:40000 to dst:9999 with
// payload, every field set by hand and every checksum correct, so the
// kernel sends it as is.
func probe(src, dst netip.Addr, payload []byte) []byte {
	udpLen := 8 + len(payload)
	var p []byte
	var pseudo []byte
	if src.Is4() {
		p = make([]byte, 20+udpLen)
		p[0] = 0x45
		p[1] = 0x10 // TOS
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		binary.BigEndian.PutUint16(p[4:], 0x4c6f) // ID
		binary.BigEndian.PutUint16(p[6:], 0x4000) // DF
		p[8], p[9] = 64, unix.IPPROTO_UDP
		copy(p[12:], src.AsSlice())
		copy(p[16:], dst.AsSlice())
		binary.BigEndian.PutUint16(p[10:], tun.Checksum(p[:20], 0))
		pseudo = append(append(append([]byte{}, src.AsSlice()...), dst.AsSlice()...), 0, unix.IPPROTO_UDP, byte(udpLen>>8), byte(udpLen))
	} else {
		p = make([]byte, 40+udpLen)
		binary.BigEndian.PutUint32(p[0:], 6<<28|0x20<<20|0x12345) // traffic class, flow label
		binary.BigEndian.PutUint16(p[4:], uint16(udpLen))
		p[6], p[7] = unix.IPPROTO_UDP, 64
		copy(p[8:], src.AsSlice())
		copy(p[24:], dst.AsSlice())
		pseudo = append(append(append([]byte{}, src.AsSlice()...), dst.AsSlice()...), 0, 0, byte(udpLen>>8), byte(udpLen), 0, 0, 0, unix.IPPROTO_UDP)
	}
	l4 := len(p) - udpLen
	u := p[l4:]
	binary.BigEndian.PutUint16(u[0:], 40000)
	binary.BigEndian.PutUint16(u[2:], 9999)
	binary.BigEndian.PutUint16(u[4:], uint16(udpLen))
	copy(u[8:], payload)
	var sum uint32
	all := append(append([]byte{}, pseudo...), u...)
	if len(all)%2 == 1 {
		all = append(all, 0)
	}
	for i := 0; i < len(all); i += 2 {
		sum += uint32(all[i])<<8 | uint32(all[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(u[6:], ^uint16(sum))
	return p
}

// forwarded is p as a router forwards it: TTL or hop limit one less, and
// the IPv4 header checksum to match.
func forwarded(p []byte) []byte {
	q := bytes.Clone(p)
	if q[0]>>4 == 4 {
		q[8]--
		q[10], q[11] = 0, 0
		binary.BigEndian.PutUint16(q[10:], tun.Checksum(q[:20], 0))
	} else {
		q[7]--
	}
	return q
}

// capture opens a packet socket on the named link in n, seeing frames in
// both directions.
func capture(t *testing.T, n ns.NetNS, link int) int {
	t.Helper()
	var fd int
	err := n.Do(func(ns.NetNS) error {
		var err error
		proto := int(htons(unix.ETH_P_ALL))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: link}); err != nil {
			return err
		}
		tv := unix.NsecToTimeval((200 * time.Millisecond).Nanoseconds())
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// outerDatagram is a UDP-in-IPv4 frame seen on the underlay.
type outerDatagram struct {
	src, dst          netip.AddrPort
	payload           []byte
	udpLenOK, ipLenOK bool
}

// parseFrame decodes an Ethernet frame carrying IPv4 and UDP.
func parseFrame(f []byte) (outerDatagram, bool) {
	if len(f) < 14+20+8 || binary.BigEndian.Uint16(f[12:]) != unix.ETH_P_IP {
		return outerDatagram{}, false
	}
	ip := f[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[0]>>4 != 4 || ip[9] != unix.IPPROTO_UDP || len(ip) < ihl+8 {
		return outerDatagram{}, false
	}
	total := int(binary.BigEndian.Uint16(ip[2:]))
	u := ip[ihl:]
	udpLen := int(binary.BigEndian.Uint16(u[4:]))
	end := min(len(ip), total)
	return outerDatagram{
		src:      netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), binary.BigEndian.Uint16(u[0:])),
		dst:      netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), binary.BigEndian.Uint16(u[2:])),
		payload:  u[8:max(8, end-ihl)],
		udpLenOK: udpLen == end-ihl,
		ipLenOK:  total <= len(ip),
	}, true
}

func TestUDPWireFormat(t *testing.T) {
	topo := newTopo(t, topoOptions{})
	n1, n2 := topo.nodes[0], topo.nodes[1]
	sock := capture(t, topo.rt, n2.port.Attrs().Index)

	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
	}{
		{"IPv4", netip.MustParseAddr("10.244.1.10"), netip.MustParseAddr("10.244.2.10")},
		{"IPv6", netip.MustParseAddr("fc00:0:0:1::10"), netip.MustParseAddr("fc00:0:0:2::10")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tag := make([]byte, 8)
			rand.Read(tag)
			payload := []byte("loom udp wire test " + hex.EncodeToString(tag))
			sent := probe(tc.src, tc.dst, payload)

			// p2 listens, so the probe has somewhere to arrive.
			var rx *net.UDPConn
			if err := n2.pod.Do(func(ns.NetNS) error {
				var err error
				rx, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(tc.dst, 9999)))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer rx.Close()

			// Send from p1 until the datagram shows up (the first may
			// wait for neighbour resolution), at most for 10 s.
			var got outerDatagram
			deadline := time.Now().Add(10 * time.Second)
			buf := make([]byte, 1<<16)
		search:
			for time.Now().Before(deadline) {
				sendRaw(t, n1.pod, tc.dst, sent)
				for {
					m, _, err := unix.Recvfrom(sock, buf, 0)
					if err != nil {
						break // timeout: send again
					}
					d, ok := parseFrame(buf[:m])
					if ok && bytes.Contains(d.payload, payload) {
						got = d
						got.payload = bytes.Clone(d.payload)
						break search
					}
				}
			}
			if got.payload == nil {
				t.Fatal("no datagram with the probe seen on the underlay")
			}
			if want := netip.MustParseAddrPort("198.18.0.11:8285"); got.src != want {
				t.Errorf("outer source %v, want n1's PublicIP and port %v", got.src, want)
			}
			if want := netip.MustParseAddrPort("198.18.0.12:8285"); got.dst != want {
				t.Errorf("outer destination %v, want n2's PublicIP and port %v", got.dst, want)
			}
			if !got.udpLenOK || !got.ipLenOK {
				t.Errorf("outer lengths inconsistent (UDP ok %v, IP ok %v)", got.udpLenOK, got.ipLenOK)
			}
			want := forwarded(sent)
			if !bytes.Equal(got.payload, want) {
				t.Errorf("UDP payload is not exactly the pod's packet (TTL less one):\n got  % x\n want % x", got.payload, want)
			}

			rx.SetReadDeadline(time.Now().Add(5 * time.Second))
			msg := make([]byte, 256)
			m, from, err := rx.ReadFromUDPAddrPort(msg)
			if err != nil {
				t.Fatalf("p2 did not receive the probe: %v", err)
			}
			if !bytes.Equal(msg[:m], payload) || from != netip.AddrPortFrom(tc.src, 40000) {
				t.Errorf("p2 received %q from %v, want %q from %v", msg[:m], from, payload, netip.AddrPortFrom(tc.src, 40000))
			}
		})
	}
}

// sendRaw sends a complete IP packet from inside n.
func sendRaw(t *testing.T, n ns.NetNS, dst netip.Addr, pkt []byte) {
	t.Helper()
	err := n.Do(func(ns.NetNS) error {
		fam, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: dst.As16()})
		if dst.Is4() {
			fam, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: dst.As4()}
		}
		// IPPROTO_RAW: the header is ours (IP_HDRINCL, IPV6_HDRINCL).
		fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, pkt, 0, sa)
	})
	if err != nil {
		t.Fatalf("send the probe: %v", err)
	}
}
