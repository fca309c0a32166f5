package doctor

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/loomnet/loom/internal/kubesubnet"
	"github.com/loomnet/loom/internal/lease"
)

// checkPublicIP: the address the agent's flags choose is what peers send
// this node's pod traffic to. Two nodes on one address (every Vagrant VM's
// NAT interface is 10.0.2.15) or an interface that cannot reach the peers
// (the NAT interface again) break every cross-node flow.
func checkPublicIP(f *Facts) Result {
	u := f.Underlay
	if u.Err != nil {
		return fail("the agent's flags choose no usable interface: "+u.Err.Error(),
			"name the interface on the network the nodes share: -iface=<name or address> (or -iface-regex / -iface-can-reach=<a peer's address>)",
			flagsEvidence(f))
	}
	ev := []string{fmt.Sprintf("chosen interface %s (%s): public IP %s, MTU %d", u.Name, u.How, u.PublicIP, u.MTU)}
	if !f.Store.Listed() {
		return Result{Status: OK, Summary: fmt.Sprintf("public IP %s on %s (not compared with the registry: %s)", u.PublicIP, u.Name, unreachableWhy(f)), Evidence: ev}
	}
	var problems []string
	fix := fmt.Sprintf("start the agent with the interface on the network the nodes share: -iface=<its name> or -public-ip=<this node's own address> (%s is the wrong choice)", u.Name)
	own, haveOwn := f.ownLease()
	for _, l := range f.Store.Leases {
		if l.Attrs.PublicIP != u.PublicIP || l.Attrs.NodeName == f.Node || (haveOwn && l.Key() == own.Key()) {
			continue
		}
		problems = append(problems, fmt.Sprintf("%s is already the public IP of node %s (lease %s): two nodes cannot share one address (the Vagrant NAT trap: every VM has 10.0.2.15)",
			u.PublicIP, nodeOf(l), l.Key()))
		ev = append(ev, fmt.Sprintf("%s: PublicIP %s", f.leaseRef(l), l.Attrs.PublicIP))
	}
	switch {
	case haveOwn && f.publicIPOverridden(own.Attrs.PublicIP):
		ev = append(ev, fmt.Sprintf("peers send to %s: the operator's %s annotation", own.Attrs.PublicIP, f.Kube.annotations().Key(kubesubnet.AnnPublicIPOverwrite)))
	case haveOwn && own.Attrs.PublicIP.IsValid() && own.Attrs.PublicIP != u.PublicIP:
		problems = append(problems, fmt.Sprintf("this node's lease advertises %s but the flags choose %s", own.Attrs.PublicIP, u.PublicIP))
		ev = append(ev, fmt.Sprintf("%s: PublicIP %s", f.leaseRef(own), own.Attrs.PublicIP))
	}
	var viaOther []string
	checked := 0
	for _, l := range f.peerLeases() {
		ip := l.Attrs.PublicIP
		lk, found := f.Kernel.Lookups[ip]
		if !ip.IsValid() || ip == u.PublicIP || !found {
			continue
		}
		checked++
		switch {
		case lk.Err != nil:
			viaOther = append(viaOther, fmt.Sprintf("%s (%s): %v", ip, nodeOf(l), lk.Err))
		case lk.Dev != u.Name:
			viaOther = append(viaOther, fmt.Sprintf("%s (%s) is reached through %s, not %s", ip, nodeOf(l), lk.Dev, u.Name))
		}
	}
	if len(viaOther) > 0 {
		ev = append(ev, viaOther...)
		if len(viaOther) == checked {
			problems = append(problems, fmt.Sprintf("no peer is reachable through %s", u.Name))
		} else {
			return warn(fmt.Sprintf("%d of %s not reached through %s", len(viaOther), plural(checked, "peer")+isAre(len(viaOther)), u.Name),
				"check the routes to those peers, or pick the interface with -iface-can-reach=<a peer's address>", ev...)
		}
	}
	if len(problems) > 0 {
		return fail(strings.Join(problems, "; "), fix, ev...)
	}
	return ok(fmt.Sprintf("peers reach this node at %s (%s); %s routed through %s", u.PublicIP, u.Name, plural(checked, "peer"), u.Name), ev...)
}

