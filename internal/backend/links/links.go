// Package links is the reconcile.Kind for the devices a backend owns whole:
// today the VXLAN devices flannel.<VNI> and flannel-v6.<VNI>. A Device is
// everything about one of them that decides how its packets look on the
// wire and whether they flow: that it exists, its VXLAN attributes, its MAC
// and MTU, its addresses, its TX checksum offload and its up flag.
//
// Design notes.
//
// Kernel objects owned: every link whose name Config.Owns accepts. Links
// carry no ownership marker the way routes carry a protocol number, so the
// name is the marker: flannel.<VNI> and flannel-v6.<VNI> are flannel's names
// and loom is flannel's drop-in, so on a loom node a link by that name is
// loom's, whoever made it. That is what lets a node move from flanneld to
// loom without deleting anything first: loom adopts flanneld's device and
// changes only what differs (its random MAC, typically). Dump therefore
// reports no foreign links.
//
// Identity: the name. A device whose type or a VXLAN attribute the kernel
// cannot change in place (VNI, port, local address, underlay link, learning,
// GBP) is deleted and created again; MAC, MTU, addresses, offload and the
// up flag are changed in place. Either way the caller must replay what lives
// on the device (neighbours, FDB entries, routes): deleting a device drops
// them, taking it down flushes its neighbours and IPv4 routes, and changing
// its MAC flushes its neighbours, permanent ones included. The vxlan backend
// does that by wrapping Create and Update.
//
// Creation order: the link with its MAC, MTU and VXLAN attributes in one
// request, then the offload setting, then the addresses, and "up" last, so
// that anything that sees the device up sees it complete.
//
// Events: Watch subscribes to link and address events in the Kind's
// namespace. Any event about an owned name (created, deleted, renamed,
// changed, features toggled) or about an address on one asks for a partial
// sync of that device, so a device someone deletes comes back at once.
//
// Scale: one device per address family, whatever the cluster size. A sync is
// one link dump, one address dump and three ethtool ioctls per device.
//
// Kernel quirks, each handled where it bites:
//   - The ethtool ioctl acts in the namespace of the socket it is issued on,
//     so the Kind opens that socket inside the target namespace once.
//   - systemd-udevd with MACAddressPolicy=persistent|random may rewrite the
//     MAC of a new device just after it is created (flannel issue #1795);
//     the MAC is compared at every sync and set back, and the link event of
//     udev's change triggers that sync at once.
//   - IPv6 link-local addresses appear on every device by themselves; they
//     are the kernel's and never compared or removed.
package links

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/loomnet/loom/internal/backend/internal/nlwatch"
	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Device is a VXLAN device in loom's terms.
type Device struct {
	Name          string
	VNI           int
	Port          int        // UDP destination port
	Local         netip.Addr // source address of the encapsulated packets; its family is the underlay's
	UnderlayIndex int        // the link encapsulated packets leave by ("dev eth0"); 0: any
	Learning      bool       // learn FDB entries from received packets
	GBP           bool       // VXLAN Group Based Policy extension
	MAC           net.HardwareAddr
	MTU           int
	Addrs         []netip.Prefix // addresses, link-local ones excepted
	TxChecksum    bool           // FeatureTxChecksum
	Up            bool

	// Read from the kernel by Dump, ignored by Equal and Create.
	Index int
	Type  string // kernel link type; a device loom wants is "vxlan"
}

// String renders d the way `ip -d link` would describe it.
func (d Device) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s vxlan id %d", d.Name, d.VNI)
	if d.Type != "" && d.Type != "vxlan" {
		fmt.Fprintf(&b, " (kernel type %s)", d.Type)
	}
	if d.Local.IsValid() {
		fmt.Fprintf(&b, " local %s", d.Local)
	}
	if d.UnderlayIndex != 0 {
		fmt.Fprintf(&b, " dev #%d", d.UnderlayIndex)
	}
	fmt.Fprintf(&b, " dstport %d", d.Port)
	if !d.Learning {
		b.WriteString(" nolearning")
	}
	if d.GBP {
		b.WriteString(" gbp")
	}
	fmt.Fprintf(&b, " address %s mtu %d addrs %v %s %s", d.MAC, d.MTU, d.Addrs, FeatureTxChecksum, onOff(d.TxChecksum))
	if d.Up {
		b.WriteString(" up")
	} else {
		b.WriteString(" down")
	}
	return b.String()
}

