package lab

// The scenarios of Break, one function each (see the table in break.go).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/subnetenv"
)

func breakCIDR(ctx context.Context, b *breaker) error {
	cli, err := b.l.etcd()
	if err != nil {
		return err
	}
	defer cli.Close()
	key := registryPrefix + "/config"
	resp, err := cli.Get(ctx, key)
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 0 {
		return fmt.Errorf("%s is not in the store", key)
	}
	old := resp.Kvs[0].Value
	cfg, err := netconf.Parse(old)
	if err != nil {
		return err
	}
	cfg.Network = netip.MustParsePrefix("10.224.0.0/16")
	cfg.SubnetMin, cfg.SubnetMax = netip.Addr{}, netip.Addr{}
	data, err := cfg.Marshal()
	if err != nil {
		return err
	}
	if err := b.record(undoStep{Op: opEtcdPut, Key: key, Data: old}); err != nil {
		return err
	}
	_, err = cli.Put(ctx, key, string(data))
	return err
}

// withSubnet renders env with its subnet moved to p.
func withSubnet(env subnetenv.Env, p netip.Prefix) []byte {
	env.Subnet = netip.PrefixFrom(p.Addr().Next(), p.Bits())
	return env.Marshal()
}

func breakCNI0(ctx context.Context, b *breaker) error {
	l := b.l
	cli, err := l.etcd()
	if err != nil {
		return err
	}
	defer cli.Close()
	env, err := l.nodeSubnet("n1")
	if err != nil {
		return err
	}
	if err := b.stopAgent("n1", syscall.SIGTERM); err != nil {
		return err
	}
	// The lease is gone (it expired while the node was away)...
	key, err := leaseKeyOf(ctx, cli, "n1")
	if err != nil {
		return err
	}
	if _, err := cli.Delete(ctx, key); err != nil {
		return err
	}
	// ...and the node comes back on another subnet. The agent re-claims
	// the subnet its subnet.env names, so that is how it is steered.
	moved, err := l.freeSubnet(ctx, cli)
	if err != nil {
		return err
	}
	if err := b.writeFile(l.SubnetFile("n1"), withSubnet(env, moved)); err != nil {
		return err
	}
	if err := b.record(undoStep{Op: opEtcdDel, Key: registryPrefix + "/subnets/" + strings.Replace(moved.String(), "/", "-", 1)}); err != nil {
		return err
	}
	if err := b.record(undoStep{Op: opStopAgent, Key: "n1"}); err != nil {
		return err
	}
	if err := l.StartAgent("n1"); err != nil {
		return err
	}
	if err := l.WaitReady(ctx, "n1"); err != nil {
		return err
	}
	return l.WaitConverged(ctx)
}

func breakBridgeNF(_ context.Context, b *breaker) error {
	ns, err := b.l.NSOf("n1")
	if err != nil {
		return err
	}
	if _, err := readSysctl(ns, "net/bridge/bridge-nf-call-iptables"); err != nil {
		return fmt.Errorf("br_netfilter is not loaded on this machine: %w", err)
	}
	return b.sysctl("n1", "net/bridge/bridge-nf-call-iptables", "0")
}

func breakVagrant(ctx context.Context, b *breaker) error {
	l := b.l
	for _, n := range l.Nodes {
		if err := b.addStub(n.Name, "nat0", vagrantNAT); err != nil {
			return err
		}
	}
	cli, err := l.etcd()
	if err != nil {
		return err
	}
	defer cli.Close()
	if err := b.restartAgentWith("n1", "--iface", "nat0"); err != nil {
		return err
	}
	// n1 re-takes its lease advertising the NAT address.
	for {
		key, err := leaseKeyOf(ctx, cli, "n1")
		if err == nil {
			resp, err := cli.Get(ctx, key)
			if err == nil && len(resp.Kvs) == 1 && strings.Contains(string(resp.Kvs[0].Value), `"`+vagrantNAT.Addr().String()+`"`) {
				break
			}
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("n1's lease never advertised %s: %w", vagrantNAT.Addr(), err)
		}
	}
	if err := b.restartAgentWith("n2", "--iface", "nat0"); err != nil {
		return err
	}
	// n2 must be refused: its agent exits.
	for l.recordedAlive("agent-n2") {
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("n2's agent was not refused with n1's public IP: %w", err)
		}
	}
	return nil
}

func (b *breaker) addStub(node, name string, addr netip.Prefix) error {
	ns, err := b.l.NSOf(node)
	if err != nil {
		return err
	}
	if err := b.record(undoStep{Op: opDelLink, NS: ns, Key: name}); err != nil {
		return err
	}
	return addStubLink(ns, name, addr)
}

func breakRegistry(ctx context.Context, b *breaker) error {
	for _, n := range b.l.Nodes {
		if err := b.stopAgent(n.Name, syscall.SIGTERM); err != nil {
			return err
		}
	}
	cli, err := b.l.etcd()
	if err != nil {
		return err
	}
	defer cli.Close()
	_, err = cli.Delete(ctx, registryPrefix+"/subnets/", clientv3.WithPrefix())
	return err
}

