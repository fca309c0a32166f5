package doctor

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
)

// What each backend programs per peer (DESIGN §3), as checks of the
// gathered kernel state.

var errNotOnLink = errors.New("not on-link")

func datapathFor(backendType string) (peerWant, bool) {
	switch backendType {
	case netconf.BackendHostGW:
		return hostGWPeer, true
	case netconf.BackendVXLAN:
		return vxlanPeer, true
	case netconf.BackendUDP:
		return udpPeer, true
	}
	return nil, false
}

func (f *Facts) onLink(a netip.Addr) bool {
	for _, p := range f.Underlay.Prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// hostGWPeer: <peer subnet> via <peer PublicIP> dev <underlay>.
func hostGWPeer(f *Facts, l lease.Lease) (string, error) {
	gw, dev := l.Attrs.PublicIP, f.Underlay.Name
	if !f.onLink(gw) {
		return "", errNotOnLink
	}
	return directRoute(f, l, gw, dev)
}

func directRoute(f *Facts, l lease.Lease, gw netip.Addr, dev string) (string, error) {
	r, found := f.Kernel.routeTo(l.Subnet)
	if !found {
		return "", fmt.Errorf("no route to %s (want %s via %s dev %s)", l.Subnet, l.Subnet, gw, dev)
	}
	if r.Gw != gw || r.Dev != dev {
		return "", fmt.Errorf("route %s, want via %s dev %s", r, gw, dev)
	}
	if err := lookupMatches(f, podAddr(l.Subnet, 1), gw, dev); err != nil {
		return "", err
	}
	return "route " + r.String(), nil
}

// vxlanOptions is the part of Backend vxlan doctor needs.
type vxlanOptions struct {
	VNI           int
	DirectRouting bool
}

func vxlanConfig(f *Facts) vxlanOptions {
	o := vxlanOptions{VNI: 1}
	if f.Config != nil {
		_ = json.Unmarshal(f.Config.Backend.Raw, &o) // validated by netconf; a bad value keeps the default
	}
	if o.VNI == 0 {
		o.VNI = 1
	}
	return o
}

// vxlanDevice is flannel's device name for the VNI: flannel.1.
func vxlanDevice(f *Facts) string { return "flannel." + strconv.Itoa(vxlanConfig(f).VNI) }

// vxlanPeer: route <subnet> via <subnet .0> dev flannel.1 onlink, neighbour
// <subnet .0> lladdr <VtepMAC> permanent, FDB <VtepMAC> dst <PublicIP>; or,
// with DirectRouting and an on-link peer, a host-gw style route.
func vxlanPeer(f *Facts, l lease.Lease) (string, error) {
	opts := vxlanConfig(f)
	if opts.DirectRouting && f.onLink(l.Attrs.PublicIP) {
		return directRoute(f, l, l.Attrs.PublicIP, f.Underlay.Name)
	}
	dev := vxlanDevice(f)
	if _, found := f.Kernel.LinkByName(dev); !found {
		return "", fmt.Errorf("no VXLAN device %s on this node", dev)
	}
	var data struct{ VtepMAC string }
	if err := json.Unmarshal(l.Attrs.BackendData, &data); err != nil || data.VtepMAC == "" {
		return "", fmt.Errorf("lease has no VtepMAC in BackendData (%s)", l.Attrs.BackendData)
	}
	mac := strings.ToLower(data.VtepMAC)
	vtep := l.Subnet.Masked().Addr()
	var missing []string
	r, found := f.Kernel.routeTo(l.Subnet)
	if !found || r.Gw != vtep || r.Dev != dev {
		got := "none"
		if found {
			got = r.String()
		}
		missing = append(missing, fmt.Sprintf("route %s via %s dev %s onlink (have %s)", l.Subnet, vtep, dev, got))
	}
	if !hasNeigh(f, vtep, mac, dev) {
		missing = append(missing, fmt.Sprintf("neighbour %s lladdr %s dev %s permanent", vtep, mac, dev))
	}
	if !hasFDB(f, mac, l.Attrs.PublicIP, dev) {
		missing = append(missing, fmt.Sprintf("fdb %s dst %s dev %s", mac, l.Attrs.PublicIP, dev))
	}
	if len(missing) > 0 {
		return "", fmt.Errorf("missing %s", strings.Join(missing, "; "))
	}
	if err := lookupMatches(f, podAddr(l.Subnet, 1), vtep, dev); err != nil {
		return "", err
	}
	return fmt.Sprintf("route via %s dev %s, neighbour and fdb %s -> %s", vtep, dev, mac, l.Attrs.PublicIP), nil
}

func hasNeigh(f *Facts, ip netip.Addr, mac, dev string) bool {
	for _, n := range f.Kernel.Neigh {
		if n.IP == ip && n.Dev == dev && strings.EqualFold(n.MAC, mac) {
			return true
		}
	}
	return false
}

func hasFDB(f *Facts, mac string, dst netip.Addr, dev string) bool {
	for _, e := range f.Kernel.FDB {
		if e.Dev == dev && e.Dst == dst && strings.EqualFold(e.MAC, mac) {
			return true
		}
	}
	return false
}

// udpPeer: the TUN device flannel0 carries the whole network; the agent
// encapsulates per peer in user space, so the kernel part is one route.
func udpPeer(f *Facts, l lease.Lease) (string, error) {
	const dev = "flannel0"
	if _, found := f.Kernel.LinkByName(dev); !found {
		return "", fmt.Errorf("no TUN device %s on this node", dev)
	}
	if err := lookupMatches(f, podAddr(l.Subnet, 1), netip.Addr{}, dev); err != nil {
		return "", err
	}
	return "routed to " + dev, nil
}