// Config configures a Kind.
type Config struct {
	// Handle is a netlink handle bound to the namespace to program.
	// Required; used from the reconciler's goroutine only.
	Handle *netlink.Handle
	// NetNSPath names the same namespace for the event subscriptions and
	// the ethtool socket; empty means the agent's own namespace.
	NetNSPath string
	// Owns reports whether a link name is loom's (see the package notes).
	// Required.
	Owns func(name string) bool
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Kind reads and writes loom's devices in one namespace. It implements
// reconcile.Kind[string, Device] and reconcile.Watcher[string]. Close it
// when done.
type Kind struct {
	h      *netlink.Handle
	nsPath string
	owns   func(string) bool
	log    *slog.Logger
	eth    *ethtool

	mu sync.Mutex // guards names
	// names maps the index of each owned device to its name, so an
	// address event (which carries only the index) finds its device.
	names map[int]string
}

var (
	_ reconcile.Kind[string, Device] = (*Kind)(nil)
	_ reconcile.Watcher[string]      = (*Kind)(nil)
)

// NewKind returns a Kind for cfg. It opens the ethtool socket in the
// namespace.
func NewKind(cfg Config) (*Kind, error) {
	if cfg.Handle == nil {
		return nil, errors.New("links: Config.Handle is nil: pass a netlink handle bound to the namespace to program")
	}
	if cfg.Owns == nil {
		return nil, errors.New("links: Config.Owns is nil: say which link names are loom's")
	}
	eth, err := newEthtool(cfg.NetNSPath)
	if err != nil {
		return nil, fmt.Errorf("links: %w", err)
	}
	k := &Kind{h: cfg.Handle, nsPath: cfg.NetNSPath, owns: cfg.Owns, log: cfg.Logger, eth: eth, names: make(map[int]string)}
	if k.log == nil {
		k.log = slog.Default()
	}
	return k, nil
}

// Close releases the ethtool socket.
func (k *Kind) Close() error { return k.eth.close() }

// Key implements reconcile.Comparer.
func (k *Kind) Key(d Device) string { return d.Name }

// Equal implements reconcile.Comparer: have is a VXLAN device with every
// attribute of want.
func (k *Kind) Equal(want, have Device) bool {
	return recreateReason(want, have) == "" && inPlaceDiff(want, have) == ""
}

// recreateReason says which attribute that needs a new device differs.
func recreateReason(want, have Device) string {
	var ds []string
	diff := func(name string, w, h any) {
		if w != h {
			ds = append(ds, fmt.Sprintf("%s %v, want %v", name, h, w))
		}
	}
	diff("type", have.Type, "vxlan")
	diff("vni", have.VNI, want.VNI)
	diff("dstport", have.Port, want.Port)
	diff("local", have.Local, want.Local)
	diff("dev", have.UnderlayIndex, want.UnderlayIndex)
	diff("learning", have.Learning, want.Learning)
	diff("gbp", have.GBP, want.GBP)
	return strings.Join(ds, ", ")
}

// inPlaceDiff says which attribute that can change in place differs.
func inPlaceDiff(want, have Device) string {
	var ds []string
	if !bytes.Equal(want.MAC, have.MAC) {
		ds = append(ds, fmt.Sprintf("address %s, want %s", have.MAC, want.MAC))
	}
	if want.MTU != have.MTU {
		ds = append(ds, fmt.Sprintf("mtu %d, want %d", have.MTU, want.MTU))
	}
	if !samePrefixes(want.Addrs, have.Addrs) {
		ds = append(ds, fmt.Sprintf("addrs %v, want %v", have.Addrs, want.Addrs))
	}
	if want.TxChecksum != have.TxChecksum {
		ds = append(ds, fmt.Sprintf("%s %s, want %s", FeatureTxChecksum, onOff(have.TxChecksum), onOff(want.TxChecksum)))
	}
	if want.Up != have.Up {
		ds = append(ds, fmt.Sprintf("up %v, want %v", have.Up, want.Up))
	}
	return strings.Join(ds, ", ")
}

func samePrefixes(a, b []netip.Prefix) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	cmp := func(x, y netip.Prefix) int {
		if c := x.Addr().Compare(y.Addr()); c != 0 {
			return c
		}
		return x.Bits() - y.Bits()
	}
	slices.SortFunc(a, cmp)
	slices.SortFunc(b, cmp)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

// Dump lists the owned devices, with their addresses and offload state.
func (k *Kind) Dump() (owned, foreign []Device, err error) {
	ls, err := k.h.LinkList()
	if err != nil {
		// ErrDumpInterrupted lands here too: the next sync tries again.
		return nil, nil, fmt.Errorf("dump links: %w", err)
	}
	names := make(map[int]string)
	for _, l := range ls {
		if !k.owns(l.Attrs().Name) {
			continue
		}
		d, err := k.read(l)
		if err != nil {
			return nil, nil, err
		}
		owned = append(owned, d)
		names[d.Index] = d.Name
	}
	k.mu.Lock()
	k.names = names
	k.mu.Unlock()
	return owned, nil, nil
}

// read describes one link as a Device.
func (k *Kind) read(l netlink.Link) (Device, error) {
	a := l.Attrs()
	d := Device{
		Name:  a.Name,
		Index: a.Index,
		Type:  l.Type(),
		MAC:   a.HardwareAddr,
		MTU:   a.MTU,
		Up:    a.Flags&net.FlagUp != 0,
	}
	if vx, ok := l.(*netlink.Vxlan); ok {
		d.VNI = vx.VxlanId
		d.Port = vx.Port
		if ip, ok := netip.AddrFromSlice(vx.SrcAddr); ok {
			d.Local = ip.Unmap()
		}
		d.UnderlayIndex = vx.VtepDevIndex
		d.Learning = vx.Learning
		d.GBP = vx.GBP
	}
	addrs, err := k.h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return Device{}, fmt.Errorf("addresses of %s: %w", a.Name, err)
	}
	for _, ad := range addrs {
		ip, ok := netip.AddrFromSlice(ad.IP)
		if !ok || ip.IsLinkLocalUnicast() {
			continue // the kernel's own IPv6 link-local address: not ours to compare
		}
		bits, _ := ad.Mask.Size()
		d.Addrs = append(d.Addrs, netip.PrefixFrom(ip.Unmap(), bits))
	}
	if d.Type == "vxlan" {
		if d.TxChecksum, err = k.eth.feature(a.Name, FeatureTxChecksum); err != nil {
			return Device{}, err
		}
	}
	return d, nil
}

