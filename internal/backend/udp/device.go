package udp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/loomnet/loom/internal/backend/reconcile"
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/backend/udp/batch"
	"github.com/loomnet/loom/internal/backend/udp/tun"
	"github.com/loomnet/loom/internal/lease"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// device is one incarnation of flannel0: the open TUN and the transmit
// workers reading its queues.
type device struct {
	tun   *tun.Device
	index int            // ifindex
	wg    sync.WaitGroup // its transmit workers
}

// Run opens the sockets and flannel0, starts the data path, and keeps
// flannel0, its addresses and its route as they should be until ctx ends.
// It then stops the data path and returns nil, leaving flannel0 (persistent)
// and its route in place. It fails when the sockets or flannel0 cannot be
// opened at start (port taken, address missing, no TUN support, a foreign
// flannel0) or the route event subscription cannot start. Call SetLocal
// first; Run runs at most once at a time.
func (n *Network) Run(ctx context.Context) error {
	nsh := netns.None()
	if n.cfg.NetNSPath != "" {
		var err error
		if nsh, err = netns.GetFromPath(n.cfg.NetNSPath); err != nil {
			return fmt.Errorf("udp backend: open namespace %s: %w", n.cfg.NetNSPath, err)
		}
		defer nsh.Close()
	}
	// Two handles: a netlink.Handle is not safe for concurrent use, and the
	// device loop and the route reconciler run side by side.
	hd, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("udp backend: netlink handle: %w", err)
	}
	defer hd.Close()
	hr, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return fmt.Errorf("udp backend: netlink handle: %w", err)
	}
	defer hr.Close()
	kind, err := routes.NewKind(routes.Config{
		Handle:       hr,
		NetNSPath:    n.cfg.NetNSPath,
		UnderlayLink: n.cfg.ExtLinkIndex,
		Logger:       n.log,
	})
	if err != nil {
		return fmt.Errorf("udp backend: %w", err)
	}

	conns, err := n.listen()
	if err != nil {
		return err
	}
	closeConns := sync.OnceFunc(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	defer closeConns()
	if err := n.syncDevice(hd, conns); err != nil {
		if n.dev.Load() == nil { // flannel0 cannot be opened at all
			return fmt.Errorf("udp backend: %w", err)
		}
		n.log.Error("configure "+DeviceName+"; retrying at each resync", "err", err)
	}
	n.stats.gso.Store(conns[0].GSO())
	n.stats.gro.Store(conns[0].GRO())
	n.log.Info("udp data path running", "device", DeviceName, "mtu", n.mtu, "listen", conns[0].LocalAddr(),
		"queues", n.workers, "sockets", len(conns),
		"tun_offload", n.stats.tunOffload.Load(), "udp_gso", conns[0].GSO(), "udp_gro", conns[0].GRO())

	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Go(func() { n.receive(c, i) })
	}
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	routeErr := make(chan error, 1)
	wg.Go(func() { routeErr <- n.routes.Run(rctx, kind, n.desiredRoutes) })
	wg.Go(func() { n.watch(rctx, nsh) })

	resync := n.cfg.Resync
	if resync == 0 {
		resync = reconcile.DefaultResync
	}
	timer := time.NewTimer(resync)
	defer timer.Stop()
	var runErr error
	var lastErr string
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-routeErr:
			runErr = err
			break loop
		case <-timer.C:
		case <-n.kick:
		}
		if err := n.syncDevice(hd, conns); err != nil {
			if err.Error() != lastErr {
				n.log.Error("configure "+DeviceName+"; retrying at each resync", "err", err)
			}
			lastErr = err.Error()
		} else {
			lastErr = ""
		}
		timer.Reset(resync)
	}

	rcancel()
	closeConns()
	if d := n.dev.Swap(nil); d != nil {
		n.stopDevice(d)
	}
	wg.Wait()
	if runErr != nil {
		return fmt.Errorf("udp backend: %w", runErr)
	}
	return nil
}

// inNS runs fn on a thread inside the Network's namespace: TUN devices and
// sockets belong to the namespace of the thread that creates them.
func (n *Network) inNS(fn func() error) error {
	if n.cfg.NetNSPath == "" {
		return fn()
	}
	return ns.WithNetNSPath(n.cfg.NetNSPath, func(ns.NetNS) error { return fn() })
}

