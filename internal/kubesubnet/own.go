package kubesubnet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/registry"
)

// The NetworkUnavailable condition loom sets once the node's network is up.
// Cloud route controllers (and kubeadm on some clouds) start Nodes with it
// True, and the scheduler keeps pods off such a Node until a network
// plugin turns it False. flannel's reason is "FlannelIsUp"; loom has its
// own, so `kubectl describe node` says which agent runs there.
const (
	conditionReason  = "LoomIsUp"
	conditionMessage = "loom is running on this node"
)

// Keep holds this node's subnet until ctx ends, and calls onLease with the
// lease: once the Node has a podCIDR and carries this node's annotations,
// and again whenever the podCIDR changes (the Node was deleted and
// registered again; logged as SUBNET CHANGED). req.Attrs are the
// annotations' content, req.Config the network the podCIDR must lie in,
// req.Previous the subnet of the old subnet.env.
//
// While the Node does not exist, or has no podCIDR, Keep waits and says
// every WaitLogEvery why. It writes the annotations and the
// NetworkUnavailable=False condition when they differ from the Node's
// (also when someone removed them later), retrying API errors with
// backoff. It returns an error only for what waiting cannot fix: a podCIDR
// outside Network, podCIDRs that do not match the enabled families, a
// write the agent's user is forbidden to make. When ctx ends it returns
// ctx.Err(), leaving the Node as it is. onLease runs on Keep's goroutine.
func (m *Manager) Keep(ctx context.Context, req registry.Request, onLease func(lease.Lease)) error {
	if err := m.sync(ctx); err != nil {
		return fmt.Errorf("hold subnet of node %s: %w", m.cfg.NodeName, err)
	}
	k := &keeper{m: m, req: req, onLease: onLease, retry: time.Second}
	for {
		wait, err := k.step(ctx)
		if err != nil {
			return err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-m.ownWake:
		case <-t.C:
		}
		t.Stop()
	}
}

// keeper is Keep's state between two looks at the Node.
type keeper struct {
	m       *Manager
	req     registry.Request
	onLease func(lease.Lease)

	held    lease.Lease // reported last
	holding bool

	// patchedFrom is the UID and resourceVersion of the cached Node the
	// last write was computed from (patched says there was one). Until
	// the cache shows a newer Node, it cannot show the write, and
	// comparing would only write again.
	patchedFrom string
	patched     bool
	retry       time.Duration // next wait after a failed write

	lastWaitLog time.Time
	lastWhy     string // what was last logged as the reason of a wait
	badOverride string // the unusable override last logged
}

// Keep's pace: how often it looks at the Node without an event (a safety
// net; the informer's resync re-delivers it every 5 min too), and its
// backoff after failed writes.
const (
	keepEvery       = 10 * time.Second
	keepRetryMax    = 15 * time.Second
	keepRetryFirst  = time.Second
	keepRetryFactor = 2
)

// step looks at the Node once and does what it needs. It returns when to
// look again (earlier if the Node changes), or an error Keep must return.
func (k *keeper) step(ctx context.Context) (time.Duration, error) {
	m := k.m
	name := m.cfg.NodeName
	n, err := m.lister.Get(name)
	if apierrors.IsNotFound(err) {
		if k.holding {
			k.waiting(errors.New("this node's Node was deleted: keeping its subnet and the data path until the Node is registered again"), "subnet", k.held.Key())
		} else {
			k.waiting(fmt.Errorf("waiting for Node %s: its kubelet registers it (kubectl get node %s)", name, name))
		}
		return k.waitEvery(), nil
	}
	if err != nil {
		return 0, fmt.Errorf("read Node %s from the cache: %w", name, err)
	}
	l, err := k.lease(n)
	if errors.Is(err, ErrNoPodCIDR) {
		k.waiting(err)
		return k.waitEvery(), nil
	}
	if err != nil {
		return 0, err
	}
	k.lastWhy = ""

	if !k.patched || nodeVersion(n) != k.patchedFrom {
		done, err := k.write(ctx, n)
		if err != nil {
			return 0, err
		}
		if !done {
			wait := k.retry
			k.retry = min(k.retry*keepRetryFactor, keepRetryMax)
			return wait, nil
		}
		k.retry = keepRetryFirst
	}

	if !k.holding || l.Key() != k.held.Key() {
		k.report(l)
	}
	return keepEvery, nil
}

// waitEvery is when to look again while waiting: soon enough to repeat
// the log on time.
func (k *keeper) waitEvery() time.Duration { return min(keepEvery, k.m.cfg.WaitLogEvery) }

// waiting logs why Keep waits, at error level (the node has no network
// until it ends), at once when the reason changes, then every WaitLogEvery.
// Before the first lease it is also what Waiting reports.
func (k *keeper) waiting(why error, args ...any) {
	if !k.holding {
		k.m.setWaiting(why)
	}
	if why.Error() == k.lastWhy && time.Since(k.lastWaitLog) < k.m.cfg.WaitLogEvery {
		return
	}
	k.lastWhy, k.lastWaitLog = why.Error(), time.Now()
	k.m.log.Error(why.Error(), append([]any{"node", k.m.cfg.NodeName}, args...)...)
}

// lease is the node's lease from its podCIDRs, checked against the network
// config: only a missing podCIDR is worth waiting for (ErrNoPodCIDR); a
// podCIDR outside Network can only be fixed by the operator.
func (k *keeper) lease(n *v1.Node) (lease.Lease, error) {
	v4, v6, err := NodeSubnets(n, k.req.Config, k.m.cfg.NetConfigPath)
	if err != nil {
		return lease.Lease{}, err
	}
	l := lease.Lease{Subnet: v4, IPv6Subnet: v6, Attrs: k.req.Attrs, Expiration: notReserved()}
	l.Attrs.NodeName = n.Name
	return l, nil
}

