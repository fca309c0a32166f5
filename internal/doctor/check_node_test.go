package doctor

import (
	"errors"
	"net/http"
	"testing"

	"github.com/loomnet/loom/internal/ipam"
)

func TestCheckIPForward(t *testing.T) {
	runCases(t, checkIPForward, []checkCase{
		{name: "healthy", want: OK, in: "net.ipv4.ip_forward = 1"},
		{name: "off", change: func(f *Facts) { f.Kernel.Sysctls[sysctlIPForward] = "0" },
			want: Fail, in: "net.ipv4.ip_forward = 0", fix: "sysctl -w net.ipv4.ip_forward=1"},
		{name: "IPv6 off in a dual-stack network", change: func(f *Facts) {
			f.Config.EnableIPv6 = true
			f.Kernel.Sysctls[sysctlIPv6Forward] = "0"
		}, want: Fail, in: "net.ipv6.conf.all.forwarding = 0", fix: "sysctl -w net.ipv6.conf.all.forwarding=1"},
		{name: "unreadable", change: func(f *Facts) { delete(f.Kernel.Sysctls, sysctlIPForward) }, want: Warn, in: "cannot read"},
	})
}

func TestCheckBridgeNF(t *testing.T) {
	runCases(t, checkBridgeNF, []checkCase{
		{name: "loaded and on", want: OK, in: "net.bridge.bridge-nf-call-iptables = 1"},
		{name: "loaded and off", change: func(f *Facts) { f.Kernel.Sysctls[sysctlBridgeNF] = "0" },
			want: Warn, in: "kube-proxy", fix: "sysctl -w net.bridge.bridge-nf-call-iptables=1"},
		{name: "not loaded", change: func(f *Facts) {
			f.Kernel.BrNetfilter = false
			delete(f.Kernel.Sysctls, sysctlBridgeNF)
		}, want: OK, in: "not loaded"},
	})
}

func TestCheckAgentReady(t *testing.T) {
	runCases(t, checkAgentReady, []checkCase{
		{name: "ready", want: OK, in: "[+]firewall ok"},
		{name: "down", change: func(f *Facts) { f.Ready.Status, f.Ready.Err = 0, errors.New("connect: connection refused") },
			want: Fail, in: "connection refused", fix: "start the agent"},
		{name: "not ready", change: func(f *Facts) {
			f.Ready.Status, f.Ready.Body = http.StatusServiceUnavailable, "[+]lease ok\n[-]subnet.env: /x says 10.244.9.1/24, the lease is 10.244.1.0/24\nnot ready\n"
		}, want: Fail, in: "the agent is not ready: subnet.env: /x says 10.244.9.1/24", fix: "read the agent's log"},
		{name: "health server off", change: func(f *Facts) { f.Ready = ReadyFacts{} }, want: Skip, in: "-healthz-port"},
	})
}

