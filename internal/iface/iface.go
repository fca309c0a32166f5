// Package iface picks the underlay interface and public address a node uses
// to reach its peers, the way flanneld's -iface, -iface-regex,
// -iface-can-reach and -public-ip do. Choosing wrong is the classic Vagrant
// trap (every node picks the NAT interface and advertises 10.0.2.15), so the
// choice is explicit in the result and logged by the agent.
package iface

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Config says how to choose. Zero value: the interface of the default route.
type Config struct {
	Ifaces   []string         // -iface: names or addresses, tried in order
	Regexes  []*regexp.Regexp // -iface-regex: tried in order when Ifaces is empty
	CanReach netip.Addr       // -iface-can-reach: the interface the kernel would use to reach it
	PublicIP netip.Addr       // -public-ip: advertised instead of the interface address
	PublicV6 netip.Addr       // -public-ipv6
	WantV4   bool             // an IPv4 address is required
	WantV6   bool             // an IPv6 address is required
}

// Iface is the chosen underlay interface.
type Iface struct {
	Name     string
	Index    int
	MTU      int
	Addr     netip.Addr     // the interface's IPv4 address (invalid when none)
	AddrV6   netip.Addr     // the interface's global IPv6 address (invalid when none)
	PublicIP netip.Addr     // what peers use: -public-ip or Addr
	PublicV6 netip.Addr     // what peers use: -public-ipv6 or AddrV6
	Prefixes []netip.Prefix // every subnet on the interface, for on-link and overlap checks
	How      string         // why this interface was chosen, for the log
}

// Select chooses the interface in the current network namespace.
func Select(cfg Config) (Iface, error) {
	var (
		link netlink.Link
		how  string
		err  error
	)
	switch {
	case len(cfg.Ifaces) > 0:
		link, how, err = byNameOrAddr(cfg.Ifaces)
	case len(cfg.Regexes) > 0:
		link, how, err = byRegex(cfg.Regexes)
	case cfg.CanReach.IsValid():
		link, how, err = byReach(cfg.CanReach)
	default:
		link, how, err = byDefaultRoute(cfg.WantV6 && !cfg.WantV4)
	}
	if err != nil {
		return Iface{}, err
	}
	ifc, err := describe(link)
	if err != nil {
		return Iface{}, err
	}
	ifc.How = how
	ifc.PublicIP, ifc.PublicV6 = ifc.Addr, ifc.AddrV6
	if cfg.PublicIP.IsValid() {
		ifc.PublicIP = cfg.PublicIP
	}
	if cfg.PublicV6.IsValid() {
		ifc.PublicV6 = cfg.PublicV6
	}
	if cfg.WantV4 && !ifc.PublicIP.IsValid() {
		return Iface{}, fmt.Errorf("interface %s (%s) has no IPv4 address: pick another with -iface or set -public-ip", ifc.Name, how)
	}
	if cfg.WantV6 && !ifc.PublicV6.IsValid() {
		return Iface{}, fmt.Errorf("interface %s (%s) has no global IPv6 address: pick another with -iface or set -public-ipv6", ifc.Name, how)
	}
	return ifc, nil
}

func byNameOrAddr(specs []string) (netlink.Link, string, error) {
	var tried []string
	for _, s := range specs {
		if a, err := netip.ParseAddr(s); err == nil {
			if l, err := linkWithAddr(a); err == nil {
				return l, "-iface " + s, nil
			}
			tried = append(tried, s+" (no interface has this address)")
			continue
		}
		l, err := netlink.LinkByName(s)
		if err == nil {
			return l, "-iface " + s, nil
		}
		tried = append(tried, s+" (no such interface)")
	}
	return nil, "", fmt.Errorf("-iface: none of %s is usable: %s", strings.Join(specs, ","), strings.Join(tried, "; "))
}

func byRegex(exprs []*regexp.Regexp) (netlink.Link, string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, "", fmt.Errorf("list interfaces: %w", err)
	}
	var names []string
	for _, re := range exprs {
		names = append(names, re.String())
		e := re.String()
		for _, l := range links {
			if re.MatchString(l.Attrs().Name) {
				return l, "-iface-regex " + e, nil
			}
			addrs, _ := addrsOf(l)
			for _, p := range addrs {
				if re.MatchString(p.Addr().String()) {
					return l, "-iface-regex " + e, nil
				}
			}
		}
	}
	return nil, "", fmt.Errorf("-iface-regex: no interface name or address matches %s", strings.Join(names, ","))
}

func byReach(dst netip.Addr) (netlink.Link, string, error) {
	routes, err := netlink.RouteGet(dst.AsSlice())
	if err != nil || len(routes) == 0 {
		return nil, "", fmt.Errorf("-iface-can-reach %s: no route: %v", dst, err)
	}
	l, err := netlink.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return nil, "", fmt.Errorf("-iface-can-reach %s: %w", dst, err)
	}
	return l, "-iface-can-reach " + dst.String(), nil
}

func byDefaultRoute(v6 bool) (netlink.Link, string, error) {
	family := netlink.FAMILY_V4
	if v6 {
		family = netlink.FAMILY_V6
	}
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, "", fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if (r.Dst == nil || isDefault(r.Dst)) && r.LinkIndex > 0 {
			l, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				return nil, "", fmt.Errorf("default route interface: %w", err)
			}
			return l, "default route", nil
		}
	}
	return nil, "", errors.New("no default route to pick the interface from: name it with -iface")
}

func isDefault(n *net.IPNet) bool {
	ones, _ := n.Mask.Size()
	return ones == 0
}

func linkWithAddr(a netip.Addr) (netlink.Link, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		addrs, _ := addrsOf(l)
		for _, p := range addrs {
			if p.Addr() == a {
				return l, nil
			}
		}
	}
	return nil, fmt.Errorf("no interface has address %s", a)
}

func addrsOf(l netlink.Link) ([]netip.Prefix, error) {
	list, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %w", l.Attrs().Name, err)
	}
	var out []netip.Prefix
	for _, a := range list {
		addr, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		out = append(out, netip.PrefixFrom(addr.Unmap(), ones))
	}
	return out, nil
}

func describe(l netlink.Link) (Iface, error) {
	attrs := l.Attrs()
	ifc := Iface{Name: attrs.Name, Index: attrs.Index, MTU: attrs.MTU}
	addrs, err := addrsOf(l)
	if err != nil {
		return Iface{}, err
	}
	for _, p := range addrs {
		a := p.Addr()
		if !a.IsGlobalUnicast() {
			continue // link-local IPv6 is no use as a tunnel endpoint
		}
		ifc.Prefixes = append(ifc.Prefixes, p.Masked())
		if a.Is4() && !ifc.Addr.IsValid() {
			ifc.Addr = a
		}
		if a.Is6() && !ifc.AddrV6.IsValid() {
			ifc.AddrV6 = a
		}
	}
	return ifc, nil
}