// write brings the Node's annotations and NetworkUnavailable condition to
// what they must be, in one patch of nodes/status, when they differ. It
// returns false (and logs) when the write failed and should be retried,
// and an error when retrying cannot help.
func (k *keeper) write(ctx context.Context, n *v1.Node) (bool, error) {
	m := k.m
	want, bad := m.ann.desired(k.req.Attrs, n.Annotations)
	if s := strings.Join(bad, ", "); s != k.badOverride {
		k.badOverride = s
		if s != "" {
			m.log.Error("ignoring the operator's public address override: not an address of its family; peers get the node's own address", "node", n.Name,
				"annotation", s, "fix", fmt.Sprintf("kubectl annotate node %s %s=ADDRESS --overwrite, or remove it with %s-", n.Name, m.ann.Key(AnnPublicIPOverwrite), m.ann.Key(AnnPublicIPOverwrite)))
		}
	}
	changed := map[string]string{}
	for key, v := range want {
		if cur, ok := n.Annotations[key]; !ok || cur != v {
			changed[key] = v
		}
	}
	// With -set-node-network-unavailable=false (flanneld's flag) the
	// condition is someone else's: it is neither read nor written.
	needCondition := !m.cfg.LeaveNetworkUnavailable && !networkAvailable(n)
	if len(changed) == 0 && !needCondition {
		return true, nil
	}
	patch := map[string]any{}
	if len(changed) > 0 {
		patch["metadata"] = map[string]any{"annotations": changed}
	}
	if needCondition {
		now := metav1.Now()
		patch["status"] = map[string]any{"conditions": []v1.NodeCondition{{
			Type:               v1.NodeNetworkUnavailable,
			Status:             v1.ConditionFalse,
			Reason:             conditionReason,
			Message:            conditionMessage,
			LastTransitionTime: now,
			LastHeartbeatTime:  now,
		}}}
	}
	body, err := json.Marshal(patch)
	if err != nil {
		return false, fmt.Errorf("encode the patch of Node %s: %w", n.Name, err)
	}
	// Annotations go through nodes/status, as flanneld writes them:
	// kube-flannel.yml's RBAC allows patching nodes/status only, and the
	// status subresource keeps metadata changes.
	got, err := m.api.Patch(ctx, n.Name, types.StrategicMergePatchType, body, "status")
	switch {
	case apierrors.IsForbidden(err):
		return false, fmt.Errorf("write annotations and condition of Node %s: %w: the agent's user needs patch on nodes/status (and get, list, watch on nodes): bind it to a ClusterRole like deploy/kubernetes/loom.yaml's", n.Name, err)
	case apierrors.IsNotFound(err):
		return false, nil // deleted meanwhile: the informer will say so
	case err != nil:
		if ctx.Err() != nil {
			return false, nil
		}
		if !k.holding {
			m.setWaiting(fmt.Errorf("write the annotations and the NetworkUnavailable condition of Node %s (retrying in %v): %w", n.Name, k.retry, err))
		}
		m.log.Warn("write annotations and condition of this node's Node; retrying", "node", n.Name, "in", k.retry, "err", err)
		return false, nil
	}
	for key, v := range changed {
		if got.Annotations[key] != v {
			return false, fmt.Errorf("the API server did not store annotation %s=%q written through nodes/%s/status: an admission webhook or policy drops it", key, v, n.Name)
		}
	}
	k.patchedFrom, k.patched = nodeVersion(n), true
	m.log.Info("wrote this node's annotations and condition", "node", n.Name, "annotations", slices.Sorted(maps.Keys(changed)), "network-unavailable-false", needCondition)
	return true, nil
}

// nodeVersion names one version of one Node object: a Node deleted and
// registered again is another object.
func nodeVersion(n *v1.Node) string { return string(n.UID) + "/" + n.ResourceVersion }

// networkAvailable reports whether the Node's NetworkUnavailable condition
// is False already (whoever set it: flanneld's or loom's).
func networkAvailable(n *v1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == v1.NodeNetworkUnavailable {
			return c.Status == v1.ConditionFalse
		}
	}
	return false
}

// report hands a new lease to the agent, loudly when it is not the subnet
// the node had: pods made with the old subnet's addresses are cut off.
func (k *keeper) report(l lease.Lease) {
	prev, prevV6 := k.req.Previous, k.req.PreviousV6
	if k.holding {
		prev, prevV6 = k.held.Subnet, k.held.IPv6Subnet
	}
	if (prev.IsValid() || prevV6.IsValid()) && (prev != l.Subnet || prevV6 != l.IPv6Subnet) {
		k.m.log.Error("SUBNET CHANGED: this node's podCIDR is not the subnet it had (its Node was deleted and registered again, and kube-controller-manager assigned a new podCIDR), so it takes the new one (subnet.env is rewritten with it). "+
			"Pods created with addresses of the old subnet have no connectivity: delete and recreate them, and the cni0 bridge, which keeps the old gateway",
			"node", k.m.cfg.NodeName, "old", lease.MakeKey(prev, prevV6), "new", l.Key())
	}
	k.held, k.holding = l, true
	k.m.mu.Lock()
	k.m.own, k.m.why = l, nil
	k.m.dirty[k.m.cfg.NodeName] = struct{}{}
	k.m.mu.Unlock()
	poke(k.m.peerWake)
	if k.onLease != nil {
		k.onLease(l)
	}
}
