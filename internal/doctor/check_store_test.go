package doctor

import (
	"errors"
	"fmt"
	"testing"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/subnetenv"
)

func TestCheckStore(t *testing.T) {
	runCases(t, checkStore, []checkCase{
		{name: "healthy", want: OK, in: "3 leases"},
		{name: "unreachable", change: func(f *Facts) {
			f.Store.Err = errors.New("context deadline exceeded")
			f.Store.Dials = []string{"TCP connect to 198.18.0.1:2379: connect: connection refused"}
		}, want: Fail, in: "connection refused", fix: "etcdctl --endpoints=http://198.18.0.1:2379 endpoint health"},
		{name: "empty registry", change: func(f *Facts) { f.Store.Leases = nil },
			want: Fail, in: "registry is empty", fix: "restart every agent"},
		{name: "config missing", change: func(f *Facts) {
			f.Store.Config, f.Store.ConfigErr = nil, errors.New("network config /coreos.com/network/config is not in etcd")
		}, want: Fail, in: "not in etcd", fix: "etcdctl --endpoints=http://198.18.0.1:2379 put /coreos.com/network/config"},
		{name: "config from a file instead", change: func(f *Facts) {
			f.Store.Config, f.Store.ConfigErr = nil, errors.New("not in etcd")
			f.Opts.NetConfigPathSet = true
		}, want: OK},
	})
}

// withStoreNetwork is the cidr-mismatch fault: the store's Network changed
// under running agents.
func withStoreNetwork(network string) func(*Facts) {
	return func(f *Facts) {
		cfg := *f.Config
		cfg.Network = pfx(network)
		f.Config, f.Store.Config = &cfg, &cfg
	}
}

func TestCheckNetworkVsLease(t *testing.T) {
	runCases(t, checkNetworkVsLease, []checkCase{
		{name: "healthy", want: OK, in: "inside Network 10.244.0.0/16"},
		{name: "store network changed under running agents", change: withStoreNetwork("10.224.0.0/16"),
			want: Fail, in: "the agent runs with Network 10.244.0.0/16 (subnet.env) but the config says 10.224.0.0/16",
			fix: `put /coreos.com/network/config '{"Network":"10.244.0.0/16"`},
		{name: "kubeadm pod CIDR as lease (seed 000)", change: func(f *Facts) {
			f.SubnetEnv.Env.Subnet = pfx("10.224.0.1/24")
			f.Store.Leases[0].Subnet = pfx("10.224.0.0/24")
		}, want: Fail, in: "this node's subnet 10.224.0.0/24 is outside Network 10.244.0.0/16", fix: "--pod-network-cidr"},
		{name: "a peer outside", change: func(f *Facts) { f.Store.Leases[2].Subnet = pfx("10.96.3.0/24") },
			want: Fail, in: "10.96.3.0/24 (n3)"},
		{name: "net-config-path disagrees with the store", change: func(f *Facts) {
			cfg := *f.Config
			cfg.Network = pfx("10.224.0.0/16")
			f.Config, f.ConfigFrom = &cfg, "file /etc/kube-flannel/net-conf.json"
			f.Opts.NetConfigPathSet, f.Opts.NetConfigPath = true, "/etc/kube-flannel/net-conf.json"
		}, want: Fail, in: "file /etc/kube-flannel/net-conf.json: Network 10.224.0.0/16", fix: "the store says 10.244.0.0/16"},
		{name: "no config", change: func(f *Facts) { f.Config = nil }, want: Skip},
		{name: "net-config-path unreadable", change: func(f *Facts) {
			f.Config, f.ConfigErr = nil, errors.New("open /etc/loom/net-conf.json: permission denied")
			f.Opts.NetConfigPathSet, f.Opts.NetConfigPath = true, "/etc/loom/net-conf.json"
		}, want: Fail, in: "/etc/loom/net-conf.json is unreadable: open /etc/loom/net-conf.json: permission denied", fix: "write /etc/loom/net-conf.json"},
	})
}

func TestCheckSubnetEnv(t *testing.T) {
	runCases(t, checkSubnetEnv, []checkCase{
		{name: "healthy", want: OK, in: "FLANNEL_SUBNET=10.244.1.1/24"},
		{name: "missing", change: func(f *Facts) {
			f.SubnetEnv.Env, f.SubnetEnv.Err = nil, fmt.Errorf("read /run/flannel/subnet.env: %w", subnetenv.ErrNotExist)
		}, want: Fail, in: "does not exist", fix: "start the agent"},
		{name: "garbled", change: func(f *Facts) {
			f.SubnetEnv.Env, f.SubnetEnv.Err = nil, errors.New("FLANNEL_MTU is not set")
		}, want: Fail, in: "FLANNEL_MTU is not set", fix: "restart the agent"},
		{name: "disagrees with the lease", change: func(f *Facts) { f.SubnetEnv.Env.Subnet = pfx("10.244.250.1/24") },
			want: Fail, in: "subnet.env says 10.244.250.1/24, the node's lease is 10.244.1.0/24", fix: "restart the agent"},
		{name: "ipmasq disagrees with the flag", change: func(f *Facts) { f.SubnetEnv.Env.IPMasq = false },
			want: Fail, in: "FLANNEL_IPMASQ=false"},
		{name: "no lease for this node", change: func(f *Facts) { f.Store.Leases = f.Store.Leases[1:] },
			want: Warn, in: "holds no lease", fix: "re-claims 10.244.1.0/24"},
		{name: "flanneld lease matched by public IP", change: func(f *Facts) {
			f.Store.Leases[0].Attrs.NodeName = ""
		}, want: OK},
		{name: "store unreachable", change: func(f *Facts) { f.Store.Err = errors.New("down") }, want: OK, in: "not compared"},
		{name: "registry empty", change: func(f *Facts) { f.Store.Leases = []lease.Lease{} }, want: OK, in: "registry empty"},
	})
}
