package lab

// Kubernetes mode (--datastore kube): the router namespace runs a real
// control plane (internal/kubecp, the release pinned in tools/kube) on top
// of the lab's loom store, and the lab stands in for the kubelets:
//
//	loom-a-rt   loom store               http://127.0.0.1:2379, only the apiserver's (keys under /registry)
//	            kube-apiserver           https://198.18.0.1:6443 on br0, token auth, Node+RBAC
//	            kube-controller-manager  --allocate-node-cidrs --cluster-cidr=<ClusterCIDR>
//	loom-a-n1   loom agent --kube-subnet-mgr --kubeconfig-file <the manifest's ServiceAccount>
//
// The store listens on the router's loopback only: an agent that touched
// etcd in Kubernetes mode would fail here instead of passing by accident.
//
// The lab registers one Node per lab node (InternalIP = its underlay
// address, Ready) and, after each CNI ADD, a Pod object with the address
// loom-cni gave (Running, Ready), so EndpointSlices come out as in a real
// cluster. Agents run as system:serviceaccount:loom:loom with exactly the
// RBAC of deploy/kubernetes/loom.yaml, which the lab applies with kubectl,
// as an operator would: a verb missing from the ClusterRole breaks the lab
// as it would break a cluster.
//
// What `loom lab break` and `heal` need in another process is kept in
// lab.json (KubeState); the tokens stay in the 0600 kubeconfig files.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"

	"github.com/loomnet/loom/deploy"
	"github.com/loomnet/loom/internal/kubeclient"
	"github.com/loomnet/loom/internal/kubecp"
	"github.com/loomnet/loom/internal/netns"
)

// Names of the control plane's processes (their binaries' names, how
// cmdline recognises them) and of what the lab creates in the API.
const (
	apiServerProc         = "kube-apiserver"
	controllerManagerProc = "kube-controller-manager"

	// kubeStoreAddr is the loom store's address in Kubernetes mode: the
	// router's loopback, reachable by the apiserver beside it only.
	kubeStoreAddr = "127.0.0.1"

	// PodNamespace is where the lab's Pod objects live.
	PodNamespace = "default"
	// PodLabel carries the lab pod's name on its Pod object, for selectors
	// (Services, later).
	PodLabel = "loom.lab/pod"
	// pauseImage is only a name: no runtime pulls it, but a Pod must name
	// an image, and this is the one a real sandbox would run.
	pauseImage     = "registry.k8s.io/pause:3.10"
	probeContainer = "probe"

	// flannelPrefix is the annotation prefix agents write under.
	flannelPrefix = "flannel.alpha.coreos.com/"
)

// KubeState is the lab's Kubernetes control plane as lab.json keeps it;
// kubecp keeps the rest (command lines, PKI, tokens) under <lab dir>/kube.
type KubeState struct {
	URL             string // https://198.18.0.1:6443
	AdminKubeconfig string // system:masters
	AgentKubeconfig string // the manifest's ServiceAccount
	AgentUser       string // system:serviceaccount:loom:loom
}

func (l *Lab) kubeDir() string            { return filepath.Join(l.dir(), "kube") }
func (l *Lab) kubeLog(proc string) string { return filepath.Join(l.dir(), proc+".log") }
func (l *Lab) netConfPath() string        { return filepath.Join(l.dir(), "net-conf.json") }
func (l *Lab) routerDial() netns.Dialer {
	return netns.Dialer{NS: l.RouterNS(), D: net.Dialer{Timeout: 5 * time.Second}}
}
func (l *Lab) isKube() bool { return l.Opts.Datastore == "kube" }

