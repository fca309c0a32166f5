// Package cni is loom-cni, the CNI plugin a container runtime runs for each
// pod: it connects the pod to the node's bridge (cni0) with a veth pair and
// gives it an address from the node's pod subnet, which it reads from the
// subnet.env that loom agent (or flanneld) writes. It does flannel's CNI
// plugin + bridge + host-local's job in one small binary, with host-local's
// on-disk store (package ipam), so either plugin can run on a node after the
// other.
//
// Commands follow CNI spec 1.1.0 (ADD, DEL, CHECK, GC, STATUS, VERSION) and
// also serve 1.0.0 and 0.4.0 callers, whose results are converted:
//
//   - ADD allocates, builds the bridge and veth, and undoes what it did on
//     any failure, so a failed ADD leaves neither address nor interface.
//   - DEL is idempotent: a missing netns, link, allocation or subnet.env is
//     success. It removes the interface before freeing the address, so a
//     failed DEL (which the runtime retries) never lets an address in use
//     be handed to another pod.
//   - CHECK compares the pod's interface, addresses and routes, and the
//     node's veth and bridge, with the allocation.
//   - GC frees allocations of attachments the runtime no longer knows.
//   - STATUS fails with code 50 while subnet.env is missing or unusable, or
//     every address is taken.
//
// Error codes: 4 bad environment: a missing variable (skel), or a CNI_NETNS
// that is missing, not a network namespace, or the node's own network
// namespace (the spec's code for an invalid variable, the message naming
// it; libcni's code 8 is not in the spec); 6 undecodable stdin, 7 bad field
// in the configuration, 11 IPAM store locked too long (retry), 50 not
// available (no subnet.env yet, or pool exhausted), 999 anything else.
package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/subnetenv"
)

// About is what the binary prints when run without CNI_COMMAND.
const About = "loom-cni: the loom CNI plugin (bridge + host-local compatible IPAM, reads flannel's subnet.env)"

// Versions are the CNI spec versions loom-cni answers.
func Versions() version.PluginInfo { return version.PluginSupports("0.4.0", "1.0.0", "1.1.0") }

// Funcs are the command handlers for skel.PluginMainFuncs.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: Add, Del: Del, Check: Check, GC: GC, Status: Status}
}

// Add connects the pod and prints the result, in the caller's version, to
// stdout.
func Add(args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	p, err := readPlan(c)
	if err != nil {
		return err
	}
	res, err := add(args, c, p)
	if err != nil {
		return cniError("ADD", err)
	}
	return printResult(res, c.CNIVersion)
}