// lookup reads the named device; ok is false when there is none.
func (k *Kind) lookup(name string) (l netlink.Link, d Device, ok bool, err error) {
	l, err = k.h.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil, Device{}, false, nil
	}
	if err != nil {
		return nil, Device{}, false, fmt.Errorf("look up %s: %w", name, err)
	}
	d, err = k.read(l)
	if err != nil {
		return nil, Device{}, false, err
	}
	return l, d, true, nil
}

// Create adds want and configures it. It fails if a link by that name
// appeared since the dump.
func (k *Kind) Create(want Device) error {
	vx := &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{
			Name:         want.Name,
			HardwareAddr: want.MAC,
			MTU:          want.MTU,
		},
		VxlanId:      want.VNI,
		VtepDevIndex: want.UnderlayIndex,
		Port:         want.Port,
		Learning:     want.Learning,
		GBP:          want.GBP,
	}
	if want.Local.IsValid() {
		vx.SrcAddr = want.Local.AsSlice()
	}
	if err := k.h.LinkAdd(vx); err != nil {
		return fmt.Errorf("create %v: %w", want, err)
	}
	l, have, ok, err := k.lookup(want.Name)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("create %v: the device vanished right after its creation", want)
	}
	k.mu.Lock()
	k.names[have.Index] = have.Name
	k.mu.Unlock()
	return k.configure(l, want, have)
}

// Update makes the owned device at want's name equal to want: in place when
// it can, else by deleting and creating it again.
func (k *Kind) Update(want Device) error {
	l, have, ok, err := k.lookup(want.Name)
	if err != nil {
		return err
	}
	if !ok {
		return k.Create(want)
	}
	if reason := recreateReason(want, have); reason != "" {
		k.log.Warn("re-creating a device: attributes that cannot change in place differ",
			"device", want.Name, "differs", reason)
		if err := k.h.LinkDel(l); err != nil && !isNotFound(err) {
			return fmt.Errorf("delete %s to re-create it: %w", want.Name, err)
		}
		return k.Create(want)
	}
	return k.configure(l, want, have)
}

