package doctor

import (
	"fmt"
	"strings"

	"github.com/loomnet/loom/internal/netconf"
)

// overhead is what each backend adds to a pod packet on the underlay
// (IPv4 underlay; vxlan over IPv6 adds 20 more).
func overhead(backendType string, v6Underlay bool) (int, bool) {
	switch backendType {
	case netconf.BackendHostGW:
		return 0, true
	case netconf.BackendVXLAN:
		if v6Underlay {
			return 70, true
		}
		return 50, true
	case netconf.BackendUDP:
		return 28, true
	}
	return 0, false
}

// checkMTU: pods, the bridge, the overlay device and the underlay agree.
// A pod MTU above what the underlay carries after encapsulation is the
// classic black hole: small requests work, large replies vanish (PMTU
// discovery fails through NAT and overlays).
func checkMTU(f *Facts) Result {
	u := f.Underlay
	if u.Err != nil {
		return skip("needs the underlay interface (see %s)", CheckPublicIP)
	}
	e := f.SubnetEnv.Env
	if e == nil {
		return skip("needs subnet.env (see %s)", CheckSubnetEnv)
	}
	bt := f.backendType()
	over, known := overhead(bt, u.PublicIP.Is6())
	want := u.MTU - over
	ev := []string{fmt.Sprintf("underlay %s MTU %d, backend %s (overhead %d)", u.Name, u.MTU, bt, over),
		fmt.Sprintf("%s: FLANNEL_MTU=%d", f.SubnetEnv.Path, e.MTU)}
	var fails, warns []string
	restart := fmt.Sprintf("restart the agent so it recomputes FLANNEL_MTU from %s (MTU %d) and rewrites subnet.env, then re-create the pods so their links get it", u.Name, u.MTU)
	switch {
	case e.MTU > u.MTU-over:
		fails = append(fails, fmt.Sprintf("FLANNEL_MTU %d is above what %s carries (%d - %d = %d): large packets between nodes are dropped", e.MTU, u.Name, u.MTU, over, u.MTU-over))
	case known && e.MTU < want:
		warns = append(warns, fmt.Sprintf("FLANNEL_MTU %d is below the %d the underlay allows: pods use smaller packets than they could", e.MTU, want))
	}
	if bt == netconf.BackendVXLAN || bt == netconf.BackendUDP {
		dev := "flannel0"
		if bt == netconf.BackendVXLAN {
			dev = vxlanDevice(f)
		}
		if l, found := f.Kernel.LinkByName(dev); found {
			ev = append(ev, fmt.Sprintf("%s MTU %d", dev, l.MTU))
			if l.MTU > u.MTU-over {
				fails = append(fails, fmt.Sprintf("%s MTU %d is above %s's %d minus the %d-byte header", dev, l.MTU, u.Name, u.MTU, over))
			}
		}
	}
	podMTU := e.MTU
	if c, found := f.CNI.Chosen(); found && c.Loom != nil && c.Loom.MTU != 0 {
		podMTU = c.Loom.MTU
		ev = append(ev, fmt.Sprintf("%s: mtu %d overrides FLANNEL_MTU", c.Path, podMTU))
		if podMTU > u.MTU-over {
			fails = append(fails, fmt.Sprintf("the CNI config's mtu %d is above what %s carries (%d)", podMTU, u.Name, u.MTU-over))
		}
	}
	if br, found := f.Kernel.LinkByName(f.bridgeName()); found {
		ev = append(ev, fmt.Sprintf("%s MTU %d", br.Name, br.MTU))
		var high, low []string
		for _, l := range f.Kernel.Links {
			if l.Master != br.Index || l.Master == 0 {
				continue
			}
			switch {
			case l.MTU > podMTU:
				high = append(high, fmt.Sprintf("%s=%d", l.Name, l.MTU))
			case l.MTU < podMTU:
				low = append(low, fmt.Sprintf("%s=%d", l.Name, l.MTU))
			}
		}
		if br.MTU > podMTU || len(high) > 0 {
			fails = append(fails, fmt.Sprintf("%s or its pod links are above the pod MTU %d (%s MTU %d; %s)", br.Name, podMTU, br.Name, br.MTU, strings.Join(orNone(high), " ")))
		}
		if len(low) > 0 {
			warns = append(warns, fmt.Sprintf("pod links below the pod MTU %d: %s (pods made before an MTU change)", podMTU, strings.Join(low, " ")))
		}
	}
	switch {
	case len(fails) > 0:
		return fail(strings.Join(fails, "; "),
			fmt.Sprintf("set %s's MTU back (ip link set %s mtu <MTU it had>), or %s", u.Name, u.Name, restart), ev...)
	case len(warns) > 0:
		return warn(strings.Join(warns, "; "), restart, ev...)
	}
	return ok(fmt.Sprintf("MTU consistent: underlay %d, pods %d", u.MTU, podMTU), ev...)
}