// listen opens one socket per worker on PublicIP:Port.
func (n *Network) listen() ([]*batch.Conn, error) {
	addr := netip.AddrPortFrom(n.cfg.PublicIP, n.opts.Port)
	var conns []*batch.Conn
	err := n.inNS(func() error {
		for range n.workers {
			c, err := batch.Listen(batch.Config{
				Addr: addr, ReusePort: true, Offload: !n.cfg.noOffload && !n.cfg.noUDPOffload, Buffer: sockBuffer, Logger: n.log,
			})
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	})
	if err == nil {
		return conns, nil
	}
	for _, c := range conns {
		c.Close()
	}
	switch {
	case errors.Is(err, unix.EADDRINUSE):
		return nil, fmt.Errorf("udp backend: %w: UDP port %d on %s is taken (flanneld's udp backend?): stop what holds it, "+
			"or give every node another Backend.Port", err, n.opts.Port, n.cfg.PublicIP)
	case errors.Is(err, unix.EADDRNOTAVAIL):
		return nil, fmt.Errorf("udp backend: %w: %s is not an address of this node: set -iface or -public-ip to a local underlay address", err, n.cfg.PublicIP)
	}
	return nil, fmt.Errorf("udp backend: %w", err)
}

// syncDevice makes flannel0 what it should be: open (re-created if someone
// deleted it), with its MTU, addresses, and up.
func (n *Network) syncDevice(h *netlink.Handle, conns []*batch.Conn) error {
	d := n.dev.Load()
	if d != nil && d.tun.Gone() {
		n.log.Warn(DeviceName + " was deleted; re-creating it")
		n.dev.Store(nil)
		n.stopDevice(d)
		n.stats.recreated.Add(1)
		d = nil
	}
	changed := false
	if d == nil {
		var err error
		if d, err = n.openDevice(h, conns); err != nil {
			return err
		}
		n.dev.Store(d)
		changed = true
	}
	c, err := n.configure(h, d)
	if changed || c {
		// The kernel drops a device's routes with the device, and IPv4
		// ones when it goes down, without always saying so.
		n.routes.TriggerFull()
	}
	return err
}

// openDevice opens flannel0 in the namespace and starts its transmit
// workers.
func (n *Network) openDevice(h *netlink.Handle, conns []*batch.Conn) (*device, error) {
	var td *tun.Device
	err := n.inNS(func() error {
		var err error
		td, err = tun.Open(tun.Config{Name: DeviceName, Queues: n.workers, Offload: !n.cfg.noOffload})
		return err
	})
	if err != nil {
		return nil, err
	}
	link, err := h.LinkByName(DeviceName)
	if err != nil {
		td.Close()
		return nil, fmt.Errorf("look up %s after opening it: %w", DeviceName, err)
	}
	d := &device{tun: td, index: link.Attrs().Index}
	n.stats.tunOffload.Store(td.Offload())
	for i, q := range td.Queues() {
		d.wg.Go(func() { n.transmit(q, conns[i%len(conns)]) })
	}
	return d, nil
}

// stopDevice closes the device's queues (the device itself, persistent,
// stays) and waits for its transmit workers.
func (n *Network) stopDevice(d *device) {
	d.tun.Close()
	d.wg.Wait()
}

// wantAddrs are flannel0's addresses for our lease: the first address of
// each subnet, alone (/32, /128), as flannel assigns them.
func wantAddrs(local lease.Lease) []netip.Prefix {
	var ps []netip.Prefix
	for _, s := range []netip.Prefix{local.Subnet, local.IPv6Subnet} {
		if s.IsValid() {
			a := s.Masked().Addr()
			ps = append(ps, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return ps
}

// configure sets flannel0's MTU, addresses and state, and reports whether
// it changed anything.
func (n *Network) configure(h *netlink.Handle, d *device) (changed bool, err error) {
	link, err := h.LinkByIndex(d.index)
	if err != nil {
		return false, fmt.Errorf("look up %s (#%d): %w", DeviceName, d.index, err)
	}
	if link.Attrs().MTU != n.mtu {
		if err := h.LinkSetMTU(link, n.mtu); err != nil {
			return changed, fmt.Errorf("set the MTU of %s to %d: %w", DeviceName, n.mtu, err)
		}
		n.log.Info("set "+DeviceName+" MTU", "mtu", n.mtu, "was", link.Attrs().MTU)
		changed = true
	}

	n.mu.Lock()
	local := n.local
	n.mu.Unlock()
	if local == nil {
		return changed, errors.New("own lease not set: the agent calls SetLocal before Run")
	}
	want := wantAddrs(*local)
	have, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return changed, fmt.Errorf("list the addresses of %s: %w", DeviceName, err)
	}
	var haveP []netip.Prefix
	for _, a := range have {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		bits, _ := a.Mask.Size()
		p := netip.PrefixFrom(ip.Unmap(), bits)
		haveP = append(haveP, p)
		if slices.Contains(want, p) || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if err := h.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return changed, fmt.Errorf("remove address %s from %s: %w", p, DeviceName, err)
		}
		n.log.Info("removed an address loom does not want from "+DeviceName, "addr", p)
		changed = true
	}
	for _, p := range want {
		if slices.Contains(haveP, p) {
			continue
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return changed, fmt.Errorf("add address %s to %s: %w", p, DeviceName, err)
		}
		n.log.Info("added address to "+DeviceName, "addr", p)
		changed = true
	}

	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(link); err != nil {
			return changed, fmt.Errorf("set %s up: %w", DeviceName, err)
		}
		n.log.Info("set " + DeviceName + " up")
		changed = true
	}
	n.ready.Store(true)
	return changed, nil
}

// desiredRoutes is the route state: each pod network through flannel0.
func (n *Network) desiredRoutes() ([]routes.Route, error) {
	d := n.dev.Load()
	if d == nil {
		return nil, errors.New(DeviceName + " is not open")
	}
	var rs []routes.Route
	for _, p := range []netip.Prefix{n.cfg.Network.Network, n.cfg.Network.IPv6Network} {
		if p.IsValid() {
			rs = append(rs, routes.Route{Dst: p.Masked(), LinkIndex: d.index})
		}
	}
	return rs, nil
}

// watch follows link and address events in the namespace and wakes the
// device loop for those about flannel0, until ctx ends.
func (n *Network) watch(ctx context.Context, nsh netns.NsHandle) {
	ours := func(index int, name string) bool {
		d := n.dev.Load()
		return name == DeviceName || (d != nil && index == d.index)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		follow(ctx, n.log, "link", func(ch chan netlink.LinkUpdate, done chan struct{}, cb func(error)) error {
			return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: &nsh, ErrorCallback: cb})
		}, func(u netlink.LinkUpdate) bool { return ours(int(u.Index), u.Attrs().Name) }, n.kickDevice)
	})
	wg.Go(func() {
		follow(ctx, n.log, "address", func(ch chan netlink.AddrUpdate, done chan struct{}, cb func(error)) error {
			return netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{Namespace: &nsh, ErrorCallback: cb})
		}, func(u netlink.AddrUpdate) bool { return ours(u.LinkIndex, "") }, n.kickDevice)
	})
	wg.Wait()
}

// follow keeps one netlink event subscription open until ctx ends, and
// calls kick for each event that concerns us. A subscription that breaks
// (the socket overflowed, say) is opened again, and kick called since
// events were lost; the periodic resync covers the gap.
func follow[T any](ctx context.Context, log *slog.Logger, what string,
	subscribe func(ch chan T, done chan struct{}, onErr func(error)) error,
	concerns func(T) bool, kick func()) {
	backoff := 100 * time.Millisecond
	for first := true; ; first = false {
		ch := make(chan T, 64)
		done := make(chan struct{})
		err := subscribe(ch, done, func(err error) {
			if ctx.Err() == nil {
				log.Warn(what+" event subscription", "err", err)
			}
		})
		if err != nil {
			close(done)
			log.Error("subscribe to "+what+" events; the periodic resync still runs", "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 10*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		if !first {
			kick()
		}
		for open := true; open; {
			select {
			case u, ok := <-ch:
				if !ok {
					open = false
				} else if concerns(u) {
					kick()
				}
			case <-ctx.Done():
				close(done)
				for range ch { // until the library's reader exits
				}
				return
			}
		}
		close(done)
	}
}
