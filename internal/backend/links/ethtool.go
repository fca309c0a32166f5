package links

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Feature names as ethtool -k prints them.
const (
	// FeatureTxChecksum is NETIF_F_HW_CSUM: the device (or the stack on
	// its behalf, late) fills in the L4 checksum of packets it sends.
	FeatureTxChecksum = "tx-checksum-ip-generic"
)

// ethtool ABI constants that golang.org/x/sys/unix does not define
// (include/uapi/linux/ethtool.h).
const (
	ethSSFeatures = 4  // ETH_SS_FEATURES: the string set naming feature bits
	ethGStringLen = 32 // ETH_GSTRING_LEN
)

// ethtool issues SIOCETHTOOL requests through one socket opened inside the
// namespace to program: the ioctl acts on the devices of the namespace of
// the socket it is made on, not of the calling thread.
type ethtool struct {
	fd int
}

// newEthtool opens the ioctl socket in the namespace at path ("" = own).
func newEthtool(path string) (*ethtool, error) {
	if path == "" {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("ethtool socket: %w", err)
		}
		return &ethtool{fd: fd}, nil
	}
	type result struct {
		fd  int
		err error
	}
	res := make(chan result, 1)
	go func() {
		// This goroutine's thread enters the namespace and is never
		// unlocked: the runtime ends a locked thread with its goroutine,
		// so no other goroutine can ever run in the namespace.
		runtime.LockOSThread()
		h, err := netns.GetFromPath(path)
		if err != nil {
			res <- result{err: fmt.Errorf("open namespace %s: %w", path, err)}
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			res <- result{err: fmt.Errorf("enter namespace %s: %w", path, err)}
			return
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			err = fmt.Errorf("ethtool socket in %s: %w", path, err)
		}
		res <- result{fd: fd, err: err}
	}()
	r := <-res
	if r.err != nil {
		return nil, r.err
	}
	return &ethtool{fd: r.fd}, nil
}

func (e *ethtool) close() error { return unix.Close(e.fd) }

// ifreqData is struct ifreq with ifr_data set: the request buffer the
// SIOCETHTOOL ioctl reads and writes. The pointer stays an unsafe.Pointer
// so the garbage collector keeps the buffer alive during the call.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [unsafe.Sizeof(unix.Ifreq{}) - unix.IFNAMSIZ - unsafe.Sizeof(uintptr(0))]byte
}

// ioctl runs one ethtool command; buf starts with the command number and is
// updated in place with the kernel's answer.
func (e *ethtool) ioctl(ifname string, buf []byte) error {
	if len(ifname) >= unix.IFNAMSIZ {
		return fmt.Errorf("interface name %q is too long", ifname)
	}
	ifr := ifreqData{data: unsafe.Pointer(&buf[0])}
	copy(ifr.name[:], ifname)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(e.fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	runtime.KeepAlive(buf)
	if errno != 0 {
		return errno
	}
	return nil
}

var ne = binary.NativeEndian

// featureIndex finds the bit number of the named feature in the device's
// ETH_SS_FEATURES string set.
func (e *ethtool) featureIndex(ifname, feature string) (bit, count int, err error) {
	// struct ethtool_sset_info { u32 cmd, reserved; u64 sset_mask; u32 data[1]; }
	info := make([]byte, 20)
	ne.PutUint32(info[0:], unix.ETHTOOL_GSSET_INFO)
	ne.PutUint64(info[8:], 1<<ethSSFeatures)
	if err := e.ioctl(ifname, info); err != nil {
		return 0, 0, fmt.Errorf("ethtool %s: count features: %w", ifname, err)
	}
	if ne.Uint64(info[8:])&(1<<ethSSFeatures) == 0 {
		return 0, 0, fmt.Errorf("ethtool %s: the kernel reports no feature names", ifname)
	}
	count = int(ne.Uint32(info[16:]))

	// struct ethtool_gstrings { u32 cmd, string_set, len; u8 data[len*32]; }
	strs := make([]byte, 12+count*ethGStringLen)
	ne.PutUint32(strs[0:], unix.ETHTOOL_GSTRINGS)
	ne.PutUint32(strs[4:], ethSSFeatures)
	ne.PutUint32(strs[8:], uint32(count))
	if err := e.ioctl(ifname, strs); err != nil {
		return 0, 0, fmt.Errorf("ethtool %s: read feature names: %w", ifname, err)
	}
	for i := range count {
		s := strs[12+i*ethGStringLen : 12+(i+1)*ethGStringLen]
		if n := bytes.IndexByte(s, 0); n >= 0 {
			s = s[:n]
		}
		if string(s) == feature {
			return i, count, nil
		}
	}
	return 0, 0, fmt.Errorf("ethtool %s: the kernel knows no feature %q", ifname, feature)
}

// errFeatureFixed is returned when the kernel refuses to change a feature.
var errFeatureFixed = errors.New("the device cannot change this feature")

// feature reports whether the named feature is active on the device.
func (e *ethtool) feature(ifname, feature string) (bool, error) {
	bit, count, err := e.featureIndex(ifname, feature)
	if err != nil {
		return false, err
	}
	// struct ethtool_gfeatures { u32 cmd, size; struct { u32 available,
	// requested, active, never_changed; } features[size]; }
	blocks := (count + 31) / 32
	buf := make([]byte, 8+16*blocks)
	ne.PutUint32(buf[0:], unix.ETHTOOL_GFEATURES)
	ne.PutUint32(buf[4:], uint32(blocks))
	if err := e.ioctl(ifname, buf); err != nil {
		return false, fmt.Errorf("ethtool %s: read features: %w", ifname, err)
	}
	active := ne.Uint32(buf[8+16*(bit/32)+8:])
	return active&(1<<(bit%32)) != 0, nil
}

// setFeature turns the named feature on or off, as `ethtool -K <dev>
// <feature> on|off` does, and checks that the kernel did it.
func (e *ethtool) setFeature(ifname, feature string, on bool) error {
	bit, count, err := e.featureIndex(ifname, feature)
	if err != nil {
		return err
	}
	// struct ethtool_sfeatures { u32 cmd, size; struct { u32 valid,
	// requested; } features[size]; }
	blocks := (count + 31) / 32
	buf := make([]byte, 8+8*blocks)
	ne.PutUint32(buf[0:], unix.ETHTOOL_SFEATURES)
	ne.PutUint32(buf[4:], uint32(blocks))
	off := 8 + 8*(bit/32)
	ne.PutUint32(buf[off:], 1<<(bit%32)) // valid: only this bit changes
	if on {
		ne.PutUint32(buf[off+4:], 1<<(bit%32))
	}
	if err := e.ioctl(ifname, buf); err != nil {
		return fmt.Errorf("ethtool -K %s %s %s: %w", ifname, feature, onOff(on), err)
	}
	got, err := e.feature(ifname, feature)
	if err != nil {
		return err
	}
	if got != on {
		return fmt.Errorf("ethtool -K %s %s %s: %w", ifname, feature, onOff(on), errFeatureFixed)
	}
	return nil
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// ReadFeature reports whether the named feature (as `ethtool -k` names it,
// e.g. FeatureTxChecksum) is active on device ifname in the namespace at
// netnsPath ("" = the caller's own). It changes nothing.
func ReadFeature(netnsPath, ifname, feature string) (bool, error) {
	e, err := newEthtool(netnsPath)
	if err != nil {
		return false, err
	}
	defer e.close()
	return e.feature(ifname, feature)
}
