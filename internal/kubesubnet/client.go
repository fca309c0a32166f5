package kubesubnet

import (
	"context"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/loomnet/loom/internal/kubeclient"
)

// Client is the connection the manager runs on: kubeclient's, shared with
// whatever else of the agent reads the Kubernetes API. ClientConfig and
// NewClient are kubeclient's Config and New under the names the agent
// builds its client with.
type (
	Client       = kubeclient.Client
	ClientConfig = kubeclient.Config
)

// NewClient builds the connection; see kubeclient.New.
func NewClient(cfg ClientConfig) (*Client, error) { return kubeclient.New(cfg) }

// NodeAPI is what the manager asks of the Kubernetes API: exactly the
// verbs deploy/kubernetes/loom.yaml grants (get, list and watch on nodes,
// patch on nodes/status; a verb added here must be added there). Every
// call but Watch is bounded by the implementation. kubeclient.Nodes is
// the real one; unit tests pass a fake in Config.Nodes.
type NodeAPI interface {
	Get(ctx context.Context, name string) (*v1.Node, error)
	List(ctx context.Context, opts metav1.ListOptions) (*v1.NodeList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	// Patch is called with subresource "status" only.
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte, subresources ...string) (*v1.Node, error)
}

var _ NodeAPI = kubeclient.Nodes{}
