// Package kubesubnet is the agent's Kubernetes subnet manager (flanneld's
// -kube-subnet-mgr): the node's subnet is its Node's spec.podCIDR(s), which
// kube-controller-manager assigns (--allocate-node-cidrs --cluster-cidr;
// kubeadm's --pod-network-cidr), and what peers need to reach the node
// travels in flannel's Node annotations:
//
//	flannel.alpha.coreos.com/kube-subnet-manager  "true"
//	flannel.alpha.coreos.com/backend-type         "vxlan"
//	flannel.alpha.coreos.com/backend-data         {"VNI":1,"VtepMAC":"5e:..."}   ("null" for host-gw, udp)
//	flannel.alpha.coreos.com/public-ip            "198.18.0.11"
//	flannel.alpha.coreos.com/backend-v6-data, public-ipv6   the same for an IPv6 leg
//
// read and written byte for byte as flanneld does (the prefix is
// -kube-annotation-prefix), so loom and flanneld nodes in one cluster route
// to each other. The operator's public-ip-overwrite replaces the address
// written, and node-public-ip the agent's -public-ip, as in flannel.
//
// What it does differently from flannel's, and why:
//
//   - A node without a podCIDR waits for one, saying every 10 s which
//     kube-controller-manager flags assign it, instead of exiting; a
//     podCIDR outside the network config's Network is an error naming both
//     CIDRs and the fix, never a half-working node.
//   - Annotations and the NetworkUnavailable condition are written only
//     when they differ, in one request, through nodes/status (the only
//     write kube-flannel.yml's RBAC allows); a restart that changes
//     nothing writes nothing. Annotations someone removes are written back.
//     With flanneld's -set-node-network-unavailable=false the condition is
//     left alone (Config.LeaveNetworkUnavailable).
//   - Why the node has no subnet yet (Waiting) is what the agent's /readyz
//     says while it waits, in the words of the log.
//   - Peers are reconciled, not reacted to: every informer event marks a
//     Node dirty, and the Node's current lease is compared with what the
//     agent was told. A deleted Node is removed at once (deleting a Node is
//     deliberate), a changed podCIDR is a removal and an addition, a
//     missed event is caught at the next resync.
//   - Peer Nodes pass the same Guard as etcd leases (any subnet length:
//     kube-controller-manager decides it), so a hand-made Node with a
//     loopback public-ip, an overlapping podCIDR or backend-data that is
//     not JSON is skipped and counted, never routed to, never a crash.
//
// The Client (kubeclient: the connection and its shared informers) is
// separate from the Manager so the Service proxy and DNS can share it
// later.
package kubesubnet

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/loomnet/loom/internal/kubeclient"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/registry"
)

// DefaultNetConfigPath is flannel's -net-config-path default.
const DefaultNetConfigPath = "/etc/kube-flannel/net-conf.json"

// DefaultWaitLogEvery is how often a node that waits (for its Node object,
// its podCIDR, the first list of Nodes) says so.
const DefaultWaitLogEvery = 10 * time.Second

// Config says which node this is and what network it is in.
type Config struct {
	Client *Client // required: the connection and its shared informers
	// Nodes, when set, answers the manager's requests instead of
	// Client.Nodes(): unit tests pass a fake here. The Node informer comes
	// from Client either way, listing and watching through Nodes.
	Nodes    NodeAPI
	NodeName string // required: the Node's name
	// Network is the network config (net-conf.json); podCIDRs must lie
	// inside its Network (and IPv6Network).
	Network netconf.Config
	// NetConfigPath is where Network was read from, for messages; default
	// DefaultNetConfigPath.
	NetConfigPath string
	// AnnotationPrefix is -kube-annotation-prefix in the normalised form
	// options gives ("flannel.alpha.coreos.com/"); "" is that default.
	AnnotationPrefix string
	Logger           *slog.Logger // default slog.Default()
	// Metrics, when set, receives loom_leases_skipped_total.
	Metrics prometheus.Registerer
	// WaitLogEvery is how often waiting is logged; default 10 s.
	WaitLogEvery time.Duration
	// LeaveNetworkUnavailable is flanneld's -set-node-network-unavailable
	// =false: the Node's NetworkUnavailable condition is left to someone
	// else (a cloud route controller, another network plugin) and never
	// written.
	LeaveNetworkUnavailable bool
}

