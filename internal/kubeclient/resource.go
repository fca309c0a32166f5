package kubeclient

import (
	"context"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// object is what every API object is: a runtime.Object with metadata.
type object interface {
	runtime.Object
	metav1.Object
}

// resource builds the requests of one resource, as client-go's generated
// clients do (same paths, parameters and encodings), for the typed clients
// of nodes.go, pods.go, ... to expose the verbs loom uses. T is the
// object's pointer type, L its list's.
type resource[T object, L runtime.Object] struct {
	c         *Client
	rest      *rest.RESTClient // of the resource's group version
	name      string           // plural, as in the URL: "nodes"
	namespace string           // "" for a cluster-scoped resource (or all namespaces)
	newObj    func() T
	newList   func() L
}

// scoped points a request at the resource; objects are asked for as
// protobuf, JSON accepted.
func (r resource[T, L]) scoped(req *rest.Request) *rest.Request {
	return req.UseProtobufAsDefault().NamespaceIfScoped(r.namespace, r.namespace != "").Resource(r.name)
}

// into runs a bounded request and decodes its answer into a new object.
func (r resource[T, L]) into(ctx context.Context, req *rest.Request) (T, error) {
	ctx, cancel := r.c.bounded(ctx)
	defer cancel()
	out := r.newObj()
	if err := req.Do(ctx).Into(out); err != nil {
		var zero T
		return zero, err
	}
	return out, nil
}

func (r resource[T, L]) get(ctx context.Context, name string) (T, error) {
	return r.into(ctx, r.scoped(r.rest.Get()).Name(name))
}

func (r resource[T, L]) list(ctx context.Context, opts metav1.ListOptions) (L, error) {
	ctx, cancel := r.c.bounded(ctx)
	defer cancel()
	req := r.scoped(r.rest.Get()).VersionedParams(&opts, r.c.params)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	out := r.newList()
	if err := req.Do(ctx).Into(out); err != nil {
		var zero L
		return zero, err
	}
	return out, nil
}

// watch is never bounded by RequestTimeout: a watch lasts until the
// server's timeoutSeconds (the reflector picks 5 to 10 minutes) or ctx.
func (r resource[T, L]) watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	req := r.scoped(r.rest.Get()).VersionedParams(&opts, r.c.params)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	return req.Watch(ctx)
}

func (r resource[T, L]) create(ctx context.Context, obj T) (T, error) {
	return r.into(ctx, r.scoped(r.rest.Post()).Body(obj))
}

func (r resource[T, L]) update(ctx context.Context, obj T) (T, error) {
	return r.into(ctx, r.scoped(r.rest.Put()).Name(obj.GetName()).Body(obj))
}

func (r resource[T, L]) updateStatus(ctx context.Context, obj T) (T, error) {
	return r.into(ctx, r.scoped(r.rest.Put()).Name(obj.GetName()).SubResource("status").Body(obj))
}

// patch sends data, a patch of type pt, to the object or to one of its
// subresources ("status").
func (r resource[T, L]) patch(ctx context.Context, name string, pt types.PatchType, data []byte, subresources ...string) (T, error) {
	return r.into(ctx, r.scoped(r.rest.Patch(pt)).Name(name).SubResource(subresources...).Body(data))
}

func (r resource[T, L]) delete(ctx context.Context, name string, opts metav1.DeleteOptions) error {
	ctx, cancel := r.c.bounded(ctx)
	defer cancel()
	return r.scoped(r.rest.Delete()).Name(name).Body(&opts).Do(ctx).Error()
}
