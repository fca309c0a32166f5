package doctor

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// gatherKernel reads links, addresses, main-table routes, neighbours and
// the sysctls doctor judges, with netlink dumps and /proc/sys reads.
func gatherKernel() KernelFacts {
	k := KernelFacts{Sysctls: map[string]string{}}
	for _, name := range []string{sysctlIPForward, sysctlIPv6Forward, sysctlBridgeNF} {
		data, err := os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/")))
		if err == nil {
			k.Sysctls[name] = strings.TrimSpace(string(data))
		}
	}
	if _, err := os.Stat("/proc/sys/net/bridge"); err == nil {
		k.BrNetfilter = true
	}

	links, err := netlink.LinkList()
	if err != nil {
		k.Err = fmt.Errorf("list links: %w", err)
		return k
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		k.Err = fmt.Errorf("list addresses: %w", err)
	}
	byIndex := map[int][]netip.Prefix{}
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); ok {
			byIndex[a.LinkIndex] = append(byIndex[a.LinkIndex], p)
		}
	}
	names := map[int]string{}
	for _, l := range links {
		a := l.Attrs()
		names[a.Index] = a.Name
		k.Links = append(k.Links, Link{
			Name: a.Name, Index: a.Index, Type: l.Type(), MTU: a.MTU,
			Up: a.Flags&net.FlagUp != 0, Master: a.MasterIndex, Addrs: byIndex[a.Index],
		})
	}

	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		k.Err = errors.Join(k.Err, fmt.Errorf("list routes: %w", err))
	}
	for _, r := range routes {
		dst := netip.MustParsePrefix("0.0.0.0/0")
		if p, ok := prefixOf(r.Dst); ok {
			dst = p
		}
		gw, _ := netip.AddrFromSlice(r.Gw)
		k.Routes = append(k.Routes, Route{
			Dst: dst, Gw: gw.Unmap(), Dev: names[r.LinkIndex], Protocol: int(r.Protocol),
			OnLink: r.Flags&unix.RTNH_F_ONLINK != 0, Type: routeType(r.Type),
		})
	}

	neighs, err := netlink.NeighList(0, netlink.FAMILY_V4)
	if err != nil {
		k.Err = errors.Join(k.Err, fmt.Errorf("list neighbours: %w", err))
	}
	for _, n := range neighs {
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		k.Neigh = append(k.Neigh, Neigh{IP: ip.Unmap(), MAC: n.HardwareAddr.String(), Dev: names[n.LinkIndex], State: neighState(n.State)})
	}
	for _, l := range k.Links {
		if l.Type != "vxlan" {
			continue
		}
		fdb, err := netlink.NeighList(l.Index, unix.AF_BRIDGE)
		if err != nil {
			k.Err = errors.Join(k.Err, fmt.Errorf("list fdb of %s: %w", l.Name, err))
			continue
		}
		for _, e := range fdb {
			dst, _ := netip.AddrFromSlice(e.IP)
			k.FDB = append(k.FDB, FDBEntry{MAC: e.HardwareAddr.String(), Dst: dst.Unmap(), Dev: l.Name})
		}
	}
	return k
}

// gatherLookups asks the kernel how it routes each peer's public IP and
// the first address of each peer subnet (`ip route get`), in parallel.
func gatherLookups(f *Facts) map[netip.Addr]Lookup {
	var targets []netip.Addr
	for _, l := range f.peerLeases() {
		if l.Attrs.PublicIP.IsValid() {
			targets = append(targets, l.Attrs.PublicIP)
		}
		if l.Subnet.IsValid() {
			targets = append(targets, podAddr(l.Subnet, 1))
		}
	}
	names := map[int]string{}
	for _, l := range f.Kernel.Links {
		names[l.Index] = l.Name
	}
	out := make(map[netip.Addr]Lookup, len(targets))
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, a := range targets {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			lk := Lookup{Dst: a}
			rs, err := netlink.RouteGet(a.AsSlice())
			switch {
			case err != nil:
				lk.Err = err
			case len(rs) == 0:
				lk.Err = errors.New("no route")
			default:
				lk.Gw, _ = netip.AddrFromSlice(rs[0].Gw)
				lk.Gw = lk.Gw.Unmap()
				lk.Dev = names[rs[0].LinkIndex]
			}
			mu.Lock()
			out[a] = lk
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	ones, bits := n.Mask.Size()
	if bits == 128 && a.Is4() {
		ones -= 96
	}
	return netip.PrefixFrom(a, ones), true
}

func routeType(t int) string {
	switch t {
	case unix.RTN_UNICAST:
		return "unicast"
	case unix.RTN_LOCAL:
		return "local"
	case unix.RTN_BROADCAST:
		return "broadcast"
	case unix.RTN_BLACKHOLE:
		return "blackhole"
	case unix.RTN_UNREACHABLE:
		return "unreachable"
	case unix.RTN_PROHIBIT:
		return "prohibit"
	}
	return fmt.Sprintf("type%d", t)
}

func neighState(s int) string {
	switch {
	case s&netlink.NUD_PERMANENT != 0:
		return "permanent"
	case s&netlink.NUD_REACHABLE != 0:
		return "reachable"
	case s&netlink.NUD_STALE != 0:
		return "stale"
	case s&netlink.NUD_FAILED != 0:
		return "failed"
	case s&netlink.NUD_INCOMPLETE != 0:
		return "incomplete"
	case s&netlink.NUD_DELAY != 0:
		return "delay"
	case s&netlink.NUD_PROBE != 0:
		return "probe"
	case s&netlink.NUD_NOARP != 0:
		return "noarp"
	}
	return fmt.Sprintf("state%#x", s)
}