// manifestRBAC returns the objects of deploy/kubernetes/loom.yaml that give
// the agent its permissions, and the user its ServiceAccount authenticates
// as (with the groups the apiserver gives every ServiceAccount).
func manifestRBAC() ([]deploy.Object, kubecp.User, error) {
	objs, err := deploy.Objects()
	if err != nil {
		return nil, kubecp.User{}, fmt.Errorf("read deploy/kubernetes/loom.yaml: %w", err)
	}
	var rbac []deploy.Object
	var user kubecp.User
	for _, o := range objs {
		switch o.Kind {
		case "ServiceAccount":
			user = kubecp.User{
				Name:   "system:serviceaccount:" + o.Namespace + ":" + o.Name,
				Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + o.Namespace},
			}
		case "Namespace", "ClusterRole", "ClusterRoleBinding":
		default:
			continue
		}
		rbac = append(rbac, o)
	}
	if user.Name == "" {
		return nil, kubecp.User{}, errors.New("deploy/kubernetes/loom.yaml has no ServiceAccount for the agent")
	}
	return rbac, user, nil
}

// prepareKube writes the control plane's PKI and kubeconfigs and records
// its command lines.
func (l *Lab) prepareKube() error {
	_, user, err := manifestRBAC()
	if err != nil {
		return err
	}
	plan, err := kubecp.Prepare(kubecp.Config{
		Dir:         l.kubeDir(),
		Address:     bridgeAddr(0).Addr(),
		EtcdServers: []string{l.StoreEndpoint()},
		ClusterCIDR: l.Opts.ClusterCIDR,
		Users:       []kubecp.User{user},
	})
	if err != nil {
		return err
	}
	agentKC, err := plan.Kubeconfig(user.Name)
	if err != nil {
		return err
	}
	l.Kube = &KubeState{URL: plan.URL, AdminKubeconfig: plan.AdminKubeconfig, AgentKubeconfig: agentKC, AgentUser: user.Name}
	return nil
}

// kubePlan loads the plan prepareKube made, dialling from inside the
// router namespace.
func (l *Lab) kubePlan() (*kubecp.Plan, error) {
	if _, err := l.kubeState(); err != nil {
		return nil, err
	}
	plan, err := kubecp.Load(l.kubeDir())
	if err != nil {
		return nil, err
	}
	plan.Config.DialContext = l.routerDial().DialContext
	return plan, nil
}

func (l *Lab) kubeState() (*KubeState, error) {
	if l.Kube == nil {
		return nil, fmt.Errorf("lab %s runs --datastore %s: it has no Kubernetes control plane (bring one up with --datastore kube)", l.Opts.Name, l.Opts.Datastore)
	}
	return l.Kube, nil
}

// upKube brings the control plane up after the store, applies the
// manifest's RBAC, registers the Nodes and waits until each has a podCIDR.
func (l *Lab) upKube(ctx context.Context) error {
	if err := l.prepareKube(); err != nil {
		return err
	}
	if err := l.save(); err != nil {
		return err
	}
	if err := l.StartControlPlane(ctx); err != nil {
		return err
	}
	if err := l.applyRBAC(ctx); err != nil {
		return err
	}
	for _, n := range l.Nodes {
		if err := l.RegisterNode(ctx, n.Name); err != nil {
			return err
		}
	}
	return l.WaitPodCIDRs(ctx)
}

// StartControlPlane starts whichever of kube-apiserver and
// kube-controller-manager is not running, in that order (the controller
// manager gives up on an apiserver that is not healthy within 10 s), and
// waits until the controllers are at work.
func (l *Lab) StartControlPlane(ctx context.Context) error {
	plan, err := l.kubePlan()
	if err != nil {
		return err
	}
	if !l.recordedAlive(apiServerProc) {
		if err := l.startKubeProc(apiServerProc, plan.APIServer); err != nil {
			return err
		}
	}
	if err := l.waitWhileAlive(ctx, apiServerProc, plan.WaitAPIServer); err != nil {
		return err
	}
	if !l.recordedAlive(controllerManagerProc) {
		if err := l.startKubeProc(controllerManagerProc, plan.ControllerManager); err != nil {
			return err
		}
	}
	return l.waitWhileAlive(ctx, controllerManagerProc, plan.Wait)
}

// StopControllerManager stops kube-controller-manager: Nodes registered
// from then on get no podCIDR.
func (l *Lab) StopControllerManager() error {
	if _, err := l.kubeState(); err != nil {
		return err
	}
	return stopIn(l.RouterNS(), controllerManagerProc, controllerManagerProc, syscall.SIGTERM)
}

