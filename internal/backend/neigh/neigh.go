// Package neigh is the reconcile.Kind for static neighbour (ARP and NDP)
// entries on devices a backend owns: vxlan's
//
//	<peer subnet .0> lladdr <peer VtepMAC> dev flannel.1 nud permanent
//
// which tells the kernel the MAC of the next hop behind each peer route, so
// it never has to ask (nothing on a VXLAN overlay without learning would
// answer).
//
// Design notes.
//
// Kernel objects owned: PERMANENT entries, IPv4 and IPv6, on the devices
// named in Config.Devices. Those devices are loom's whole (package links),
// so every permanent entry on them is loom's: one left by flanneld is adopted
// and corrected, one nobody wants is removed. Entries in any other state
// (INCOMPLETE, REACHABLE, STALE, FAILED, NOARP) are the kernel's cache and
// are neither owned nor foreign: Dump skips them, and Create replaces one
// sitting on a key loom wants. That matters right after someone deletes a
// permanent entry: the next packet makes the kernel resolve the address
// itself, which leaves an INCOMPLETE entry on the key until loom's
// replacement lands.
//
// Identity: device name and IP address. The device is named, not numbered,
// so a key survives the device being re-created under a new index, and a
// backend can name the keys of a peer without asking the kernel.
//
// Events: Watch subscribes to neighbour events in the Kind's namespace. An
// event about a key loom wants, or about a permanent entry on an owned
// device, asks for a partial sync of that key, unless it shows exactly the
// permanent entry the reconciler wants there (the echo of its own change).
//
// Scale: one entry per peer and address family. A sync dumps the neighbour
// tables of the owned devices only (O(peers)) and sends one request per
// changed entry.
//
// Kernel quirks: taking a device down, or changing its MAC, flushes all its
// neighbours, permanent ones included. The backend replays them after it
// puts the device right (see package links), so it does not depend on
// the kernel announcing each flushed entry.
package neigh

import (
	"bytes"
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

// Key is a neighbour entry's identity.
type Key struct {
	Dev string
	IP  netip.Addr
}

// Neigh is a permanent neighbour entry.
type Neigh struct {
	Dev string
	IP  netip.Addr
	MAC net.HardwareAddr
}

// Key returns n's identity.
func (n Neigh) Key() Key { return Key{Dev: n.Dev, IP: n.IP} }

// String renders n the way `ip neigh` does.
func (n Neigh) String() string {
	return fmt.Sprintf("%s lladdr %s dev %s permanent", n.IP, n.MAC, n.Dev)
}

// Config configures a Kind.
type Config struct {
	// Handle is a netlink handle bound to the namespace to program.
	// Required; used from the reconciler's goroutine only.
	Handle *netlink.Handle
	// NetNSPath names the same namespace for the event subscription;
	// empty means the agent's own.
	NetNSPath string
	// Devices names the devices whose permanent entries are loom's.
	Devices []string
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Kind reads and writes loom's neighbour entries. It implements
// reconcile.Kind[Key, Neigh] and reconcile.Watcher[Key].
type Kind struct {
	h       *netlink.Handle
	nsPath  string
	devices []string
	log     *slog.Logger

	mu sync.Mutex // guards index
	// index maps the names in devices to their link indexes at the last
	// dump, and back, for requests and for events (which carry indexes).
	index map[string]int
	names map[int]string
}

var (
	_ reconcile.Kind[Key, Neigh] = (*Kind)(nil)
	_ reconcile.Watcher[Key]     = (*Kind)(nil)
)

// NewKind returns a Kind for cfg.
func NewKind(cfg Config) (*Kind, error) {
	if cfg.Handle == nil {
		return nil, errors.New("neigh: Config.Handle is nil: pass a netlink handle bound to the namespace to program")
	}
	k := &Kind{h: cfg.Handle, nsPath: cfg.NetNSPath, devices: cfg.Devices, log: cfg.Logger,
		index: make(map[string]int), names: make(map[int]string)}
	if k.log == nil {
		k.log = slog.Default()
	}
	return k, nil
}

// Key implements reconcile.Comparer.
func (k *Kind) Key(n Neigh) Key { return n.Key() }

// Equal implements reconcile.Comparer: same link-layer address.
func (k *Kind) Equal(want, have Neigh) bool { return bytes.Equal(want.MAC, have.MAC) }

// Dump lists the permanent entries of the owned devices. A device that does
// not exist has none.
func (k *Kind) Dump() (owned, foreign []Neigh, err error) {
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
		for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			ns, err := k.h.NeighList(idx, family)
			if err != nil {
				return nil, nil, fmt.Errorf("dump neighbours of %s: %w", dev, err)
			}
			for _, n := range ns {
				ip, ok := netip.AddrFromSlice(n.IP)
				if !ok || n.State&netlink.NUD_PERMANENT == 0 {
					continue // the kernel's cache (see the package notes)
				}
				owned = append(owned, Neigh{Dev: dev, IP: ip.Unmap(), MAC: n.HardwareAddr})
			}
		}
	}
	k.mu.Lock()
	k.index, k.names = index, names
	k.mu.Unlock()
	return owned, nil, nil
}

