package tun

// Kernel tests, each in a namespace of its own (testnet): a TUN "tun0" with
// 10.99.0.1/24, and the route 10.99.1.0/24 through it, so datagrams a
// local socket sends to 10.99.1.1 come out of the device.

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/internal/nstest"
	"github.com/vishvananda/netlink"
)

func openIn(t *testing.T, n ns.NetNS, cfg Config) *Device {
	t.Helper()
	var d *Device
	err := n.Do(func(ns.NetNS) error {
		var err error
		d, err = Open(cfg)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func setUp(t *testing.T, h *netlink.Handle) netlink.Link {
	t.Helper()
	l := nstest.Up(t, h, "tun0")
	nstest.Addr(t, h, l, "10.99.0.1/24")
	nstest.Route(t, h, "10.99.1.0/24", "", l, 0)
	return l
}

func TestDeviceLifecycle(t *testing.T) {
	n, h := nstest.NewNode(t, "tun")
	d := openIn(t, n, Config{Name: "tun0", Queues: 2, Offload: true})
	if !d.Offload() || len(d.Queues()) != 2 || d.Name() != "tun0" {
		t.Fatalf("device %+v: want 2 queues with offloads", d)
	}
	l := setUp(t, h)
	if d.Gone() {
		t.Fatal("Gone on a live device")
	}

	// Persistent: closing keeps the device, opening again attaches to it.
	d.Close()
	if _, err := h.LinkByIndex(l.Attrs().Index); err != nil {
		t.Fatalf("device gone after Close: %v", err)
	}
	d = openIn(t, n, Config{Name: "tun0", Queues: 2, Offload: true})
	if l2, err := h.LinkByName("tun0"); err != nil || l2.Attrs().Index != l.Attrs().Index {
		t.Fatalf("re-open made another device: %v", err)
	}

	// A blocked reader learns of the deletion.
	read := make(chan error, 1)
	go func() {
		_, err := d.Queues()[0].Read(NewReader(8))
		read <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := h.LinkDel(l); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-read:
		if !errors.Is(err, ErrGone) {
			t.Errorf("Read after deletion: %v, want ErrGone", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read still blocked after the device was deleted")
	}
	if !d.Gone() {
		t.Error("Gone false after deletion")
	}

	// Close wakes a blocked reader with os.ErrClosed.
	d = openIn(t, n, Config{Name: "tun0"})
	go func() {
		_, err := d.Queues()[0].Read(NewReader(8))
		read <- err
	}()
	time.Sleep(50 * time.Millisecond)
	d.Close()
	select {
	case err := <-read:
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("Read after Close: %v, want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read still blocked after Close")
	}
}

// A device of that name that is not multi-queue (as flanneld makes it) is
// refused with an error that says what to do.
func TestOpenRefusesForeignDevice(t *testing.T) {
	n, _ := nstest.NewNode(t, "tun")
	err := n.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tun0"}, Mode: netlink.TUNTAP_MODE_TUN,
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_ONE_QUEUE}); err != nil {
			return err
		}
		_, err := Open(Config{Name: "tun0"})
		return err
	})
	if err == nil {
		t.Fatal("attached to a single-queue device")
	}
	t.Log(err)
}

// Datagrams a local socket sends through the device are read as whole
// packets, with the checksum the kernel left to us completed; packets
// written to the device reach a local socket. Both with and without
// offloads.
func TestReadWrite(t *testing.T) {
	for _, offload := range []bool{true, false} {
		t.Run(map[bool]string{true: "offload", false: "plain"}[offload], func(t *testing.T) {
			n, h := nstest.NewNode(t, "tun")
			d := openIn(t, n, Config{Name: "tun0", Offload: offload})
			if d.Offload() != offload {
				t.Fatalf("Offload %v", d.Offload())
			}
			setUp(t, h)
			// A TUN's operational state is "unknown" once the kernel's
			// link watcher has activated it (before, its queue drops).
			nstest.Eventually(t, 5*time.Second, "tun0 active", func() bool {
				l, err := h.LinkByName("tun0")
				return err == nil && (l.Attrs().OperState == netlink.OperUnknown || l.Attrs().OperState == netlink.OperUp)
			})

			var conn *net.UDPConn
			err := n.Do(func(ns.NetNS) error {
				var err error
				conn, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 99, 0, 1), Port: 7000})
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			const count = 20
			for i := range count {
				msg := []byte{'l', 'o', 'o', 'm', byte(i)}
				if _, err := conn.WriteToUDP(msg, &net.UDPAddr{IP: net.IPv4(10, 99, 1, 1), Port: 9000}); err != nil {
					t.Fatal(err)
				}
			}
			r := NewReader(count)
			var got [][]byte
			for len(got) < count {
				pkts, err := d.Queues()[0].Read(r)
				if err != nil {
					t.Fatal(err)
				}
				for _, p := range pkts {
					if p[0]>>4 == 4 && p[9] == 17 {
						got = append(got, append([]byte(nil), p...))
					}
				}
			}
			for i, p := range got {
				if len(p) != 20+8+5 || p[32] != byte(i) {
					t.Fatalf("packet %d: % x", i, p)
				}
				src, dst := addrs(p, false)
				ps := append(append(append([]byte{}, src...), dst...), 0, 17, 0, 13)
				if binary.BigEndian.Uint16(p[26:]) == 0 || refChecksum(ps, p[20:]) != 0 {
					t.Errorf("packet %d: UDP checksum not complete: % x", i, p)
				}
			}

			// Write a datagram for the local socket, from 10.99.1.1:9000.
			reply := append([]byte(nil), got[0]...)
			copy(reply[12:16], []byte{10, 99, 1, 1})
			copy(reply[16:20], []byte{10, 99, 0, 1})
			binary.BigEndian.PutUint16(reply[20:], 9000)
			binary.BigEndian.PutUint16(reply[22:], 7000)
			reply[10], reply[11] = 0, 0
			binary.BigEndian.PutUint16(reply[10:], Checksum(reply[:20], 0))
			reply[26], reply[27] = 0, 0
			src, dst := addrs(reply, false)
			binary.BigEndian.PutUint16(reply[26:], refChecksum(append(append(append([]byte{}, src...), dst...), 0, 17, 0, 13), reply[20:]))
			w, _, err := d.Queues()[0].Write(NewWriter(), [][]byte{reply})
			if err != nil || w != 1 {
				t.Fatalf("Write: %d, %v", w, err)
			}
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			buf := make([]byte, 64)
			m, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("the written packet did not arrive: %v", err)
			}
			if from != netip.MustParseAddrPort("10.99.1.1:9000") || string(buf[:4]) != "loom" {
				t.Errorf("received % x from %v", buf[:m], from)
			}
		})
	}
}