func (l *Lab) startKubeProc(proc string, c kubecp.Command) error {
	return l.recordBin(proc, l.RouterNS(), l.kubeLog(proc), c.Bin, c.Args...)
}

// waitWhileAlive runs wait (a readiness poll) and gives up early, with the
// end of the process's log, when the process proc exits first.
func (l *Lab) waitWhileAlive(ctx context.Context, proc string, wait func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	res := make(chan error, 1)
	go func() { res <- wait(ctx) }()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-res:
			if err != nil {
				return fmt.Errorf("%w; last lines of %s:\n%s", err, l.kubeLog(proc), logTail(l.kubeLog(proc), 10))
			}
			return nil
		case <-tick.C:
			if !l.recordedAlive(proc) {
				cancel()
				<-res
				return fmt.Errorf("%s exited; last lines of %s:\n%s", proc, l.kubeLog(proc), logTail(l.kubeLog(proc), 10))
			}
		}
	}
}

func logTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	return lastLines(data, n)
}

// KubeClient returns an admin (system:masters) client of the lab's
// apiserver that connects from inside the router namespace, as the lab
// itself runs in the root namespace, which has no route to the underlay.
// The lab never watches; every request is bounded (15 s).
func (l *Lab) KubeClient() (*kubeclient.Client, error) {
	if l.kube != nil {
		return l.kube, nil
	}
	k, err := l.kubeState()
	if err != nil {
		return nil, err
	}
	c, err := kubeclient.New(kubeclient.Config{
		KubeconfigFile: k.AdminKubeconfig,
		Dial:           l.routerDial().DialContext,
		UserAgent:      "loom-lab",
		RequestTimeout: 15 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("client of the lab's apiserver %s: %w", k.URL, err)
	}
	l.kube = c
	return c, nil
}

// applyRBAC applies the manifest's Namespace, ServiceAccount, ClusterRole
// and ClusterRoleBinding with the lab's kubectl, as `kubectl apply -f
// loom.yaml` does (loom's own client knows core/v1 only).
func (l *Lab) applyRBAC(ctx context.Context) error {
	objs, _, err := manifestRBAC()
	if err != nil {
		return err
	}
	plan, err := l.kubePlan()
	if err != nil {
		return err
	}
	list := struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Items      []json.RawMessage `json:"items"`
	}{APIVersion: "v1", Kind: "List"}
	var names []string
	for _, o := range objs {
		list.Items = append(list.Items, o.JSON)
		names = append(names, o.Kind+" "+o.Name)
	}
	data, err := json.Marshal(list)
	if err != nil {
		return fmt.Errorf("encode the RBAC of deploy/kubernetes/loom.yaml: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if out, err := plan.Apply(ctx, l.RouterNS(), string(data)); err != nil {
		return fmt.Errorf("apply %s of deploy/kubernetes/loom.yaml: %w\n%s", strings.Join(names, ", "), err, out)
	}
	return nil
}

// RegisterNode creates node's Node object as its kubelet would: the
// hostname and OS labels, then through the status subresource its
// addresses (InternalIP = the underlay address the agent uses) and a Ready
// condition. A Node that exists keeps its spec and gets the status again.
func (l *Lab) RegisterNode(ctx context.Context, node string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	obj := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{
		"kubernetes.io/hostname": n.Name,
		"kubernetes.io/os":       "linux",
	}}}
	if _, err := cs.Nodes().Create(ctx, obj); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("register Node %s: %w", n.Name, err)
	}
	now := metav1.Now()
	patch, err := json.Marshal(map[string]any{"status": map[string]any{
		"addresses": []v1.NodeAddress{
			{Type: v1.NodeInternalIP, Address: n.Underlay.Addr().String()},
			{Type: v1.NodeHostName, Address: n.Name},
		},
		"conditions": []v1.NodeCondition{{
			Type: v1.NodeReady, Status: v1.ConditionTrue,
			Reason: "LoomLabNode", Message: "the loom lab stands in for this node's kubelet",
			LastHeartbeatTime: now, LastTransitionTime: now,
		}},
	}})
	if err != nil {
		return err
	}
	// A strategic merge patch merges conditions by type: nothing another
	// writer set (the agent's NetworkUnavailable) is lost, and no
	// resourceVersion race with the controller manager's podCIDR update.
	if _, err := cs.Nodes().Patch(ctx, n.Name, types.StrategicMergePatchType, patch, "status"); err != nil {
		return fmt.Errorf("set the status of Node %s: %w", n.Name, err)
	}
	// Admission (TaintNodesByCondition) taints every new Node not-ready,
	// and the node lifecycle controller lifts the taint once the Node is
	// Ready. That controller does not run here (no kubelet heartbeats),
	// so the lab lifts it.
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := cs.Nodes().Get(ctx, n.Name)
		if err != nil {
			return err
		}
		kept := slices.DeleteFunc(slices.Clone(cur.Spec.Taints), func(t v1.Taint) bool { return t.Key == v1.TaintNodeNotReady })
		if len(kept) == len(cur.Spec.Taints) {
			return nil
		}
		cur.Spec.Taints = kept
		_, err = cs.Nodes().Update(ctx, cur)
		return err
	})
	if err != nil {
		return fmt.Errorf("lift the not-ready taint of Node %s: %w", n.Name, err)
	}
	return nil
}