func TestCheckMTU(t *testing.T) {
	vxlan := func(f *Facts) {
		f.Config = mustConfig(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
		f.SubnetEnv.Env.MTU = 1450
		f.Kernel.Links = append(f.Kernel.Links, Link{Name: "flannel.1", Index: 9, Type: "vxlan", MTU: 1450})
		for i := range f.Kernel.Links {
			if f.Kernel.Links[i].Master == 3 || f.Kernel.Links[i].Name == "cni0" {
				f.Kernel.Links[i].MTU = 1450
			}
		}
	}
	runCases(t, checkMTU, []checkCase{
		{name: "host-gw healthy", want: OK, in: "underlay 1500, pods 1500"},
		{name: "underlay lowered", change: func(f *Facts) { f.Underlay.MTU = 1400 },
			want: Fail, in: "FLANNEL_MTU 1500 is above what eth0 carries (1400 - 0 = 1400)", fix: "ip link set eth0 mtu"},
		{name: "vxlan healthy", change: vxlan, want: OK, in: "flannel.1 MTU 1450"},
		{name: "vxlan with host-gw's MTU", change: func(f *Facts) { vxlan(f); f.SubnetEnv.Env.MTU = 1500 },
			want: Fail, in: "(1500 - 50 = 1450)"},
		{name: "vxlan device too big", change: func(f *Facts) { vxlan(f); f.Kernel.Links[5].MTU = 1500 },
			want: Fail, in: "flannel.1 MTU 1500 is above eth0's 1500 minus the 50-byte header"},
		{name: "pod link above the pod MTU", change: func(f *Facts) { f.Kernel.Links[3].MTU = 9000 },
			want: Fail, in: "veth0a=9000"},
		{name: "pod links below after an MTU raise", change: func(f *Facts) {
			f.Underlay.MTU, f.SubnetEnv.Env.MTU = 9000, 9000
			f.Kernel.Links[2].MTU = 1500
		}, want: Warn, in: "pod links below the pod MTU 9000", fix: "re-create the pods"},
		{name: "FLANNEL_MTU below what the underlay allows", change: func(f *Facts) { f.SubnetEnv.Env.MTU = 1400 },
			want: Fail, in: "above the pod MTU 1400"},
		{name: "no subnet.env", change: func(f *Facts) { f.SubnetEnv.Env = nil }, want: Skip},
	})
}

func TestCheckIPAMUsage(t *testing.T) {
	fill := func(n int) func(*Facts) {
		return func(f *Facts) {
			f.IPAM.Allocations = nil
			a := addr("10.244.1.2")
			for range n {
				f.IPAM.Allocations = append(f.IPAM.Allocations, ipam.Allocation{IP: a, ContainerID: "c" + a.String(), IfName: "eth0"})
				a = a.Next()
			}
		}
	}
	runCases(t, checkIPAMUsage, []checkCase{
		{name: "healthy", want: OK, in: "2 of 253"},
		{name: "89%", change: fill(225), want: OK},
		{name: "250 of 253", change: fill(250), want: Warn, in: "98% full (250/253)", fix: "ipam-leak"},
		{name: "full", change: fill(253), want: Fail, in: "is full (253/253)", fix: "release leaked addresses"},
		{name: "old subnet's files not counted", change: func(f *Facts) {
			fill(253)(f)
			f.SubnetEnv.Env.Subnet = pfx("10.244.7.1/24")
		}, want: OK, in: "0 of 253"},
		{name: "unreadable", change: func(f *Facts) { f.IPAM.Err = errors.New("permission denied") }, want: Warn},
		{name: "no CNI config", change: func(f *Facts) { f.IPAM = IPAMFacts{} }, want: Skip, in: "cni-config"},
	})
}

func TestCheckIPAMLeak(t *testing.T) {
	leak := func(f *Facts) {
		f.IPAM.Allocations = append(f.IPAM.Allocations,
			ipam.Allocation{IP: addr("10.244.1.4"), ContainerID: "pod-gone", IfName: "eth0"},
			ipam.Allocation{IP: addr("10.244.1.5"), ContainerID: "never-cached", IfName: "eth0"})
		f.CNI.Cache = append(f.CNI.Cache, CacheEntry{ContainerID: "pod-gone", IfName: "eth0", NetNS: "/var/run/netns/cni-gone"})
	}
	runCases(t, checkIPAMLeak, []checkCase{
		{name: "healthy", want: OK, in: "all 2 allocations belong to live pods"},
		{name: "netns gone and no record", change: leak, want: Warn,
			in: "2 of 4 allocations without a live pod (leaked): 10.244.1.4, 10.244.1.5", fix: "rm /var/lib/cni/networks/loom/10.244.1.4"},
		{name: "evidence says why", change: leak, want: Warn, in: "its netns /var/run/netns/cni-gone is gone"},
		{name: "old host-local file without ifname", change: func(f *Facts) { f.IPAM.Allocations[0].IfName = "" }, want: OK},
		{name: "no cache to judge by", change: func(f *Facts) { f.CNI.Cache = nil }, want: Skip, in: "cannot tell"},
		{name: "no allocations", change: func(f *Facts) { f.IPAM.Allocations = nil }, want: OK},
	})
}