func add(args *skel.CmdArgs, c *Config, p plan) (_ *current.Result, err error) {
	pod, err := openNetNS(args.Netns)
	if err != nil {
		return nil, err
	}
	defer pod.Close()
	hostNL, podNL, err := handles(pod)
	if err != nil {
		return nil, err
	}
	defer hostNL.Close()
	defer podNL.Close()

	if _, err := podNL.LinkByName(args.IfName); err == nil {
		return nil, fmt.Errorf("interface %s already exists in %s: ADD twice without DEL, or CNI_IFNAME taken by another network", args.IfName, args.Netns)
	}

	store, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name})
	if err != nil {
		return nil, err
	}
	att := ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName}
	// A retried ADD finds its earlier addresses; they may belong to an
	// interface that still exists, so only addresses this ADD reserved are
	// freed when it fails.
	rsv, err := store.Reserve(att, p.pools())
	if err != nil {
		return nil, fmt.Errorf("allocate addresses for %s/%s: %w", att.ContainerID, att.IfName, err)
	}
	defer func() {
		if err != nil {
			if uerr := rsv.Undo(); uerr != nil {
				err = errors.Join(err, fmt.Errorf("roll back address allocation: %w", uerr))
			}
		}
	}()

	br, err := ensureBridge(hostNL, c.Bridge, p.mtu, p.families)
	if err != nil {
		return nil, err
	}
	raw, err := rawSocket()
	if err != nil {
		return nil, err
	}
	defer raw.Close()
	v := vethPair{hostName: HostVethName(args.ContainerID, args.IfName), podName: args.IfName,
		hostMAC: newMAC(), podMAC: newMAC(), mtu: p.mtu, bridge: br.Index, podNS: int(pod.Fd())}
	if err := createVeth(raw, v); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			// Deleting one end deletes the pair, the pod end included.
			if derr := deleteVeth(hostNL, v.hostName); derr != nil {
				err = errors.Join(err, fmt.Errorf("roll back veth: %w", derr))
			}
		}
	}()
	// A new port starts with hairpin off, so only "on" needs a request.
	if c.HairpinMode {
		if err := setHairpin(raw, v.hostName); err != nil {
			return nil, err
		}
	}

	podAddrs, routes := p.podConfig(rsv.Addrs)
	podLink, err := setupPod(podNL, args.IfName, podAddrs, routes)
	if err != nil {
		return nil, err
	}
	// The bridge's MTU follows its ports' smallest unless it was set by
	// hand; a bridge already at the pods' MTU stays there as this port
	// joins, any other is read again.
	brMTU := br.MTU
	if brMTU != p.mtu {
		l, err := hostNL.LinkByName(br.Name)
		if err != nil {
			return nil, fmt.Errorf("find bridge %s: %w", br.Name, err)
		}
		brMTU = l.Attrs().MTU
	}
	ifaces := []*current.Interface{
		{Name: br.Name, Mac: br.HardwareAddr.String(), Mtu: brMTU},
		{Name: v.hostName, Mac: v.hostMAC.String(), Mtu: p.mtu},
		{Name: podLink.Attrs().Name, Mac: podLink.Attrs().HardwareAddr.String(), Mtu: podLink.Attrs().MTU, Sandbox: args.Netns},
	}
	return newResult(ifaces, p, podAddrs, routes), nil
}

// newResult describes what ADD built: interfaces bridge, node veth and pod
// end (index 2, which every address refers to), addresses and routes.
func newResult(ifaces []*current.Interface, p plan, podAddrs []netip.Prefix, routes []route) *current.Result {
	res := &current.Result{CNIVersion: current.ImplementedSpecVersion, Interfaces: ifaces}
	for i, a := range podAddrs {
		res.IPs = append(res.IPs, &current.IPConfig{Interface: current.Int(2), Address: *ipNet(a), Gateway: p.families[i].gateway.Addr().AsSlice()})
	}
	for _, r := range routes {
		res.Routes = append(res.Routes, &types.Route{Dst: *ipNet(r.dst), GW: r.gw.AsSlice()})
	}
	return res
}

// Del disconnects the pod and frees its addresses. It reads neither
// subnet.env nor the cached result: everything it removes is found from the
// attachment itself.
func Del(args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	if err := del(args, c); err != nil {
		return cniError("DEL", err)
	}
	return nil
}

func del(args *skel.CmdArgs, c *Config) error {
	hostNL, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("open netlink: %w", err)
	}
	defer hostNL.Close()
	if args.Netns != "" {
		if err := delPodEnd(args.Netns, args.IfName); err != nil {
			return err
		}
	}
	// The node end goes with the pod end; it is deleted by name in case the
	// pod end was out of reach (netns path already unmounted).
	if err := deleteVeth(hostNL, HostVethName(args.ContainerID, args.IfName)); err != nil {
		return err
	}
	store, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name})
	if err != nil {
		return err
	}
	if _, err := store.Release(ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName}); err != nil {
		return fmt.Errorf("free addresses of %s/%s: %w", args.ContainerID, args.IfName, err)
	}
	return nil
}

// delPodEnd deletes the pod's interface; a pod netns that is already gone
// took it along.
func delPodEnd(path, ifName string) error {
	pod, err := ns.GetNS(path)
	if netnsGone(err) {
		return nil
	}
	if err != nil {
		return badNetNS(path, err.Error())
	}
	defer pod.Close()
	if err := checkPodNetNS(pod); err != nil {
		return err
	}
	podNL, err := netlink.NewHandleAt(netns.NsHandle(pod.Fd()), unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("open netlink in %s: %w", path, err)
	}
	defer podNL.Close()
	return deleteVeth(podNL, ifName)
}

