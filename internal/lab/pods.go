package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/loomnet/loom/internal/netns"
)

// cniNetwork is the network name in the conflist; the IPAM store of a node
// lives under <node dir>/ipam/<cniNetwork>/.
const cniNetwork = "loom"

// conflist is what a runtime would find in /etc/cni/net.d for this node.
func (l *Lab) conflist(node string) ([]byte, error) {
	dir := l.nodeDir(node)
	return json.MarshalIndent(map[string]any{
		"cniVersion": "1.1.0",
		"name":       cniNetwork,
		"plugins": []map[string]any{{
			"type":       "loom-cni",
			"subnetFile": l.SubnetFile(node),
			"dataDir":    filepath.Join(dir, "ipam"),
		}},
	}, "", "  ")
}

func (l *Lab) cniConfig(node string) (*libcni.NetworkConfigList, *libcni.CNIConfig, error) {
	data, err := l.conflist(node)
	if err != nil {
		return nil, nil, err
	}
	confDir := filepath.Join(l.nodeDir(node), "net.d")
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		return nil, nil, err
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-loom.conflist"), data, 0o644); err != nil {
		return nil, nil, err
	}
	list, err := libcni.ConfListFromBytes(data)
	if err != nil {
		return nil, nil, fmt.Errorf("parse conflist of %s: %w", node, err)
	}
	cninet := libcni.NewCNIConfigWithCacheDir([]string{l.Opts.BinDir}, filepath.Join(l.nodeDir(node), "cni-cache"), nil)
	return list, cninet, nil
}

func (l *Lab) runtimeConf(p Pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: p.NS, NetNS: netns.Path(p.NS), IfName: podIfName}
}

// AddPod creates a pod namespace on node and networks it by calling
// loom-cni exactly as a container runtime does (libcni, from inside the
// node's namespace). In Kubernetes mode it then creates the Pod object,
// running and ready with the address CNI gave, as the kubelet reports it.
func (l *Lab) AddPod(ctx context.Context, node, pod string) (Pod, error) {
	p, err := l.addPodNet(ctx, node, pod)
	if err != nil || !l.isKube() {
		return p, err
	}
	n, err := l.Node(node)
	if err != nil {
		return p, err
	}
	return p, l.createPodObject(ctx, n, p)
}

// addPodNet is AddPod without the Pod object: what the container runtime
// does.
func (l *Lab) addPodNet(ctx context.Context, node, pod string) (Pod, error) {
	n, err := l.Node(node)
	if err != nil {
		return Pod{}, err
	}
	p := Pod{Name: pod, NS: l.ns(pod)}
	if err := netns.Create(p.NS); err != nil {
		return Pod{}, err
	}
	list, cninet, err := l.cniConfig(node)
	if err != nil {
		return Pod{}, err
	}
	var res *types100.Result
	err = netns.Do(n.NS, func() error {
		r, err := cninet.AddNetworkList(ctx, list, l.runtimeConf(p))
		if err != nil {
			return err
		}
		res, err = types100.NewResultFromResult(r)
		return err
	})
	if err != nil {
		_ = netns.Delete(p.NS)
		return Pod{}, fmt.Errorf("CNI ADD for %s on %s: %w", pod, node, err)
	}
	for _, ipc := range res.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
			p.IP = a.Unmap()
		}
	}
	if !p.IP.IsValid() {
		return Pod{}, fmt.Errorf("CNI ADD for %s on %s returned no IPv4 address: %v", pod, node, res)
	}
	n.Pods = append(n.Pods, p)
	return p, l.save()
}

// DelPod calls CNI DEL for the pod and removes its namespace, and in
// Kubernetes mode its Pod object.
func (l *Lab) DelPod(ctx context.Context, pod string) error {
	if l.isKube() {
		if err := l.deletePodObject(ctx, pod); err != nil {
			return err
		}
	}
	for i := range l.Nodes {
		n := &l.Nodes[i]
		for j, p := range n.Pods {
			if p.Name != pod {
				continue
			}
			list, cninet, err := l.cniConfig(n.Name)
			if err != nil {
				return err
			}
			err = netns.Do(n.NS, func() error { return cninet.DelNetworkList(ctx, list, l.runtimeConf(p)) })
			if err != nil {
				return fmt.Errorf("CNI DEL for %s: %w", pod, err)
			}
			if err := netns.Delete(p.NS); err != nil {
				return err
			}
			n.Pods = append(n.Pods[:j], n.Pods[j+1:]...)
			return l.save()
		}
	}
	return fmt.Errorf("lab %s has no pod %q", l.Opts.Name, pod)
}