// WaitPodCIDRs waits until kube-controller-manager has given every lab
// Node a podCIDR.
func (l *Lab) WaitPodCIDRs(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var missing []string
	for {
		cidrs, err := l.PodCIDRs(ctx)
		missing = nil
		for _, n := range l.Nodes {
			if !cidrs[n.Name].IsValid() {
				missing = append(missing, n.Name)
			}
		}
		if err == nil && len(missing) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("no podCIDR on %s", strings.Join(missing, ", "))
			}
			return fmt.Errorf("kube-controller-manager did not assign podCIDRs: %w; last lines of %s:\n%s",
				err, l.kubeLog(controllerManagerProc), logTail(l.kubeLog(controllerManagerProc), 10))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// PodCIDRs reads every Node's spec.podCIDR (the invalid Prefix: none yet).
func (l *Lab) PodCIDRs(ctx context.Context) (map[string]netip.Prefix, error) {
	cs, err := l.KubeClient()
	if err != nil {
		return nil, err
	}
	list, err := cs.Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list Nodes: %w", err)
	}
	out := map[string]netip.Prefix{}
	for _, n := range list.Items {
		if p, err := netip.ParsePrefix(n.Spec.PodCIDR); err == nil {
			out[n.Name] = p
		} else {
			out[n.Name] = netip.Prefix{}
		}
	}
	return out, nil
}

// DeleteNode deletes node's Node object, as `kubectl delete node` does
// when a machine is removed from the cluster.
func (l *Lab) DeleteNode(ctx context.Context, node string) error {
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	if err := cs.Nodes().Delete(ctx, node); err != nil {
		return fmt.Errorf("delete Node %s: %w", node, err)
	}
	return nil
}

// NodeAnnotations returns the annotations of node's Node object.
func (l *Lab) NodeAnnotations(ctx context.Context, node string) (map[string]string, error) {
	cs, err := l.KubeClient()
	if err != nil {
		return nil, err
	}
	n, err := cs.Nodes().Get(ctx, node)
	if err != nil {
		return nil, fmt.Errorf("read Node %s: %w", node, err)
	}
	return n.Annotations, nil
}