// Manager holds this node's subnet and reports its peers' from the
// Kubernetes API. It implements the agent's subnet manager contract, as
// registry.Registry does for etcd: Keep, List, Watch, Guard, Close.
type Manager struct {
	c       *Client
	api     NodeAPI
	cfg     Config
	ann     Annotations
	log     *slog.Logger
	nodes   cache.SharedIndexInformer
	lister  corelisters.NodeLister
	handler cache.ResourceEventHandlerRegistration
	skipped *prometheus.CounterVec

	// ownWake and peerWake are poked (never blocking) by informer events:
	// ownWake for this node's Node, peerWake for any.
	ownWake, peerWake chan struct{}

	mu    sync.Mutex          // guards the fields below
	dirty map[string]struct{} // Nodes changed since Watch last looked, by name
	bad   map[string]string   // the last problem reported per Node, to report each once
	own   lease.Lease         // the lease Keep reported last; invalid before
	why   error               // why there is no own lease yet; nil once Keep reported one
}

// New sets the manager up on the client's shared Node informer. It sends
// nothing; Keep and List start the informers.
func New(cfg Config) (*Manager, error) {
	if cfg.Client == nil {
		return nil, errors.New("kubernetes subnet manager: no client")
	}
	if cfg.NodeName == "" {
		return nil, errors.New("kubernetes subnet manager: no node name: set -node-name or NODE_NAME")
	}
	if cfg.NetConfigPath == "" {
		cfg.NetConfigPath = DefaultNetConfigPath
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.WaitLogEvery <= 0 {
		cfg.WaitLogEvery = DefaultWaitLogEvery
	}
	ann, err := NewAnnotations(cfg.AnnotationPrefix)
	if err != nil {
		return nil, err
	}
	api := cfg.Nodes
	if api == nil {
		api = cfg.Client.Nodes()
	}
	nodes := cfg.Client.Informer(&v1.Node{}, kubeclient.ListWatch(api))
	m := &Manager{
		c:        cfg.Client,
		api:      api,
		cfg:      cfg,
		ann:      ann,
		log:      cfg.Logger,
		nodes:    nodes,
		lister:   corelisters.NewNodeLister(nodes.GetIndexer()),
		skipped:  skippedCounter(),
		ownWake:  make(chan struct{}, 1),
		peerWake: make(chan struct{}, 1),
		dirty:    map[string]struct{}{},
		bad:      map[string]string{},
		why:      errors.New("no subnet lease yet"),
	}
	if cfg.Metrics != nil {
		if err := cfg.Metrics.Register(m.skipped); err != nil {
			return nil, fmt.Errorf("register Kubernetes subnet manager metrics: %w", err)
		}
	}
	m.handler, err = m.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    m.changed,
		UpdateFunc: func(_, obj any) { m.changed(obj) },
		DeleteFunc: m.changed,
	})
	if err != nil {
		return nil, fmt.Errorf("watch Nodes: %w", err)
	}
	return m, nil
}

// changed is every informer event: it only marks the Node dirty and wakes
// whoever looks at it, so the informer never waits for the agent.
func (m *Manager) changed(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	n, ok := obj.(*v1.Node)
	if !ok {
		return
	}
	m.mu.Lock()
	m.dirty[n.Name] = struct{}{}
	m.mu.Unlock()
	poke(m.peerWake)
	if n.Name == m.cfg.NodeName {
		poke(m.ownWake)
	}
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// Close stops watching Nodes. The Client is closed by its owner: it may
// serve other informers.
func (m *Manager) Close() error {
	return m.nodes.RemoveEventHandler(m.handler)
}

// Waiting says why the node holds no subnet yet, in the words the agent
// logs (the Node not registered, "pod cidr not assigned to node ...", the
// API server not answering), for the agent's readiness; nil once Keep has
// reported a lease.
func (m *Manager) Waiting() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.why
}

// setWaiting records why there is no lease yet, unless Keep holds one.
func (m *Manager) setWaiting(why error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.own.Subnet.IsValid() && !m.own.IPv6Subnet.IsValid() {
		m.why = why
	}
}

// sync starts the informers and waits until the Node cache holds the
// apiserver's list, saying every WaitLogEvery that it waits.
func (m *Manager) sync(ctx context.Context) error {
	m.c.Start()
	if m.nodes.HasSynced() {
		return nil
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	start := time.Now()
	lastLog := start
	m.setWaiting(fmt.Errorf("waiting for the list of Nodes from the Kubernetes API server at %s", m.c.Server()))
	for !m.nodes.HasSynced() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		if time.Since(lastLog) >= m.cfg.WaitLogEvery {
			lastLog = time.Now()
			waited := time.Since(start).Round(time.Second)
			m.setWaiting(fmt.Errorf("waiting %v for the list of Nodes from the Kubernetes API server at %s (the agent's user needs get, list and watch on nodes)", waited, m.c.Server()))
			m.log.Warn("waiting for the list of Nodes from the Kubernetes API server (the agent's user needs get, list and watch on nodes)",
				"server", m.c.Server(), "waited", waited)
		}
	}
	return nil
}