func (k *Kind) toNetlink(n Neigh) (*netlink.Neigh, error) {
	k.mu.Lock()
	idx, ok := k.index[n.Dev]
	k.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("device %s does not exist", n.Dev)
	}
	family := netlink.FAMILY_V4
	if n.IP.Is6() {
		family = netlink.FAMILY_V6
	}
	return &netlink.Neigh{
		LinkIndex:    idx,
		Family:       family,
		State:        netlink.NUD_PERMANENT,
		Type:         unix.RTN_UNICAST,
		IP:           n.IP.AsSlice(),
		HardwareAddr: n.MAC,
	}, nil
}

// Create adds n, replacing a cache entry on its key if there is one.
func (k *Kind) Create(n Neigh) error {
	nn, err := k.toNetlink(n)
	if err != nil {
		return fmt.Errorf("add neighbour %v: %w", n, err)
	}
	if err := k.h.NeighSet(nn); err != nil {
		return fmt.Errorf("add neighbour %v: %w", n, err)
	}
	return nil
}

// Update replaces the entry at n's key.
func (k *Kind) Update(n Neigh) error {
	nn, err := k.toNetlink(n)
	if err != nil {
		return fmt.Errorf("replace neighbour %v: %w", n, err)
	}
	if err := k.h.NeighSet(nn); err != nil {
		return fmt.Errorf("replace neighbour %v: %w", n, err)
	}
	return nil
}

// Delete removes an owned entry; one already gone is not an error.
func (k *Kind) Delete(n Neigh) error {
	nn, err := k.toNetlink(n)
	if err != nil {
		return nil // its device is gone, and the entry with it
	}
	if err := k.h.NeighDel(nn); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete neighbour %v: %w", n, err)
	}
	return nil
}

// Watch implements reconcile.Watcher (see the package notes).
func (k *Kind) Watch(ctx context.Context, n reconcile.Notifier[Key]) (wait func(), err error) {
	return nlwatch.Watch(ctx, nlwatch.Config{What: "neighbour events", NetNSPath: k.nsPath, Logger: k.log},
		func(ch chan netlink.NeighUpdate, done chan struct{}, ns *netns.NsHandle, onErr func(error)) error {
			return netlink.NeighSubscribeWithOptions(ch, done, netlink.NeighSubscribeOptions{
				Namespace: ns, ErrorCallback: onErr, ReceiveBufferSize: nlwatch.ReceiveBuffer})
		},
		func(u netlink.NeighUpdate) { k.notify(n, u) },
		n.TriggerFull)
}

func (k *Kind) notify(n reconcile.Notifier[Key], u netlink.NeighUpdate) {
	if u.Family != netlink.FAMILY_V4 && u.Family != netlink.FAMILY_V6 {
		return // FDB entries (AF_BRIDGE) are package fdb's
	}
	ip, ok := netip.AddrFromSlice(u.IP)
	if !ok {
		return
	}
	k.mu.Lock()
	dev, known := k.names[u.LinkIndex]
	k.mu.Unlock()
	if !known {
		return
	}
	key := Key{Dev: dev, IP: ip.Unmap()}
	permanent := u.State&netlink.NUD_PERMANENT != 0
	if u.Type == unix.RTM_NEWNEIGH && permanent && reconcile.Satisfied(n, k, Neigh{Dev: dev, IP: key.IP, MAC: u.HardwareAddr}) {
		return // the echo of our own change
	}
	if n.Wants(key) || permanent {
		n.Trigger(key)
	}
}
