package lab

// The scenarios of Break for Kubernetes labs (--datastore kube): faults of
// the API objects the agent lives by, made the way they happen in real
// clusters, through the admin client. See the table in break.go.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"

	"github.com/loomnet/loom/internal/netconf"
)

// kubeMismatchNetwork is the Network of the net-conf.json kube-cidr-mismatch
// gives n1's agent: next to the cluster's 10.244.0.0/16, as a typo would be.
var kubeMismatchNetwork = netip.MustParsePrefix("10.245.0.0/16")

// agentExitTimeout bounds the wait for an agent that must refuse to run.
const agentExitTimeout = 30 * time.Second

func breakKubeCIDR(ctx context.Context, b *breaker) error {
	l := b.l
	data, err := os.ReadFile(l.netConfPath())
	if err != nil {
		return err
	}
	cfg, err := netconf.Parse(data)
	if err != nil {
		return fmt.Errorf("parse %s: %w", l.netConfPath(), err)
	}
	cfg.Network = kubeMismatchNetwork
	cfg.SubnetMin, cfg.SubnetMax = netip.Addr{}, netip.Addr{}
	out, err := cfg.Marshal()
	if err != nil {
		return err
	}
	path := filepath.Join(l.nodeDir("n1"), "net-conf-mismatch.json")
	if err := b.writeFile(path, out); err != nil {
		return err
	}
	if err := b.restartAgentWith("n1", "--net-config-path", path); err != nil {
		return err
	}
	return b.waitAgentExit(ctx, "n1", "with a podCIDR outside Network "+kubeMismatchNetwork.String())
}

// waitAgentExit waits until node's agent has refused to run.
func (b *breaker) waitAgentExit(ctx context.Context, node, why string) error {
	ctx, cancel := context.WithTimeout(ctx, agentExitTimeout)
	defer cancel()
	for b.l.recordedAlive("agent-" + node) {
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("%s's agent still runs %s %v after its start; it must exit (see %s)",
				node, why, agentExitTimeout, filepath.Join(b.l.nodeDir(node), "agent.log"))
		}
	}
	return nil
}

func breakKubeNoPodCIDR(ctx context.Context, b *breaker) error {
	l := b.l
	if err := b.record(undoStep{Op: opStartControlPlane}); err != nil {
		return err
	}
	if err := l.StopControllerManager(); err != nil {
		return err
	}
	if err := b.stopAgent("n1", syscall.SIGTERM); err != nil {
		return err
	}
	// Heal: n1 may get another podCIDR, and its pods must move with it.
	if err := b.record(undoStep{Op: opRecreatePods, Key: "n1"}); err != nil {
		return err
	}
	if err := l.DeleteNode(ctx, "n1"); err != nil {
		return err
	}
	if err := l.waitNodeGone(ctx, "n1"); err != nil {
		return err
	}
	if err := l.RegisterNode(ctx, "n1"); err != nil {
		return err
	}
	return l.StartAgent("n1")
}

// waitNodeGone waits until node's Node object is deleted, so registering
// it again makes a new one.
func (l *Lab) waitNodeGone(ctx context.Context, node string) error {
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		_, err := cs.Nodes().Get(ctx, node)
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("Node %s still exists after its deletion: %w", node, err)
		}
	}
}

func breakKubeAnnotations(ctx context.Context, b *breaker) error {
	l := b.l
	if err := b.stopAgent("n2", syscall.SIGTERM); err != nil {
		return err
	}
	if err := l.removeFlannelAnnotations(ctx, "n2"); err != nil {
		return err
	}
	// The peers must drop n2: wait for it, so what doctor sees next is
	// settled.
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, n := range l.Nodes {
		if n.Name == "n2" {
			continue
		}
		for {
			known, err := l.peersKnown(n)
			if err == nil && known == len(l.Nodes)-2 {
				break
			}
			if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
				return fmt.Errorf("%s still knows %d peers after n2's annotations were removed, want %d: %w", n.Name, known, len(l.Nodes)-2, err)
			}
		}
	}
	return nil
}

// removeFlannelAnnotations deletes every annotation under flannel's prefix
// from node's Node, as `kubectl annotate node NODE KEY-` does.
func (l *Lab) removeFlannelAnnotations(ctx context.Context, node string) error {
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	ann, err := l.NodeAnnotations(ctx, node)
	if err != nil {
		return err
	}
	remove := map[string]any{}
	for k := range ann {
		if strings.HasPrefix(k, flannelPrefix) {
			remove[k] = nil // a JSON merge patch deletes keys set to null
		}
	}
	if len(remove) == 0 {
		return fmt.Errorf("Node %s has no %s annotations to remove (has its agent ever run?)", node, flannelPrefix)
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": remove}})
	if err != nil {
		return err
	}
	if _, err := cs.Nodes().Patch(ctx, node, types.MergePatchType, patch); err != nil {
		return fmt.Errorf("remove the annotations of Node %s: %w", node, err)
	}
	return nil
}

func breakKubeNetworkUnavailable(ctx context.Context, b *breaker) error {
	if err := b.stopAgent("n1", syscall.SIGTERM); err != nil {
		return err
	}
	return b.l.SetNetworkUnavailable(ctx, "n1", true)
}