// NodePublicIPs returns the node's node-public-ip and node-public-ipv6
// annotations: addresses an operator chose for the node, which take the
// place of -public-ip and -public-ipv6 as in flanneld. A Node that does not
// exist yet has none. API errors are retried until ctx ends.
func (m *Manager) NodePublicIPs(ctx context.Context) (v4, v6 netip.Addr, err error) {
	delay := time.Second
	for {
		n, err := m.api.Get(ctx, m.cfg.NodeName)
		switch {
		case err == nil:
			return m.ann.NodePublicIPs(n.Annotations)
		case apierrors.IsNotFound(err):
			return netip.Addr{}, netip.Addr{}, nil
		case apierrors.IsForbidden(err):
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("read Node %s: %w: the agent's user needs get, list and watch on nodes and patch on nodes/status (see deploy/kubernetes/loom.yaml)", m.cfg.NodeName, err)
		}
		m.setWaiting(fmt.Errorf("read Node %s from the Kubernetes API server at %s (retrying): %w", m.cfg.NodeName, m.c.Server(), err))
		m.log.Warn("read this node's Node object; retrying", "node", m.cfg.NodeName, "in", delay, "err", err)
		if sleep(ctx, delay) != nil {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("read Node %s: %w", m.cfg.NodeName, ctx.Err())
		}
		delay = min(2*delay, 15*time.Second)
	}
}

// Guard returns the screen for peer leases: any subnet length inside
// Network (kube-controller-manager's --node-cidr-mask-size decides it),
// counting skips into loom_leases_skipped_total and logging the fix in
// kubectl terms.
func (m *Manager) Guard(cfg netconf.Config) *registry.Guard {
	return registry.NewGuard(registry.GuardConfig{Network: cfg, AnySubnet: true, OnSkip: func(l lease.Lease, reason, detail string) {
		m.skipped.WithLabelValues(reason).Inc()
		m.log.Warn("skipping peer Node: not programmed into the data path", "node", l.Attrs.NodeName, "lease", l.Key(),
			"reason", reason, "detail", detail, "fix", m.fix(l.Attrs.NodeName, reason))
	}})
}

// fix says what to do about a skipped Node.
func (m *Manager) fix(node, reason string) string {
	switch reason {
	case registry.SkipBadPublicIP:
		if n, err := m.lister.Get(node); err == nil {
			for _, name := range []string{AnnPublicIPOverwrite, AnnPublicIPv6Overwrite} {
				if n.Annotations[m.ann.Key(name)] != "" {
					return fmt.Sprintf("the operator's override is unusable: kubectl annotate node %s %s- (or set it to the node's reachable address)", node, m.ann.Key(name))
				}
			}
		}
		return fmt.Sprintf("start the agent on %s with -iface or -public-ip naming an address the other nodes reach, or kubectl annotate node %s %s=ADDRESS", node, node, m.ann.Key(AnnPublicIPOverwrite))
	case registry.SkipOverlap, registry.SkipOutsideNetwork:
		return fmt.Sprintf("the Node's podCIDR was not assigned by this cluster's kube-controller-manager: kubectl delete node %s and let its kubelet register it again, so it gets a podCIDR inside Network", node)
	case registry.SkipBadSubnet:
		return fmt.Sprintf("give Node %s a podCIDR of every family the network config enables (kube-controller-manager --cluster-cidr with one CIDR per family), or change EnableIPv4/EnableIPv6 in %s", node, m.cfg.NetConfigPath)
	}
	return fmt.Sprintf("restart the agent on %s (it rewrites its annotations), or remove the broken annotation: kubectl annotate node %s KEY-", node, node)
}