// configure brings the attributes that change in place from have to want,
// in the order the package notes give.
func (k *Kind) configure(l netlink.Link, want, have Device) error {
	if !bytes.Equal(want.MAC, have.MAC) {
		// Also where a MAC rewritten by udev's MACAddressPolicy right
		// after creation is set back (package notes).
		if err := k.h.LinkSetHardwareAddr(l, want.MAC); err != nil {
			return fmt.Errorf("set %s address %s: %w", want.Name, want.MAC, err)
		}
	}
	if want.MTU != have.MTU {
		if err := k.h.LinkSetMTU(l, want.MTU); err != nil {
			return fmt.Errorf("set %s mtu %d: %w", want.Name, want.MTU, err)
		}
	}
	if want.TxChecksum != have.TxChecksum {
		if err := k.eth.setFeature(want.Name, FeatureTxChecksum, want.TxChecksum); err != nil {
			return err
		}
	}
	for _, p := range have.Addrs {
		if !slices.Contains(want.Addrs, p) {
			if err := k.h.AddrDel(l, &netlink.Addr{IPNet: ipNet(p)}); err != nil && !isNotFound(err) {
				return fmt.Errorf("remove address %s from %s: %w", p, want.Name, err)
			}
		}
	}
	for _, p := range want.Addrs {
		if slices.Contains(have.Addrs, p) {
			continue
		}
		a := &netlink.Addr{IPNet: ipNet(p)}
		if p.Addr().Is6() {
			// Usable at once: the address is the node's own subnet
			// anycast, unique by construction, so DAD has nothing to find.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := k.h.AddrAdd(l, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add address %s to %s: %w", p, want.Name, err)
		}
	}
	if want.Up && !have.Up {
		if err := k.h.LinkSetUp(l); err != nil {
			return fmt.Errorf("set %s up: %w", want.Name, err)
		}
	}
	if !want.Up && have.Up {
		if err := k.h.LinkSetDown(l); err != nil {
			return fmt.Errorf("set %s down: %w", want.Name, err)
		}
	}
	return nil
}

// Delete removes an owned device. One already gone is not an error.
func (k *Kind) Delete(have Device) error {
	l, err := k.h.LinkByName(have.Name)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return fmt.Errorf("look up %s to delete it: %w", have.Name, err)
	}
	if err := k.h.LinkDel(l); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %w", have.Name, err)
	}
	return nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EADDRNOTAVAIL)
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Watch implements reconcile.Watcher: link and address events about owned
// devices trigger a partial sync of the device.
func (k *Kind) Watch(ctx context.Context, n reconcile.Notifier[string]) (wait func(), err error) {
	ctx, cancel := context.WithCancel(ctx)
	linkWait, err := nlwatch.Watch(ctx, k.watchConfig("link events"),
		func(ch chan netlink.LinkUpdate, done chan struct{}, ns *netns.NsHandle, onErr func(error)) error {
			return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
				Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: nlwatch.ReceiveBuffer})
		},
		func(u netlink.LinkUpdate) { k.onLink(n, u) },
		n.TriggerFull)
	if err != nil {
		cancel()
		return nil, err
	}
	addrWait, err := nlwatch.Watch(ctx, k.watchConfig("address events"),
		func(ch chan netlink.AddrUpdate, done chan struct{}, ns *netns.NsHandle, onErr func(error)) error {
			return netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{
				Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: nlwatch.ReceiveBuffer})
		},
		func(u netlink.AddrUpdate) {
			k.mu.Lock()
			name, ok := k.names[u.LinkIndex]
			k.mu.Unlock()
			if ok {
				n.Trigger(name)
			}
		},
		n.TriggerFull)
	if err != nil {
		cancel()
		linkWait()
		return nil, err
	}
	return func() { linkWait(); addrWait(); cancel() }, nil
}

func (k *Kind) watchConfig(what string) nlwatch.Config {
	return nlwatch.Config{What: what, NetNSPath: k.nsPath, Logger: k.log}
}

func (k *Kind) onLink(n reconcile.Notifier[string], u netlink.LinkUpdate) {
	a := u.Attrs()
	if a == nil {
		return
	}
	k.mu.Lock()
	old, known := k.names[a.Index]
	switch {
	case u.Header.Type == unix.RTM_DELLINK:
		delete(k.names, a.Index)
	case k.owns(a.Name):
		k.names[a.Index] = a.Name
	default:
		delete(k.names, a.Index) // renamed away from an owned name
	}
	k.mu.Unlock()
	if known && old != a.Name {
		n.Trigger(old)
	}
	if k.owns(a.Name) {
		n.Trigger(a.Name)
	}
}
