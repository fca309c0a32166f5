package vxlan

import (
	"cmp"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/loomnet/loom/internal/backend/fdb"
	"github.com/loomnet/loom/internal/backend/neigh"
	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lease"
)

// backendData is the BackendData (and BackendV6Data) of a vxlan lease, with
// flannel's field names: {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}.
type backendData struct {
	VNI     int
	VtepMAC string
}

// peerData is a peer's decoded backend data.
type peerData struct {
	vni    int
	hasVNI bool
	mac    net.HardwareAddr
}

// decodeData reads a peer's BackendData or BackendV6Data. Keys match
// case-insensitively, as in flannel.
func decodeData(raw json.RawMessage) (peerData, error) {
	if len(raw) == 0 {
		return peerData{}, fmt.Errorf("it is missing")
	}
	var d struct {
		VNI     *int
		VtepMAC *string
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		return peerData{}, fmt.Errorf("%s is not vxlan backend data: %w", show(raw), err)
	}
	if d.VtepMAC == nil {
		return peerData{}, fmt.Errorf("%s has no VtepMAC", show(raw))
	}
	mac, err := parseUnicastMAC(*d.VtepMAC)
	if err != nil {
		return peerData{}, fmt.Errorf("VtepMAC %q: %w", *d.VtepMAC, err)
	}
	pd := peerData{mac: mac}
	if d.VNI != nil {
		pd.vni, pd.hasVNI = *d.VNI, true
	}
	return pd, nil
}

// peer is a peer's lease with what plan reads from it worked out once, when
// the lease arrives, rather than at every plan: its key, and its backend
// data decoded (a JSON decode per peer and family, thousands per plan).
type peer struct {
	key    string
	l      *lease.Lease // shared with the event it came in, read-only
	v4, v6 decoded      // BackendData, BackendV6Data; only for vxlan peers
}

// decoded is a peer's backend data for one family, or why it is unusable.
type decoded struct {
	peerData
	err error
}

func newPeer(key string, l *lease.Lease) peer {
	p := peer{key: key, l: l}
	if l.Attrs.BackendType == Type {
		p.v4.peerData, p.v4.err = decodeData(l.Attrs.BackendData)
		p.v6.peerData, p.v6.err = decodeData(l.Attrs.BackendV6Data)
	}
	return p
}

func (p peer) data(v6 bool) decoded {
	if v6 {
		return p.v6
	}
	return p.v4
}

// leg is one address family of a lease: the subnet and where the peer is
// on the underlay.
type leg struct {
	subnet netip.Prefix
	public netip.Addr
}

func legOf(l *lease.Lease, v6 bool) leg {
	if !v6 {
		return leg{subnet: l.Subnet.Masked(), public: l.Attrs.PublicIP}
	}
	lg := leg{subnet: l.IPv6Subnet.Masked()}
	if l.Attrs.PublicIPv6 != nil {
		lg.public = *l.Attrs.PublicIPv6
	}
	return lg
}

// famDev is one of this node's VXLAN devices as plan sees it.
type famDev struct {
	v6    bool
	name  string
	index int // link index, for routes
}

func (f famDev) family() string {
	if f.v6 {
		return "IPv6"
	}
	return "IPv4"
}

// extIface is what plan needs to know about the underlay interface.
type extIface struct {
	name  string
	index int
	addrs []netip.Prefix // its addresses, with their prefix lengths
}

// onLink reports whether ip lies in a subnet of the interface.
func (e extIface) onLink(ip netip.Addr) bool {
	return slices.ContainsFunc(e.addrs, func(p netip.Prefix) bool { return p.Masked().Contains(ip) })
}

// owns reports whether ip is an address of the interface.
func (e extIface) owns(ip netip.Addr) bool {
	return slices.ContainsFunc(e.addrs, func(p netip.Prefix) bool { return p.Addr() == ip })
}

// world is the part of the node's state plan depends on.
type world struct {
	vni           int
	directRouting bool
	devs          []famDev // this node's devices, one per enabled family
	ext           extIface
}

// equal reports whether a plan made for w holds for o too.
func (w world) equal(o world) bool {
	return w.vni == o.vni && w.directRouting == o.directRouting && slices.Equal(w.devs, o.devs) &&
		w.ext.name == o.ext.name && w.ext.index == o.ext.index && slices.Equal(w.ext.addrs, o.ext.addrs)
}

// Problem kinds, the values of the "reason" label of the skipped-peers
// gauge.
const (
	skipOtherBackend = "other-backend" // the peer runs another backend: nothing programmed
	skipUnusable     = "unusable"      // a subnet of the peer cannot be reached (the reason says why)
)

// problem is a peer, or one subnet of it, that gets nothing, and why.
type problem struct {
	kind   string
	peer   string // lease key
	node   string
	subnet netip.Prefix // invalid: the whole peer
	reason string
	fix    string
}

func (p problem) id() string { return p.peer + " " + p.subnet.String() }

