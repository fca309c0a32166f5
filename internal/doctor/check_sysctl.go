package doctor

import (
	"fmt"
	"strings"
)

// Sysctl names doctor reads.
const (
	sysctlIPForward   = "net.ipv4.ip_forward"
	sysctlIPv6Forward = "net.ipv6.conf.all.forwarding"
	sysctlBridgeNF    = "net.bridge.bridge-nf-call-iptables"
)

// checkIPForward: a node routes between its pods and its peers. The agent
// turns forwarding on at start; anything that turns it off later (a
// sysctl.d file applied after it, systemd-networkd's IPForward=no, a
// hardening script) cuts every pod off from other nodes and the outside.
func checkIPForward(f *Facts) Result {
	keys := []string{sysctlIPForward}
	if f.Config != nil && f.Config.EnableIPv6 {
		keys = append(keys, sysctlIPv6Forward)
	}
	var ev, off []string
	for _, k := range keys {
		v, found := f.Kernel.Sysctls[k]
		if !found {
			return warn("cannot read "+k, "run doctor as root on the node", "/proc/sys/"+strings.ReplaceAll(k, ".", "/")+" unreadable")
		}
		ev = append(ev, fmt.Sprintf("%s = %s", k, v))
		if v != "1" {
			off = append(off, k)
		}
	}
	if len(off) > 0 {
		var cmds, persist []string
		for _, k := range off {
			cmds = append(cmds, "sysctl -w "+k+"=1")
			persist = append(persist, k+"=1")
		}
		return fail("IP forwarding is off: pods cannot reach other nodes or the outside",
			fmt.Sprintf("%s; persist it (echo '%s' > /etc/sysctl.d/90-loom.conf) and find what turned it off (sysctl.d files, systemd-networkd IPForward=, a hardening script)",
				strings.Join(cmds, "; "), strings.Join(persist, `\n`)), ev...)
	}
	return ok("IP forwarding is on", ev...)
}

// checkBridgeNF: with br_netfilter loaded, bridge-nf-call-iptables decides
// whether pod-to-pod traffic on the node's bridge crosses iptables. loom
// needs neither; kube-proxy does (a Service whose backend is on the same
// node is DNATed only on bridged packets that cross iptables).
func checkBridgeNF(f *Facts) Result {
	if !f.Kernel.BrNetfilter {
		return ok("br_netfilter is not loaded: bridged pod traffic skips iptables (loom needs nothing else; kube-proxy needs modprobe br_netfilter)",
			"/proc/sys/net/bridge absent")
	}
	v, found := f.Kernel.Sysctls[sysctlBridgeNF]
	if !found {
		return warn("cannot read "+sysctlBridgeNF, "run doctor as root on the node")
	}
	ev := fmt.Sprintf("%s = %s (br_netfilter loaded)", sysctlBridgeNF, v)
	if v == "1" {
		return ok("bridged pod traffic crosses iptables: kube-proxy sees it, and the FORWARD chain must accept the pod network (see "+CheckForward+")", ev)
	}
	return warn("bridge-nf-call-iptables is off: kube-proxy does not see pod-to-pod traffic on the bridge, so a Service whose backend runs on this node fails from pods here",
		"sysctl -w "+sysctlBridgeNF+"=1 and persist it in /etc/sysctl.d (kube-proxy and kubeadm's preflight expect 1)", ev)
}
