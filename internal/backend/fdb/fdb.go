// Package fdb is the reconcile.Kind for static forwarding-database entries
// on VXLAN devices a backend owns: vxlan's
//
//	<peer VtepMAC> dev flannel.1 dst <peer PublicIP> self permanent
//
// which tells the VXLAN driver which underlay address to send a frame to,
// given the frame's destination MAC (the peer's VTEP MAC, which the
// neighbour entry put there).
//
// Design notes.
//
// Kernel objects owned: PERMANENT entries the device itself holds (NTF_SELF,
// `bridge fdb ... self`) for a unicast MAC, on the devices named in
// Config.Devices. Those devices are loom's whole (package links), so every
// such entry on them is loom's, flanneld's leftovers included. Not owned and
// never touched: entries the driver learned (with learning on; Create
// replaces one sitting on a key loom wants), and the entries for the
// all-zeros and for multicast MACs, which carry the default destinations of
// a device configured with a remote or a group (loom's devices have none,
// but an operator's additions there are theirs).
//
// Identity: device name and MAC, as in the driver: only the all-zeros and
// multicast MACs can hold several destinations (`bridge fdb append`), a
// unicast MAC has exactly one, which Update replaces.
//
// Events: the VXLAN driver announces FDB changes on the neighbour event
// group with family AF_BRIDGE. Watch subscribes to it in the Kind's
// namespace; an event about a key loom wants, or about a permanent entry on
// an owned device, asks for a partial sync of that key, unless it shows
// exactly the entry the reconciler wants there (the echo of its own change).
//
// Scale: one entry per peer and address family. A sync dumps the FDB of the
// owned devices only (O(peers)) and sends one request per changed entry.
//
// Kernel quirks: FDB entries survive the device going down and up, unlike
// neighbours, but go with the device when it is deleted.
package fdb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/loomnet/loom/internal/backend/internal/nlwatch"
	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Key is an FDB entry's identity. The MAC is an array rather than its text
// form, so making a key allocates nothing: a sync computes one per entry,
// thousands at a time. Only six-byte MACs are keyed (owned and wanted
// entries are unicast Ethernet MACs).
type Key struct {
	Dev string
	MAC [6]byte
}

// KeyOf is the key of an entry for mac on dev.
func KeyOf(dev string, mac net.HardwareAddr) Key {
	k := Key{Dev: dev}
	copy(k.MAC[:], mac)
	return k
}

// Entry is a permanent FDB entry: frames for MAC leave encapsulated to Dst.
type Entry struct {
	Dev string
	MAC net.HardwareAddr
	Dst netip.Addr
}

// Key returns e's identity.
func (e Entry) Key() Key { return KeyOf(e.Dev, e.MAC) }

// String renders e the way `bridge fdb` does.
func (e Entry) String() string {
	return fmt.Sprintf("%s dev %s dst %s self permanent", e.MAC, e.Dev, e.Dst)
}

// Config configures a Kind.
type Config struct {
	// Handle is a netlink handle bound to the namespace to program.
	// Required; used from the reconciler's goroutine only.
	Handle *netlink.Handle
	// NetNSPath names the same namespace for the event subscription;
	// empty means the agent's own.
	NetNSPath string
	// Devices names the VXLAN devices whose permanent entries are loom's.
	Devices []string
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Kind reads and writes loom's FDB entries. It implements
// reconcile.Kind[Key, Entry] and reconcile.Watcher[Key].
type Kind struct {
	h       *netlink.Handle
	nsPath  string
	devices []string
	log     *slog.Logger

	mu sync.Mutex // guards index and names
	// index maps the names in devices to their link indexes at the last
	// dump, and names back, for requests and for events.
	index map[string]int
	names map[int]string
}

var (
	_ reconcile.Kind[Key, Entry] = (*Kind)(nil)
	_ reconcile.Watcher[Key]     = (*Kind)(nil)
)

// NewKind returns a Kind for cfg.
func NewKind(cfg Config) (*Kind, error) {
	if cfg.Handle == nil {
		return nil, errors.New("fdb: Config.Handle is nil: pass a netlink handle bound to the namespace to program")
	}
	k := &Kind{h: cfg.Handle, nsPath: cfg.NetNSPath, devices: cfg.Devices, log: cfg.Logger,
		index: make(map[string]int), names: make(map[int]string)}
	if k.log == nil {
		k.log = slog.Default()
	}
	return k, nil
}

// Key implements reconcile.Comparer.
func (k *Kind) Key(e Entry) Key { return e.Key() }

// Equal implements reconcile.Comparer: same destination.
func (k *Kind) Equal(want, have Entry) bool { return want.Dst == have.Dst }

// unicast reports whether mac names one station: six bytes, not all zero,
// group bit clear.
func unicast(mac net.HardwareAddr) bool {
	return len(mac) == 6 && mac[0]&1 == 0 && string(mac) != "\x00\x00\x00\x00\x00\x00"
}

// owned reports whether an entry the kernel reported is one of loom's kind.
func owned(n netlink.Neigh) bool {
	return n.Flags&netlink.NTF_SELF != 0 && n.State&netlink.NUD_PERMANENT != 0 && unicast(n.HardwareAddr)
}

// Dump lists the owned entries of the owned devices. A device that does not
// exist has none.
func (k *Kind) Dump() (own, foreign []Entry, err error) {
	index := make(map[string]int)
	names := make(map[int]string)
	for _, dev := range k.devices {
		l, err := k.h.LinkByName(dev)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("look up %s: %w", dev, err)
		}
		idx := l.Attrs().Index
		index[dev], names[idx] = idx, dev
		ns, err := k.h.NeighList(idx, unix.AF_BRIDGE)
		if err != nil {
			return nil, nil, fmt.Errorf("dump FDB of %s: %w", dev, err)
		}
		for _, n := range ns {
			if !owned(n) {
				continue
			}
			e := Entry{Dev: dev, MAC: n.HardwareAddr}
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				e.Dst = ip.Unmap()
			}
			own = append(own, e)
		}
	}
	k.mu.Lock()
	k.index, k.names = index, names
	k.mu.Unlock()
	return own, nil, nil
}

