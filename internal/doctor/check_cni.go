package doctor

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"

	"github.com/loomnet/loom/internal/cni"
)

// bridgeName is the node-side bridge loom-cni uses, as the chosen CNI config
// says (default cni0).
func (f *Facts) bridgeName() string {
	if c, ok := f.CNI.Chosen(); ok && c.Loom != nil && c.Loom.Bridge != "" {
		return c.Loom.Bridge
	}
	return cni.DefaultBridge
}

// checkCNIConfig: the runtime uses the first valid network configuration in
// its conf dir. None (flannel's install-cni init container denied by
// SELinux, seed 004) means no pod gets a network; one whose subnetFile is
// not the agent's -subnet-file means loom-cni never sees the node's subnet.
func checkCNIConfig(f *Facts) Result {
	c := f.CNI
	dirEv := "CNI conf dir " + c.ConfDir
	install := fmt.Sprintf("write %s with loom-cni and the agent's subnet file: %s",
		filepath.Join(c.ConfDir, "10-loom.conflist"), sampleConflist(f))
	if c.DirErr != nil && !errors.Is(c.DirErr, fs.ErrNotExist) {
		return fail(fmt.Sprintf("cannot read %s: %v", c.ConfDir, c.DirErr),
			"check the directory's permissions and SELinux label (ls -Zd "+c.ConfDir+"; restorecon -Rv "+c.ConfDir+")", dirEv)
	}
	var ev []string
	for _, file := range c.Files {
		if file.Err != nil {
			ev = append(ev, fmt.Sprintf("%s: %v", file.Path, file.Err))
			continue
		}
		ev = append(ev, fmt.Sprintf("%s: network %q, plugins %s", file.Path, file.Name, strings.Join(file.Plugins, ",")))
	}
	chosen, found := c.Chosen()
	if !found {
		if len(c.Files) == 0 {
			return fail("no CNI network configuration in "+c.ConfDir+": the runtime reports \"cni config uninitialized\" and no pod starts",
				install+" (if an installer could not write it: SELinux, see ls -Zd "+c.ConfDir+")", dirEv)
		}
		return fail("no valid CNI network configuration in "+c.ConfDir,
			"fix or replace the files listed (or "+install+"); an unreadable file is often an SELinux label: restorecon -Rv "+c.ConfDir,
			append([]string{dirEv}, ev...)...)
	}
	var problems []string
	// A broken file that sorts before the chosen one is skipped by the
	// runtime, but it is somebody's intent gone wrong.
	for _, file := range c.Files {
		if file.Path == chosen.Path {
			break
		}
		problems = append(problems, fmt.Sprintf("%s sorts first but is invalid (%v); the runtime falls through to %s", filepath.Base(file.Path), file.Err, filepath.Base(chosen.Path)))
	}
	if chosen.Loom == nil {
		return warn(fmt.Sprintf("the runtime uses %s (plugins %s), which is neither loom-cni nor flannel: pods do not get loom's network",
			filepath.Base(chosen.Path), strings.Join(chosen.Plugins, ",")),
			"remove it or rename loom's conflist so it sorts first (runtimes take the first file by name)", ev...)
	}
	if chosen.Loom.SubnetFile != f.Opts.SubnetFile {
		return fail(fmt.Sprintf("%s reads %s but the agent writes %s (-subnet-file): loom-cni never sees this node's subnet",
			filepath.Base(chosen.Path), chosen.Loom.SubnetFile, f.Opts.SubnetFile),
			fmt.Sprintf(`set "subnetFile": %q in %s (or start the agent with -subnet-file=%s)`, f.Opts.SubnetFile, chosen.Path, chosen.Loom.SubnetFile),
			ev...)
	}
	if len(problems) > 0 {
		return warn(strings.Join(problems, "; "), "remove or fix the invalid file", ev...)
	}
	return ok(fmt.Sprintf("the runtime uses %s (network %q), which reads %s", filepath.Base(chosen.Path), chosen.Name, chosen.Loom.SubnetFile), ev...)
}

// sampleConflist is a minimal conflist for this node, for the fix text.
func sampleConflist(f *Facts) string {
	data, err := cni.ConfList("1.1.0", "loom", cni.NetConf{SubnetFile: f.Opts.SubnetFile})
	if err != nil {
		return err.Error()
	}
	return strings.Join(strings.Fields(string(data)), " ")
}

// checkCNI0Address: the bridge holds the gateway of the node's current
// subnet. When the node moves to another subnet (its lease expired while it
// was away, or the network changed) the bridge keeps the old address, new
// pods get a gateway that is not on their link, and flannel's bridge plugin
// fails every ADD ("cni0 already has an IP address different from ...").
func checkCNI0Address(f *Facts) Result {
	name := f.bridgeName()
	subnet, from := f.currentSubnet()
	if !subnet.IsValid() {
		return skip("the node's subnet is unknown (no lease, no subnet.env)")
	}
	br, found := f.Kernel.LinkByName(name)
	if !found {
		return ok(fmt.Sprintf("no %s yet: loom-cni creates it with gateway %s at the first pod", name, gatewayOf(subnet)), from)
	}
	want := gatewayOf(subnet)
	network, _ := f.network()
	var stale []netip.Prefix
	var v4 []string
	for _, a := range br.Addrs {
		if !a.Addr().Is4() {
			continue
		}
		v4 = append(v4, a.String())
		if a != want && (network.Contains(a.Addr()) || subnet.Overlaps(a)) {
			stale = append(stale, a)
		}
	}
	ev := []string{from, fmt.Sprintf("%s addresses: %s", name, strings.Join(orNone(v4), ", "))}
	has := slices.Contains(br.Addrs, want)
	switch {
	case len(stale) > 0:
		var dels []string
		for _, s := range stale {
			dels = append(dels, fmt.Sprintf("ip addr del %s dev %s", s, name))
		}
		return fail(fmt.Sprintf("%s holds %s, not in this node's subnet %s: pods made now get a gateway that is not on their link",
			name, joinPrefixes(stale), subnet),
			fmt.Sprintf("%s (or ip link delete %s); then re-create this node's pods, which still use addresses of the old subnet; loom-cni puts %s on %s at the next pod ADD",
				strings.Join(dels, "; "), name, want, name), ev...)
	case !has:
		return warn(fmt.Sprintf("%s lacks the gateway %s", name, want),
			"re-create a pod on this node (loom-cni adds the gateway at ADD), or: ip addr add "+want.String()+" dev "+name, ev...)
	}
	return ok(fmt.Sprintf("%s holds gateway %s of the node's subnet", name, want), ev...)
}

func joinPrefixes(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, ", ")
}

func orNone(s []string) []string {
	if len(s) == 0 {
		return []string{"none"}
	}
	return s
}
