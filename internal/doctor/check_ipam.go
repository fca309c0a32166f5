package doctor

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"path/filepath"
	"strings"

	"github.com/loomnet/loom/internal/ipam"
)

// usageWarnPercent is where ipam-usage starts to warn (250 of a /24's 253).
const usageWarnPercent = 90

// ipamRange is the pool loom-cni allocates from: subnet.env's subnet
// without the gateway.
func (f *Facts) ipamRange() (ipam.Range, bool) {
	var subnet netip.Prefix
	if e := f.SubnetEnv.Env; e != nil && e.Subnet.IsValid() {
		subnet = e.Subnet
	} else if s, _ := f.currentSubnet(); s.IsValid() {
		subnet = gatewayOf(s)
	}
	if !subnet.IsValid() {
		return ipam.Range{}, false
	}
	return ipam.Range{Subnet: subnet.Masked(), Gateway: subnet.Addr()}, true
}

// checkIPAMUsage: a full pool fails every pod ADD on the node ("no free
// address"); it fills up mostly through leaks (see ipam-leak).
func checkIPAMUsage(f *Facts) Result {
	r, found := f.ipamRange()
	if !found {
		return skip("the node's subnet is unknown (no subnet.env)")
	}
	if f.IPAM.Dir == "" && f.IPAM.Err == nil {
		return skip("the IPAM store is unknown without a loom-cni or flannel CNI config (see %s)", CheckCNIConfig)
	}
	if f.IPAM.Err != nil {
		return warn("cannot read the IPAM store: "+f.IPAM.Err.Error(), "check "+f.IPAM.Dir+"'s permissions", f.IPAM.Dir)
	}
	var used uint64
	for _, a := range f.IPAM.Allocations {
		if r.Contains(a.IP) {
			used++
		}
	}
	capacity := r.Capacity()
	ev := fmt.Sprintf("%s: %d of %d addresses of %s allocated", f.IPAM.Dir, used, capacity, r)
	fix := "release leaked addresses (see " + CheckIPAMLeak + "); if the node really runs that many pods, use a shorter SubnetLen in the network config (new nodes) or spread the pods"
	switch {
	case capacity > 0 && used >= capacity:
		return fail(fmt.Sprintf("IPAM pool %s is full (%d/%d): every new pod on this node fails with \"no free address\"", r, used, capacity), fix, ev)
	case capacity > 0 && used*100 >= capacity*usageWarnPercent:
		return warn(fmt.Sprintf("IPAM pool %s is %d%% full (%d/%d)", r, used*100/capacity, used, capacity), fix, ev)
	}
	return ok(fmt.Sprintf("IPAM pool %s: %d of %d allocated", r, used, capacity), ev)
}

// checkIPAMLeak: an allocation whose container has no live pod is a leak:
// the runtime lost a DEL (a crash, a reboot, a netns deleted by hand). A pod
// is live when the runtime's CNI cache knows its container and its netns
// still exists. Doctor cannot be sure, so it warns and lists.
func checkIPAMLeak(f *Facts) Result {
	if f.IPAM.Err != nil || f.IPAM.Dir == "" {
		return skip("IPAM store unknown or unreadable (see %s)", CheckIPAMUsage)
	}
	if len(f.IPAM.Allocations) == 0 {
		return ok("no allocations in " + f.IPAM.Dir)
	}
	if f.CNI.CacheErr != nil && !errors.Is(f.CNI.CacheErr, fs.ErrNotExist) {
		return skip("cannot read the CNI cache %s: %v", f.CNI.CacheDir, f.CNI.CacheErr)
	}
	if len(f.CNI.Cache) == 0 {
		return skip("no CNI results cached in %s: cannot tell live pods from leaks (%d allocations)", f.CNI.CacheDir, len(f.IPAM.Allocations))
	}
	type key struct{ id, ifname string }
	live := map[key]bool{}
	known := map[key]CacheEntry{}
	for _, c := range f.CNI.Cache {
		k := key{c.ContainerID, c.IfName}
		known[k] = c
		if c.NetNSExists {
			live[k] = true
		}
	}
	var leaks, ev, rms []string
	for _, a := range f.IPAM.Allocations {
		k := key{a.ContainerID, a.IfName}
		if a.IfName == "" { // old host-local files: matched by container alone
			for c := range live {
				if c.id == a.ContainerID {
					k = c
				}
			}
		}
		if live[k] {
			continue
		}
		why := "no CNI cache record for its container"
		if c, found := known[k]; found {
			why = fmt.Sprintf("its netns %s is gone", c.NetNS)
		}
		leaks = append(leaks, a.IP.String())
		ev = append(ev, fmt.Sprintf("%s: container %s/%s: %s", filepath.Join(f.IPAM.Dir, a.IP.String()), a.ContainerID, a.IfName, why))
		rms = append(rms, filepath.Join(f.IPAM.Dir, a.IP.String()))
	}
	if len(leaks) == 0 {
		return ok(fmt.Sprintf("all %d allocations belong to live pods", len(f.IPAM.Allocations)), "CNI cache "+f.CNI.CacheDir)
	}
	shown := rms
	if len(shown) > 5 {
		shown = append(shown[:5:5], "...")
	}
	return warn(fmt.Sprintf("%d of %s without a live pod (leaked): %s", len(leaks), plural(len(f.IPAM.Allocations), "allocation"), firstN(leaks, 8)),
		"check that no pod uses them (crictl pods; ip netns), then release them: let the runtime run CNI GC, or rm "+strings.Join(shown, " "),
		ev...)
}

func firstN(s []string, n int) string {
	if len(s) <= n {
		return strings.Join(s, ", ")
	}
	return strings.Join(s[:n], ", ") + fmt.Sprintf(" and %d more", len(s)-n)
}