func breakPeer(_ context.Context, b *breaker) error {
	if err := b.stopAgent("n2", syscall.SIGKILL); err != nil {
		return err
	}
	// Its cable is pulled: the router's bridge port to n2 goes down, and
	// n2 keeps its own addresses and routes for when it comes back.
	rt := b.l.RouterNS()
	if err := b.record(undoStep{Op: opLinkUp, NS: rt, Key: "n2"}); err != nil {
		return err
	}
	return setLinkDown(rt, "n2")
}

func breakSubnetEnv(ctx context.Context, b *breaker) error {
	cli, err := b.l.etcd()
	if err != nil {
		return err
	}
	defer cli.Close()
	env, err := b.l.nodeSubnet("n1")
	if err != nil {
		return err
	}
	other, err := b.l.freeSubnet(ctx, cli)
	if err != nil {
		return err
	}
	return b.writeFile(b.l.SubnetFile("n1"), withSubnet(env, other))
}

// leakPod is the pod whose netns breakLeak deletes behind CNI's back.
const leakPod = "n1-leak"

func breakLeak(ctx context.Context, b *breaker) error {
	l := b.l
	// The runtime crashed before it told the API: no Pod object either.
	p, err := l.addPodNet(ctx, "n1", leakPod)
	if err != nil {
		return err
	}
	if err := b.record(undoStep{Op: opCNIDel, Key: "n1", Value: p.NS}); err != nil {
		return err
	}
	if err := netns.Delete(p.NS); err != nil {
		return err
	}
	n, err := l.Node("n1")
	if err != nil {
		return err
	}
	n.Pods = slices.DeleteFunc(n.Pods, func(q Pod) bool { return q.Name == leakPod })
	return l.save()
}

func (l *Lab) ipamStore(node string) (*ipam.Store, error) {
	return ipam.New(ipam.Config{DataDir: filepath.Join(l.nodeDir(node), "ipam"), Network: cniNetwork})
}

func breakExhausted(_ context.Context, b *breaker) error {
	env, err := b.l.nodeSubnet("n1")
	if err != nil {
		return err
	}
	st, err := b.l.ipamStore("n1")
	if err != nil {
		return err
	}
	r := []ipam.Range{{Subnet: env.Subnet.Masked(), Gateway: env.Subnet.Addr()}}
	var ids []string
	defer func() {
		data, _ := json.Marshal(ids)
		_ = b.record(undoStep{Op: opIPAMRelease, Key: "n1", Data: data})
	}()
	for i := 0; ; i++ {
		id := fmt.Sprintf("leaked-%03d", i)
		_, err := st.Allocate(ipam.Attachment{ContainerID: id, IfName: podIfName}, r)
		if errors.Is(err, ipam.ErrExhausted) {
			return nil
		}
		if err != nil {
			return err
		}
		ids = append(ids, id)
	}
}

func breakRoute(_ context.Context, b *breaker) error {
	env, err := b.l.nodeSubnet("n2")
	if err != nil {
		return err
	}
	n1, err := b.l.Node("n1")
	if err != nil {
		return err
	}
	half := netip.PrefixFrom(env.Subnet.Masked().Addr(), env.Subnet.Bits()+1)
	if err := b.record(undoStep{Op: opDelRoute, NS: n1.NS, Key: half.String(), Value: n1.Gateway.String()}); err != nil {
		return err
	}
	return addStaticRoute(n1.NS, half, n1.Gateway)
}

func breakMasquerade(ctx context.Context, b *breaker) error {
	if err := b.restartAgentWith("n1", "--iptables-resync", "86400"); err != nil {
		return err
	}
	if err := b.l.WaitReady(ctx, "n1"); err != nil {
		return err
	}
	n1, _ := b.l.Node("n1")
	deleted, err := deleteMasqueradeRules(ctx, n1.NS)
	if err != nil {
		return err
	}
	if deleted == 0 {
		return errors.New("n1 has no masquerade rule to delete (is the agent's firewall in place?)")
	}
	return nil
}

func breakForward(ctx context.Context, b *breaker) error {
	if err := b.restartAgentExtra("n1", "--iptables-forward-rules=false"); err != nil {
		return err
	}
	if err := b.l.WaitReady(ctx, "n1"); err != nil {
		return err
	}
	n1, _ := b.l.Node("n1")
	policy, err := iptablesPolicy(ctx, n1.NS, "filter", "FORWARD")
	if err != nil {
		return err
	}
	if err := b.record(undoStep{Op: opIPTPolicy, NS: n1.NS, Key: "FORWARD", Value: policy}); err != nil {
		return err
	}
	return runIn(ctx, n1.NS, "iptables", "-t", "filter", "-P", "FORWARD", "DROP")
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
