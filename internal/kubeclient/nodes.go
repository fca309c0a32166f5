package kubeclient

import (
	"context"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
)

// Nodes is the typed client of core/v1 Nodes. The agent uses Get, List,
// Watch and Patch of "status" only (the verbs of the manifest's RBAC);
// the lab, which stands in for kubelets, the rest.
type Nodes struct {
	r resource[*v1.Node, *v1.NodeList]
}

// Nodes returns the client of Nodes.
func (c *Client) Nodes() Nodes {
	return Nodes{resource[*v1.Node, *v1.NodeList]{
		c: c, rest: c.core, name: "nodes",
		newObj:  func() *v1.Node { return &v1.Node{} },
		newList: func() *v1.NodeList { return &v1.NodeList{} },
	}}
}

// Get reads one Node.
func (n Nodes) Get(ctx context.Context, name string) (*v1.Node, error) { return n.r.get(ctx, name) }

// List reads Nodes, a page at a time when opts.Limit is set.
func (n Nodes) List(ctx context.Context, opts metav1.ListOptions) (*v1.NodeList, error) {
	return n.r.list(ctx, opts)
}

// Watch streams changes to Nodes until ctx ends or the server closes it.
func (n Nodes) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	return n.r.watch(ctx, opts)
}

// Create registers a Node.
func (n Nodes) Create(ctx context.Context, node *v1.Node) (*v1.Node, error) {
	return n.r.create(ctx, node)
}

// Update replaces a Node's metadata and spec (its status is ignored).
func (n Nodes) Update(ctx context.Context, node *v1.Node) (*v1.Node, error) {
	return n.r.update(ctx, node)
}

// UpdateStatus replaces a Node's status.
func (n Nodes) UpdateStatus(ctx context.Context, node *v1.Node) (*v1.Node, error) {
	return n.r.updateStatus(ctx, node)
}

// Patch changes a Node, or with subresource "status" its status (and
// metadata: the status subresource keeps metadata changes).
func (n Nodes) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, subresources ...string) (*v1.Node, error) {
	return n.r.patch(ctx, name, pt, data, subresources...)
}

// Delete removes a Node.
func (n Nodes) Delete(ctx context.Context, name string) error {
	return n.r.delete(ctx, name, metav1.DeleteOptions{})
}