func flagsEvidence(f *Facts) string {
	return fmt.Sprintf("flags (%s): -iface %s -iface-regex %d -public-ip %s", f.ArgsSource,
		strings.Join(f.Opts.Iface, ","), len(f.Opts.IfaceRegex), f.Opts.PublicIP)
}

// checkPeerLiveness: a lease outlives its node by up to 24 h (a node that
// was switched off never releases it). Until it expires, every node routes
// that subnet to an address nobody answers at. One TCP connect per peer,
// in parallel, bounded: a connection or a refusal is an answer.
func checkPeerLiveness(f *Facts) Result {
	if !f.Store.Listed() {
		return skip("needs the registry (%s)", unreachableWhy(f))
	}
	if len(f.Peers) == 0 {
		return ok("no peer to probe")
	}
	var dead, ev []string
	var cmds []string
	for _, p := range f.Peers {
		where := "lease " + p.Lease.Key()
		if f.kube() {
			where = "podCIDR " + p.Lease.Subnet.String()
		}
		line := fmt.Sprintf("%s %s (%s): %s after %s", nodeOf(p.Lease), p.Target, where, p.Answer, p.Took.Round(10*time.Microsecond))
		ev = append(ev, line)
		if !p.Alive {
			dead = append(dead, fmt.Sprintf("%s (%s)", nodeOf(p.Lease), p.Target.Addr()))
			cmds = append(cmds, f.forgetPeer(p.Lease))
		}
	}
	if len(dead) > 0 {
		what := "delete its lease so the subnet is free and peers drop the route"
		if f.kube() {
			what = "delete its Node so peers drop the route and its podCIDR is free"
		}
		return warn(fmt.Sprintf("no answer from %s: %s; traffic to their pods is lost", plural(len(dead), "peer"), strings.Join(dead, ", ")),
			"bring the nodes back; if one is gone for good, "+what+": "+strings.Join(cmds, "; "), ev...)
	}
	return ok(fmt.Sprintf("%s answer%s", plural(len(f.Peers), "peer"), verbS(len(f.Peers))), ev...)
}

// checkDatapath: for every peer lease, the kernel holds what the backend
// must program, and a route lookup of the peer's gateway address takes it.
func checkDatapath(f *Facts) Result {
	if !f.Store.Listed() {
		return skip("needs the registry (%s)", unreachableWhy(f))
	}
	if f.Underlay.Err != nil {
		return skip("needs the underlay interface (see %s)", CheckPublicIP)
	}
	if own, found := f.ownLease(); found && own.Attrs.PublicIP.IsValid() && own.Attrs.PublicIP != f.Underlay.PublicIP && !f.publicIPOverridden(own.Attrs.PublicIP) {
		return skip("the flags choose %s but the agent's lease advertises %s: judged by %s", f.Underlay.PublicIP, own.Attrs.PublicIP, CheckPublicIP)
	}
	bt := f.backendType()
	want, known := datapathFor(bt)
	if !known {
		return skip("backend %q is not checked by this version", bt)
	}
	var bad, unroutable, ev []string
	peers := 0
	for _, l := range f.peerLeases() {
		if !l.Subnet.IsValid() || !l.Attrs.PublicIP.IsValid() || l.Attrs.PublicIP == f.Underlay.PublicIP {
			continue // IPv6-only, or sharing our address (see public-ip)
		}
		if f.kube() && !f.sameBackend(l) {
			// The backend skips it; kube-annotations names it.
			ev = append(ev, fmt.Sprintf("%s %s: runs %s, not routed (see %s)", nodeOf(l), l.Subnet, l.Attrs.BackendType, CheckKubeAnnotations))
			continue
		}
		peers++
		got, err := want(f, l)
		switch {
		case err == errNotOnLink:
			unroutable = append(unroutable, fmt.Sprintf("%s %s: PublicIP %s is not on %s's subnets (%s)", nodeOf(l), l.Subnet, l.Attrs.PublicIP, f.Underlay.Name, joinPrefixes(f.Underlay.Prefixes)))
		case err != nil:
			bad = append(bad, fmt.Sprintf("%s %s: %v", nodeOf(l), l.Subnet, err))
		default:
			ev = append(ev, fmt.Sprintf("%s %s: %s", nodeOf(l), l.Subnet, got))
		}
	}
	if len(bad) > 0 {
		return fail(fmt.Sprintf("%d of %s lack%s a working data path: %s", len(bad), plural(peers, "peer"), verbS(len(bad)), firstOf(bad)),
			"the agent reconciles every -resync (5 s): if the entries stay wrong, read its log; delete routes that are not loom's and shadow a peer's subnet (ip route del <route>)",
			append(bad, ev...)...)
	}
	if len(unroutable) > 0 {
		return warn(fmt.Sprintf("%s not on-link: %s cannot route to them", plural(len(unroutable), "peer")+isAre(len(unroutable)), bt),
			"host-gw needs every node on one L2 segment: use the vxlan backend, or put the nodes on one subnet", append(unroutable, ev...)...)
	}
	return ok(fmt.Sprintf("%s data path programmed for %s", bt, plural(peers, "peer")), ev...)
}