// createPodObject makes the Pod object of a lab pod just networked by CNI
// and reports it running and ready, as the kubelet would once its
// sandbox is up. An object left from an earlier pod of that name is
// replaced.
func (l *Lab) createPodObject(ctx context.Context, n *Node, p Pod) error {
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	if err := l.deletePodObject(ctx, p.Name); err != nil {
		return err
	}
	no := false
	obj := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: PodNamespace, Labels: map[string]string{PodLabel: p.Name}},
		Spec: v1.PodSpec{
			NodeName:                     n.Name,
			AutomountServiceAccountToken: &no,
			Containers:                   []v1.Container{{Name: probeContainer, Image: pauseImage}},
		},
	}
	if _, err := cs.Pods(PodNamespace).Create(ctx, obj); err != nil {
		return fmt.Errorf("create Pod %s: %w", p.Name, err)
	}
	now := metav1.Now()
	yes := true
	status := v1.PodStatus{
		Phase:     v1.PodRunning,
		HostIP:    n.Underlay.Addr().String(),
		HostIPs:   []v1.HostIP{{IP: n.Underlay.Addr().String()}},
		PodIP:     p.IP.String(),
		PodIPs:    []v1.PodIP{{IP: p.IP.String()}},
		StartTime: &now,
		QOSClass:  v1.PodQOSBestEffort,
		ContainerStatuses: []v1.ContainerStatus{{
			Name: probeContainer, Image: pauseImage, Ready: true, Started: &yes,
			ContainerID: "loom-lab://" + p.NS,
			State:       v1.ContainerState{Running: &v1.ContainerStateRunning{StartedAt: now}},
		}},
	}
	for _, c := range []v1.PodConditionType{v1.PodReadyToStartContainers, v1.PodInitialized, v1.PodScheduled, v1.ContainersReady, v1.PodReady} {
		status.Conditions = append(status.Conditions, v1.PodCondition{Type: c, Status: v1.ConditionTrue, LastTransitionTime: now})
	}
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := cs.Pods(PodNamespace).Get(ctx, p.Name)
		if err != nil {
			return err
		}
		cur.Status = status
		_, err = cs.Pods(PodNamespace).UpdateStatus(ctx, cur)
		return err
	})
	if err != nil {
		return fmt.Errorf("set the status of Pod %s: %w", p.Name, err)
	}
	return nil
}

// deletePodObject removes a lab pod's Pod object at once: no kubelet will
// confirm a graceful deletion. One that is gone already is no error.
func (l *Lab) deletePodObject(ctx context.Context, name string) error {
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	zero := int64(0)
	err = cs.Pods(PodNamespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete Pod %s: %w", name, err)
	}
	return nil
}

// kubeStatus writes the control plane's lines of `lab status`.
func (l *Lab) kubeStatus(ctx context.Context, w io.Writer) map[string]string {
	pids, _ := pidsIn([]string{l.RouterNS()})
	fmt.Fprintf(w, "  rt   kube-apiserver %s: %s\n", l.Kube.URL, procState(pids, apiServerProc))
	fmt.Fprintf(w, "       kube-controller-manager (cluster CIDR %s): %s\n", l.Opts.ClusterCIDR, procState(pids, controllerManagerProc))
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out := map[string]string{}
	cidrs, err := l.PodCIDRs(ctx)
	for _, n := range l.Nodes {
		switch p, ok := cidrs[n.Name]; {
		case err != nil:
			out[n.Name] = "podCIDR unknown (API unreachable)"
		case !ok:
			out[n.Name] = "no Node object"
		case !p.IsValid():
			out[n.Name] = "no podCIDR"
		default:
			out[n.Name] = "podCIDR " + p.String()
		}
	}
	if err != nil {
		fmt.Fprintf(w, "       API: %v\n", err)
	}
	return out
}

// SetNetworkUnavailable sets node's NetworkUnavailable condition, which
// the agent sets to False once the node's routes are in place.
func (l *Lab) SetNetworkUnavailable(ctx context.Context, node string, unavailable bool) error {
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	st, reason := v1.ConditionFalse, "LoomLabHealed"
	if unavailable {
		st, reason = v1.ConditionTrue, "LoomLabBreak"
	}
	now := metav1.Now()
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []v1.NodeCondition{{
		Type: v1.NodeNetworkUnavailable, Status: st, Reason: reason,
		Message: "set by loom lab", LastHeartbeatTime: now, LastTransitionTime: now,
	}}}})
	if err != nil {
		return err
	}
	if _, err := cs.Nodes().Patch(ctx, node, types.StrategicMergePatchType, patch, "status"); err != nil {
		return fmt.Errorf("set NetworkUnavailable=%s on Node %s: %w", st, node, err)
	}
	return nil
}
