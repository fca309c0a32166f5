package kubeclient

import (
	"context"
	"reflect"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
)

// Informer returns the Client's shared informer of obj's type (e.g.
// &v1.Node{}), made on the first call from lw and the Client's Resync:
// every part of the agent that asks for Nodes gets the same informer, so
// each resource is listed and watched once. lw must cover every object of
// the resource (no selector): later callers share what the first one
// listed. The informer runs from the next Start until Close; add event
// handlers before Start to see the first list as events.
func (c *Client) Informer(obj runtime.Object, lw cache.ListerWatcher) cache.SharedIndexInformer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := reflect.TypeOf(obj)
	if si, ok := c.informers[t]; ok {
		return si.inf
	}
	inf := cache.NewSharedIndexInformerWithOptions(lw, obj, cache.SharedIndexInformerOptions{
		ResyncPeriod: c.cfg.Resync,
		Indexers:     cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc},
	})
	// Cannot fail: the informer has not started.
	_ = inf.SetTransform(slim)
	c.informers[t] = &sharedInformer{inf: inf}
	return inf
}

// ListWatch is the ListerWatcher of an informer over a typed client's
// List and Watch (Nodes, or a fake in tests). A client that says it does
// not support watch-list streams (client-go's fake clientset) gets the
// reflector's plain LIST then WATCH.
func ListWatch[L runtime.Object](api interface {
	List(ctx context.Context, opts metav1.ListOptions) (L, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
}) cache.ListerWatcher {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			list, err := api.List(ctx, opts)
			if err != nil {
				return nil, err
			}
			return list, nil
		},
		WatchFuncWithContext: api.Watch,
	}
	return cache.ToListWatcherWithWatchListSemantics(lw, api)
}

// slim drops the parts of objects loom never reads before they enter the
// informers' caches: managed fields on every object, and a Node's image
// list (up to 50 entries per node, each with its digests).
func slim(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
	}
	if n, ok := obj.(*v1.Node); ok {
		n.Status.Images = nil
	}
	return obj, nil
}