func (k *Kind) toNetlink(e Entry) (*netlink.Neigh, error) {
	k.mu.Lock()
	idx, ok := k.index[e.Dev]
	k.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("device %s does not exist", e.Dev)
	}
	n := &netlink.Neigh{
		LinkIndex:    idx,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		State:        netlink.NUD_PERMANENT,
		HardwareAddr: e.MAC,
	}
	if e.Dst.IsValid() {
		n.IP = e.Dst.AsSlice()
	}
	return n, nil
}

// Create adds e. NLM_F_REPLACE: a learned entry on e's MAC becomes loom's.
func (k *Kind) Create(e Entry) error {
	n, err := k.toNetlink(e)
	if err != nil {
		return fmt.Errorf("add FDB entry %v: %w", e, err)
	}
	if err := k.h.NeighSet(n); err != nil {
		return fmt.Errorf("add FDB entry %v: %w", e, err)
	}
	return nil
}

// Update points the owned entry at e's MAC to e's destination (the driver
// replaces the entry's first destination).
func (k *Kind) Update(e Entry) error {
	n, err := k.toNetlink(e)
	if err != nil {
		return fmt.Errorf("replace FDB entry %v: %w", e, err)
	}
	if err := k.h.NeighSet(n); err != nil {
		return fmt.Errorf("replace FDB entry %v: %w", e, err)
	}
	return nil
}

// Delete removes an owned entry; one already gone is not an error.
func (k *Kind) Delete(e Entry) error {
	n, err := k.toNetlink(e)
	if err != nil {
		return nil // its device is gone, and the entry with it
	}
	if err := k.h.NeighDel(n); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete FDB entry %v: %w", e, err)
	}
	return nil
}

// Watch implements reconcile.Watcher (see the package notes).
func (k *Kind) Watch(ctx context.Context, n reconcile.Notifier[Key]) (wait func(), err error) {
	return nlwatch.Watch(ctx, nlwatch.Config{What: "FDB events", NetNSPath: k.nsPath, Logger: k.log},
		func(ch chan netlink.NeighUpdate, done chan struct{}, ns *netns.NsHandle, onErr func(error)) error {
			return netlink.NeighSubscribeWithOptions(ch, done, netlink.NeighSubscribeOptions{
				Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: nlwatch.ReceiveBuffer})
		},
		func(u netlink.NeighUpdate) { k.notify(n, u) },
		n.TriggerFull)
}

func (k *Kind) notify(n reconcile.Notifier[Key], u netlink.NeighUpdate) {
	if u.Family != unix.AF_BRIDGE || !unicast(u.HardwareAddr) {
		return
	}
	k.mu.Lock()
	dev, known := k.names[u.LinkIndex]
	k.mu.Unlock()
	if !known {
		return
	}
	key := KeyOf(dev, u.HardwareAddr)
	if u.Type == unix.RTM_NEWNEIGH && owned(u.Neigh) {
		e := Entry{Dev: dev, MAC: u.HardwareAddr}
		if ip, ok := netip.AddrFromSlice(u.IP); ok {
			e.Dst = ip.Unmap()
		}
		if reconcile.Satisfied(n, k, e) {
			return // the echo of our own change
		}
	}
	if n.Wants(key) || owned(u.Neigh) {
		n.Trigger(key)
	}
}