// List returns the lease of every peer Node (and this node's own lease,
// once Keep reported it, as the etcd registry lists it too), after the Node
// cache has synced. Nodes whose data does not decode are skipped, counted
// and logged. The revision is always 0: Watch continues from the cache.
func (m *Manager) List(ctx context.Context) ([]lease.Lease, int64, error) {
	if err := m.sync(ctx); err != nil {
		return nil, 0, fmt.Errorf("list Nodes: %w", err)
	}
	nodes, err := m.lister.List(labels.Everything())
	if err != nil {
		return nil, 0, fmt.Errorf("list Nodes from the cache: %w", err)
	}
	// The Guard lets the first of two overlapping leases through: this
	// node's own goes first, then the oldest Nodes, which were there
	// before any hand-made impostor.
	slices.SortFunc(nodes, func(a, b *v1.Node) int {
		return cmp.Or(a.CreationTimestamp.Compare(b.CreationTimestamp.Time), cmp.Compare(a.Name, b.Name))
	})
	var leases []lease.Lease
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.own.Subnet.IsValid() || m.own.IPv6Subnet.IsValid() {
		leases = append(leases, m.own)
	}
	for _, n := range nodes {
		if n.Name == m.cfg.NodeName {
			continue
		}
		if l, ok := m.peerLocked(n.Name, n); ok {
			leases = append(leases, l)
		}
	}
	return leases, 0, nil
}

// Watch reports changes after List: out receives, for each round of
// informer events, Added for a new peer Node or new data of a known one
// and Removed for a deleted one or one that stopped qualifying (a changed
// podCIDR is both), relative to known (List's result). It returns ctx's
// error when ctx ends. out is called from Watch's goroutine only.
func (m *Manager) Watch(ctx context.Context, _ int64, known []lease.Lease, out func([]lease.Event)) error {
	if err := m.sync(ctx); err != nil {
		return fmt.Errorf("watch Nodes: %w", err)
	}
	told := make(map[string]*lease.Lease, len(known))
	for i := range known {
		told[known[i].Attrs.NodeName] = &known[i]
	}
	// Whatever happened between List and now: compare every Node. The
	// marks are cleared first: a change after this is marked again.
	m.mu.Lock()
	clear(m.dirty)
	m.mu.Unlock()
	all := map[string]struct{}{m.cfg.NodeName: {}}
	for name := range told {
		all[name] = struct{}{}
	}
	nodes, err := m.lister.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list Nodes from the cache: %w", err)
	}
	for _, n := range nodes {
		all[n.Name] = struct{}{}
	}
	for {
		if ev := m.diff(all, told); len(ev) > 0 {
			out(ev)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.peerWake:
		}
		m.mu.Lock()
		all, m.dirty = m.dirty, map[string]struct{}{}
		m.mu.Unlock()
	}
}

// diff compares the named Nodes' current leases with told, updates told
// and returns the events that say the difference, removals first.
func (m *Manager) diff(names map[string]struct{}, told map[string]*lease.Lease) []lease.Event {
	sorted := slices.Sorted(func(yield func(string) bool) {
		for n := range names {
			if !yield(n) {
				return
			}
		}
	})
	var removed, added []lease.Event
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, name := range sorted {
		var cur lease.Lease
		have := false
		if name == m.cfg.NodeName {
			cur, have = m.own, m.own.Subnet.IsValid() || m.own.IPv6Subnet.IsValid()
		} else {
			n, err := m.lister.Get(name)
			if err == nil {
				cur, have = m.peerLocked(name, n)
			} else {
				delete(m.bad, name)
			}
		}
		old, had := told[name]
		if had && (!have || old.Key() != cur.Key()) {
			removed = append(removed, lease.Event{Type: lease.Removed, Lease: old})
			delete(told, name)
			had = false
		}
		if have && (!had || !sameLease(*old, cur)) {
			added = append(added, lease.Event{Type: lease.Added, Lease: &cur})
			told[name] = &cur
		}
	}
	return append(removed, added...)
}

// peerLocked translates a peer Node, reporting (once per distinct problem)
// a Node that claims to be a peer but cannot be used.
func (m *Manager) peerLocked(name string, n *v1.Node) (lease.Lease, bool) {
	l, err := m.ann.NodeLease(n, m.cfg.Network)
	var skip *SkipError
	switch {
	case err == nil:
		delete(m.bad, name)
		return l, true
	case errors.As(err, &skip):
		if m.bad[name] != err.Error() {
			m.bad[name] = err.Error()
			m.skipped.WithLabelValues(skip.Reason).Inc()
			m.log.Warn("skipping peer Node: not programmed into the data path", "node", name,
				"reason", skip.Reason, "detail", skip.Detail, "fix", m.fix(name, skip.Reason))
		}
	default:
		delete(m.bad, name)
	}
	return lease.Lease{}, false
}

// notReserved is the Expiration of a lease from a Node. Nodes have no
// expiry; a zero Expiration would mark an etcd reservation (see
// lease.Lease.Reserved), so it says, as flannel's kube mode does, "a day
// from when it was read".
func notReserved() time.Time { return time.Now().Add(registry.DefaultTTL) }