// desired is plan's answer: the objects to program, and the peers left out.
type desired struct {
	neighs   []neigh.Neigh
	fdbs     []fdb.Entry
	routes   []routes.Route
	problems []problem
	// direct lists the peer subnets routed without encapsulation.
	direct []netip.Prefix
	// vxlan counts the peer subnets routed through a VXLAN device.
	vxlan int
}

// plan computes the desired neighbours, FDB entries and routes for the
// peers, per peer and per address family:
//
//   - a peer with another backend gets nothing (one problem for the peer);
//   - with DirectRouting, a subnet whose peer's public address is on-link on
//     the underlay gets "<subnet> via <public IP> dev <ext>", nothing else;
//   - any other subnet gets the neighbour "<subnet .0> lladdr <VtepMAC>", the
//     FDB entry "<VtepMAC> dst <public IP>" and the route "<subnet> via
//     <subnet .0> dev <device> onlink", all three or none (a problem says why).
//
// Our own lease, found by key or node name, gets nothing. plan is pure; peers
// are taken in key order, so equal inputs give equal answers.
func plan(local lease.Lease, peers []lease.Lease, w world) desired {
	ps := make([]peer, len(peers))
	for i := range peers {
		ps[i] = newPeer(peers[i].Key(), &peers[i])
	}
	return planPeers(local, ps, w)
}

// planPeers is plan for peers whose data newPeer has decoded. It sorts
// peers.
func planPeers(local lease.Lease, peers []peer, w world) desired {
	slices.SortFunc(peers, func(a, b peer) int { return cmp.Compare(a.key, b.key) })
	localKey := local.Key()
	var d desired
	macOwner := make(map[fdb.Key]int, len(peers)) // the peer that claimed a VTEP MAC first
	for i, pr := range peers {
		p := pr.l
		if pr.key == localKey || (p.Attrs.NodeName != "" && p.Attrs.NodeName == local.Attrs.NodeName) {
			continue
		}
		if p.Attrs.BackendType != Type {
			d.problems = append(d.problems, problem{
				kind: skipOtherBackend, peer: pr.key, node: p.Attrs.NodeName,
				reason: fmt.Sprintf("the peer runs the %q backend, this node %q: no route to it", p.Attrs.BackendType, Type),
				fix:    "run every node of the cluster with the same Backend.Type",
			})
			continue
		}
		for _, dev := range w.devs {
			lg := legOf(p, dev.v6)
			if !lg.subnet.IsValid() {
				continue // the peer leases nothing in this family
			}
			own := legOf(&local, dev.v6)
			bad := func(reason, fix string) {
				d.problems = append(d.problems, problem{kind: skipUnusable, peer: pr.key, node: p.Attrs.NodeName,
					subnet: lg.subnet, reason: reason, fix: fix})
			}
			fam := dev.family()
			switch {
			case !lg.public.IsValid() || lg.public.Is6() != dev.v6:
				bad("the lease has an "+fam+" subnet but no "+fam+" public address",
					"start the peer's agent with an "+fam+" address on its -iface, or disable "+fam+" in the network config")
				continue
			case own.subnet.IsValid() && own.subnet.Overlaps(lg.subnet):
				bad("the subnet overlaps this node's own subnet "+own.subnet.String(),
					"the registry holds two overlapping leases: delete the stale one")
				continue
			case w.ext.owns(lg.public):
				bad(fmt.Sprintf("the peer's public address %s is an address of this node's %s", lg.public, w.ext.name),
					"two nodes claim one public IP: set -iface or -public-ip on one of them")
				continue
			case w.directRouting && w.ext.onLink(lg.public):
				d.routes = append(d.routes, routes.Route{Dst: lg.subnet, Gw: lg.public, LinkIndex: w.ext.index})
				d.direct = append(d.direct, lg.subnet)
				continue
			}
			data, err := pr.data(dev.v6).peerData, pr.data(dev.v6).err // decoded by newPeer
			field := "BackendData"
			if dev.v6 {
				field = "BackendV6Data"
			}
			if err != nil {
				bad("the lease's "+field+" is unusable: "+err.Error(),
					"the peer's agent writes it: upgrade or restart it, or delete its stale lease")
				continue
			}
			if data.hasVNI && data.vni != w.vni {
				bad(fmt.Sprintf("the peer's VXLAN network identifier is %d, this node's %d", data.vni, w.vni),
					"set the same Backend.VNI on every node")
				continue
			}
			fk := fdb.KeyOf(dev.name, data.mac)
			if first, taken := macOwner[fk]; taken {
				bad(fmt.Sprintf("its VtepMAC %s is also the VtepMAC of %s", data.mac, peers[first].l),
					"two nodes have one VTEP MAC: give them distinct node names, or fix the persisted MAC file of one")
				continue
			}
			macOwner[fk] = i
			gw := lg.subnet.Addr()
			d.neighs = append(d.neighs, neigh.Neigh{Dev: dev.name, IP: gw, MAC: data.mac})
			d.fdbs = append(d.fdbs, fdb.Entry{Dev: dev.name, MAC: data.mac, Dst: lg.public})
			d.routes = append(d.routes, routes.Route{Dst: lg.subnet, Gw: gw, LinkIndex: dev.index, OnLink: true})
			d.vxlan++
		}
	}
	return d
}
