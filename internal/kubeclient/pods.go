package kubeclient

import (
	"context"
	"fmt"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Pods is the typed client of core/v1 Pods of one namespace. The agent
// only reads its own Pod (NodeOfPod); the lab, which stands in for
// kubelets, writes Pod objects of its pods.
type Pods struct {
	r resource[*v1.Pod, *v1.PodList]
}

// Pods returns the client of the Pods in namespace ("": all namespaces,
// for List only).
func (c *Client) Pods(namespace string) Pods {
	return Pods{resource[*v1.Pod, *v1.PodList]{
		c: c, rest: c.core, name: "pods", namespace: namespace,
		newObj:  func() *v1.Pod { return &v1.Pod{} },
		newList: func() *v1.PodList { return &v1.PodList{} },
	}}
}

// Get reads one Pod.
func (p Pods) Get(ctx context.Context, name string) (*v1.Pod, error) { return p.r.get(ctx, name) }

// List reads Pods.
func (p Pods) List(ctx context.Context, opts metav1.ListOptions) (*v1.PodList, error) {
	return p.r.list(ctx, opts)
}

// Create creates a Pod.
func (p Pods) Create(ctx context.Context, pod *v1.Pod) (*v1.Pod, error) {
	return p.r.create(ctx, pod)
}

// UpdateStatus replaces a Pod's status, as its kubelet reports it.
func (p Pods) UpdateStatus(ctx context.Context, pod *v1.Pod) (*v1.Pod, error) {
	return p.r.updateStatus(ctx, pod)
}

// Delete removes a Pod; opts.GracePeriodSeconds 0 removes it at once.
func (p Pods) Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error {
	return p.r.delete(ctx, name, opts)
}

// NodeOfPod returns the node a pod runs on. flannel's DaemonSet
// (kube-flannel.yml) gives its agent POD_NAME and POD_NAMESPACE but not
// NODE_NAME; this is how the node is found there.
func (c *Client) NodeOfPod(ctx context.Context, namespace, name string) (string, error) {
	pod, err := c.Pods(namespace).Get(ctx, name)
	if err != nil {
		return "", fmt.Errorf("find this node's name from pod %s/%s (POD_NAMESPACE/POD_NAME): %w; or set NODE_NAME (downward API spec.nodeName) or -node-name", namespace, name, err)
	}
	if pod.Spec.NodeName == "" {
		return "", fmt.Errorf("pod %s/%s (POD_NAMESPACE/POD_NAME) is not scheduled on a node: set NODE_NAME or -node-name", namespace, name)
	}
	return pod.Spec.NodeName, nil
}