// netnsGone reports whether a netns path no longer names a namespace: the
// pod is gone, and its interfaces went with it.
func netnsGone(err error) bool {
	_, notExist := errors.AsType[ns.NSPathNotExistErr](err)
	_, notNS := errors.AsType[ns.NSPathNotNSErr](err)
	return notExist || notNS
}

// Check verifies that the pod's interface still has its allocated
// addresses and routes and is attached to the bridge.
func Check(args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	p, err := readPlan(c)
	if err != nil {
		return err
	}
	if err := check(args, c, p); err != nil {
		return cniError("CHECK", err)
	}
	return nil
}

func check(args *skel.CmdArgs, c *Config, p plan) error {
	store, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name})
	if err != nil {
		return err
	}
	addrs, err := store.Lookup(ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName})
	if err != nil {
		return err
	}
	if len(addrs) == 0 {
		return types.NewError(types.ErrUnknownContainer,
			fmt.Sprintf("CHECK: no address is allocated to %s/%s in %s", args.ContainerID, args.IfName, store.Dir()), "")
	}
	if err := checkPrevResult(c.PrevResult, addrs); err != nil {
		return err
	}

	pod, err := openNetNS(args.Netns)
	if err != nil {
		return err
	}
	defer pod.Close()
	hostNL, podNL, err := handles(pod)
	if err != nil {
		return err
	}
	defer hostNL.Close()
	defer podNL.Close()

	if err := checkPod(podNL, args, p, addrs); err != nil {
		return err
	}
	return checkNode(hostNL, args, c.Bridge, p)
}

// checkPod verifies the pod end: up, one address per family, the routes.
func checkPod(podNL *netlink.Handle, args *skel.CmdArgs, p plan, addrs []netip.Addr) error {
	podLink, err := podNL.LinkByName(args.IfName)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", args.IfName, args.Netns, err)
	}
	if podLink.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("%s in %s is down", args.IfName, args.Netns)
	}
	covered := make(map[int]bool) // family index -> has an address
	for _, a := range addrs {
		f, ok := p.familyOf(a)
		if !ok {
			return fmt.Errorf("%s/%s holds %s, outside the node's subnets: the node's subnet changed; recreate the pod", args.ContainerID, args.IfName, a)
		}
		for i := range p.families {
			if p.families[i].pool == f.pool {
				covered[i] = true
			}
		}
		want := netip.PrefixFrom(a, f.pool.Subnet.Bits())
		have, err := retryDump(func() ([]netlink.Addr, error) { return podNL.AddrList(podLink, familyOf(a)) })
		if err != nil {
			return fmt.Errorf("list addresses of %s: %w", args.IfName, err)
		}
		if !containsPrefix(have, want) {
			return fmt.Errorf("%s in %s lacks its address %s", args.IfName, args.Netns, want)
		}
		routes, err := retryDump(func() ([]netlink.Route, error) { return podNL.RouteList(podLink, familyOf(a)) })
		if err != nil {
			return fmt.Errorf("list routes of %s: %w", args.IfName, err)
		}
		for _, dst := range f.routes {
			if r := (route{dst: dst, gw: f.gateway.Addr()}); !hasRoute(routes, r) {
				return fmt.Errorf("%s in %s lacks its route %s via %s", args.IfName, args.Netns, r.dst, r.gw)
			}
		}
	}
	for i, f := range p.families {
		if !covered[i] {
			return fmt.Errorf("%s/%s has no address in %s", args.ContainerID, args.IfName, f.pool)
		}
	}
	return nil
}