func firstOf(s []string) string {
	if len(s) == 0 {
		return ""
	}
	if len(s) > 1 {
		return s[0] + " ..."
	}
	return s[0]
}

// routeTo returns the main-table route whose destination is exactly dst.
func (k KernelFacts) routeTo(dst netip.Prefix) (Route, bool) {
	for _, r := range k.Routes {
		if r.Dst == dst {
			return r, true
		}
	}
	return Route{}, false
}

// bestRoute is the longest-prefix route covering a, as the kernel would
// pick it from the main table (for evidence).
func (k KernelFacts) bestRoute(a netip.Addr) (Route, bool) {
	var best Route
	found := false
	for _, r := range k.Routes {
		if r.Dst.Contains(a) && (!found || r.Dst.Bits() > best.Dst.Bits()) {
			best, found = r, true
		}
	}
	return best, found
}

func (r Route) String() string {
	s := r.Dst.String()
	if r.Type != "" && r.Type != "unicast" {
		s = r.Type + " " + s
	}
	if r.Gw.IsValid() {
		s += " via " + r.Gw.String()
	}
	if r.Dev != "" {
		s += " dev " + r.Dev
	}
	if r.Protocol != 0 {
		s += fmt.Sprintf(" proto %s", protoName(r.Protocol))
	}
	if r.OnLink {
		s += " onlink"
	}
	return s
}

func protoName(p int) string {
	switch p {
	case 2:
		return "kernel"
	case 3:
		return "boot"
	case 4:
		return "static"
	case 108:
		return "108"
	}
	return fmt.Sprint(p)
}

// lookupMatches checks that `ip route get` of a sends it via gw on dev.
func lookupMatches(f *Facts, a, gw netip.Addr, dev string) error {
	lk, found := f.Kernel.Lookups[a]
	if !found {
		return nil
	}
	if lk.Err != nil {
		return fmt.Errorf("ip route get %s: %v", a, lk.Err)
	}
	if (gw.IsValid() && lk.Gw != gw) || lk.Dev != dev {
		by := ""
		if r, ok := f.Kernel.bestRoute(a); ok {
			by = " (route " + r.String() + ")"
		}
		return fmt.Errorf("traffic to %s goes via %s dev %s%s, not via %s dev %s", a, orDash(lk.Gw), lk.Dev, by, orDash(gw), dev)
	}
	return nil
}

func orDash(a netip.Addr) string {
	if !a.IsValid() {
		return "-"
	}
	return a.String()
}

// peerWant checks one peer's data path and returns its evidence.
type peerWant func(f *Facts, l lease.Lease) (string, error)