// checkNode verifies the node end: the veth is a port of the bridge, and
// the bridge holds the gateway addresses.
func checkNode(hostNL *netlink.Handle, args *skel.CmdArgs, bridge string, p plan) error {
	hostName := HostVethName(args.ContainerID, args.IfName)
	hostLink, err := hostNL.LinkByName(hostName)
	if err != nil {
		return fmt.Errorf("find the node end %s of %s/%s: %w", hostName, args.ContainerID, args.IfName, err)
	}
	br, err := hostNL.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("find bridge %s: %w", bridge, err)
	}
	if hostLink.Attrs().MasterIndex != br.Attrs().Index {
		return fmt.Errorf("%s is not a port of %s", hostName, bridge)
	}
	for _, f := range p.families {
		have, err := retryDump(func() ([]netlink.Addr, error) { return hostNL.AddrList(br, familyOf(f.gateway.Addr())) })
		if err != nil {
			return fmt.Errorf("list addresses of %s: %w", bridge, err)
		}
		if !containsPrefix(have, f.gateway) {
			return fmt.Errorf("bridge %s lacks its gateway address %s", bridge, f.gateway)
		}
	}
	return nil
}

// checkPrevResult compares the runtime's cached ADD result with the store.
func checkPrevResult(prev types.Result, addrs []netip.Addr) error {
	if prev == nil {
		return nil
	}
	res, err := current.NewResultFromResult(prev)
	if err != nil {
		return fmt.Errorf("convert prevResult: %w", err)
	}
	for _, ipc := range res.IPs {
		a := addrOf(ipc.Address.IP)
		found := false
		for _, have := range addrs {
			found = found || have == a
		}
		if !found {
			return fmt.Errorf("prevResult has %s, which the IPAM store does not hold for this attachment (it holds %v)", a, addrs)
		}
	}
	return nil
}

func containsPrefix(addrs []netlink.Addr, want netip.Prefix) bool {
	for _, a := range addrs {
		if p, ok := prefixOf(a.IPNet); ok && p == want {
			return true
		}
	}
	return false
}

// GC frees the addresses of attachments not in the runtime's list, and the
// node end of their veth if it is still there.
func GC(args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	if c.ValidAttachments == nil {
		return nil
	}
	store, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name})
	if err != nil {
		return cniError("GC", err)
	}
	freed, err := store.GC(c.ValidAttachments)
	errs := []error{err}
	if len(freed) > 0 {
		hostNL, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return cniError("GC", errors.Join(append(errs, fmt.Errorf("open netlink: %w", err))...))
		}
		defer hostNL.Close()
		for _, al := range freed {
			if al.IfName != "" {
				errs = append(errs, deleteVeth(hostNL, HostVethName(al.ContainerID, al.IfName)))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return cniError("GC", err)
	}
	return nil
}

// Status reports whether an ADD could succeed now.
func Status(args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	p, err := readPlan(c)
	if err != nil {
		return err
	}
	store, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name})
	if err != nil {
		return cniError("STATUS", err)
	}
	usage, err := store.Usage(p.pools())
	if err != nil {
		return cniError("STATUS", err)
	}
	for _, u := range usage {
		if u.Full() {
			return types.NewError(types.ErrPluginNotAvailable,
				fmt.Sprintf("range %s is full: %d of %d addresses allocated", u.Range, u.Allocated, u.Capacity),
				"delete pods on this node, or run GC to free addresses of pods that are gone")
		}
	}
	return nil
}

// readPlan reads subnet.env. Any failure is "plugin not available" (50):
// the node agent has not (correctly) published the node's subnet yet.
func readPlan(c *Config) (plan, error) {
	env, err := subnetenv.Read(c.SubnetFile)
	if errors.Is(err, subnetenv.ErrNotExist) {
		return plan{}, types.NewError(types.ErrPluginNotAvailable,
			fmt.Sprintf("loom agent has not written %s yet", c.SubnetFile),
			"loom-cni takes the node's pod subnet and MTU from that file: start loom agent (or flanneld) on this node, or point subnetFile in the CNI config at the file the agent writes")
	}
	if err != nil {
		return plan{}, types.NewError(types.ErrPluginNotAvailable, "unusable subnet.env: "+err.Error(), "loom agent rewrites the file; check that it runs and that nothing else writes there")
	}
	// A pod MTU above what the node's overlay carries would make every
	// full-size packet vanish (or fragment) on the way out: refuse it
	// loudly instead of configuring it silently.
	if c.MTU > env.MTU {
		return plan{}, invalidConf("mtu", fmt.Sprintf("%d is larger than FLANNEL_MTU=%d in %s, the most the node's overlay path carries: leave mtu out, or set it to %d or less", c.MTU, env.MTU, c.SubnetFile, env.MTU))
	}
	p, err := newPlan(c, env)
	if err != nil {
		return plan{}, types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("unusable %s: %v", c.SubnetFile, err), "")
	}
	return p, nil
}

// openNetNS opens CNI_NETNS for ADD and CHECK, refusing anything but
// another network namespace: a runtime bug (or a hostile caller) must
// never make loom-cni re-address the node itself.
func openNetNS(path string) (ns.NetNS, error) {
	pod, err := ns.GetNS(path)
	if err != nil {
		return nil, badNetNS(path, err.Error())
	}
	if err := checkPodNetNS(pod); err != nil {
		pod.Close()
		return nil, err
	}
	return pod, nil
}

// checkPodNetNS refuses a namespace that is not a network namespace (a
// mount or PID namespace passes ns.GetNS: it checks the file system, not
// the kind), and the node's own network namespace: the pod-side steps
// (create CNI_IFNAME, delete CNI_IFNAME) would then hit the node's
// interfaces. skel checks the latter too, but only after the command ran.
func checkPodNetNS(pod ns.NetNS) error {
	kind, err := unix.IoctlRetInt(int(pod.Fd()), unix.NS_GET_NSTYPE)
	if err != nil {
		return badNetNS(pod.Path(), fmt.Sprintf("cannot tell what kind of namespace it is: %v", err))
	}
	if kind != unix.CLONE_NEWNET {
		return badNetNS(pod.Path(), "it is not a network namespace")
	}
	self, err := netns.Get()
	if err != nil {
		return fmt.Errorf("open the plugin's own netns: %w", err)
	}
	defer self.Close()
	if self.Equal(netns.NsHandle(pod.Fd())) {
		return badNetNS(pod.Path(), "it is the node's own network namespace, not a pod's")
	}
	return nil
}

// badNetNS is the error for an unusable CNI_NETNS: code 4, naming the
// variable as the spec asks.
func badNetNS(path, why string) error {
	return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_NETNS %q: %s", path, why),
		"CNI_NETNS must be the path of the pod's network namespace, e.g. /var/run/netns/cni-1234")
}

// handles opens netlink on the node (this process's netns) and in the pod.
// Only NETLINK_ROUTE: a handle opened without families also opens XFRM and
// netfilter sockets, each one more namespace switch for the pod's handle.
func handles(pod ns.NetNS) (hostNL, podNL *netlink.Handle, err error) {
	hostNL, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, fmt.Errorf("open netlink: %w", err)
	}
	podNL, err = netlink.NewHandleAt(netns.NsHandle(pod.Fd()), unix.NETLINK_ROUTE)
	if err != nil {
		hostNL.Close()
		return nil, nil, fmt.Errorf("open netlink in %s: %w", pod.Path(), err)
	}
	return hostNL, podNL, nil
}

// rawSocket opens a NETLINK_ROUTE socket in the node's netns for the
// requests the netlink library cannot build (createVeth, setHairpin).
func rawSocket() (*nl.SocketHandle, error) {
	s, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("open netlink: %w", err)
	}
	return &nl.SocketHandle{Socket: s}, nil
}

// cniError gives err its CNI error code, keeping one a callee already chose.
func cniError(cmd string, err error) error {
	if te, ok := errors.AsType[*types.Error](err); ok {
		return te
	}
	msg := cmd + ": " + err.Error()
	switch {
	case errors.Is(err, ipam.ErrLockTimeout):
		return types.NewError(types.ErrTryAgainLater, msg, "another CNI invocation holds the IPAM store lock; retry")
	case errors.Is(err, ipam.ErrExhausted):
		return types.NewError(types.ErrPluginNotAvailable, msg, "delete pods on this node, or run GC to free addresses of pods that are gone")
	case errors.Is(err, os.ErrPermission):
		return types.NewError(types.ErrIOFailure, msg, "")
	}
	return types.NewError(types.ErrInternal, msg, "")
}
