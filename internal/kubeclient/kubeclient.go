// Package kubeclient talks to the Kubernetes API for loom, with only the
// API types loom uses.
//
// Why not client-go's typed clientset (k8s.io/client-go/kubernetes) and its
// SharedInformerFactory (k8s.io/client-go/informers): they link and
// register every API group the apiserver serves, with their apply
// configurations and OpenAPI models. That doubled the loom binary (to 106
// MB) and raised the idle agent's RSS from 33.5 to 55 MiB, most of it
// pages of the binary touched by package init (issue #8). This package
// builds the same requests (paths, parameters, encodings) over client-go's
// rest and tools/cache packages with a scheme of its own that holds core/v1
// only, and keeps the two things of the clientset loom relies on: typed
// methods, and one shared informer per resource (Informer).
//
// A new resource is one small file: a typed client over resource[T, L]
// with exactly the verbs loom calls (nodes.go, pods.go), and, when it is
// not in core/v1, its group's AddToScheme in newScheme and a REST client
// of its group version from restClient, on the HTTP client New makes (one
// connection pool and one rate limiter for all groups). The Service
// proxy's Services are core/v1; discovery/v1 EndpointSlices are such a
// group. deps_test.go lists the API groups the binary may link.
//
// Requests: every request but a watch is bounded by Config.RequestTimeout,
// so callers need no deadline of their own; connections by DialTimeout,
// TCP keep-alive and HTTP/2 pings. rest.Config.Timeout is deliberately not
// set: it would cut every watch. Objects travel as protobuf (the
// apiserver's cheapest encoding to decode, what kubelet and kube-proxy
// use), patches as JSON.
package kubeclient

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/loomnet/loom/internal/reach"
)

// Defaults of Config.
const (
	DefaultRequestTimeout = 10 * time.Second
	DefaultDialTimeout    = 5 * time.Second
	DefaultResync         = 5 * time.Minute // flannel's; informers re-deliver every object this often
	DefaultMonitorEvery   = 10 * time.Second
)

// Config says how to reach the Kubernetes API.
type Config struct {
	// KubeconfigFile is -kubeconfig-file; "" means the in-cluster config
	// (the pod's ServiceAccount token and the KUBERNETES_SERVICE_* address).
	KubeconfigFile string
	// APIURL is -kube-api-url: it replaces the server of either config,
	// e.g. the apiserver's own address while the "kubernetes" Service is
	// not routable yet (no kube-proxy on a fresh node).
	APIURL string
	// REST, when set, is the connection config to use as is, before
	// QPS, timeouts and user agent are filled in (tests that wrap the
	// transport to count requests).
	REST *rest.Config
	// Dial, when set, opens every connection to the apiserver (the lab
	// dials from inside its router namespace); default a net.Dialer with
	// DialTimeout and TCP keep-alive.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// UserAgent is sent with every request; default "loom/<version>".
	UserAgent string

	RequestTimeout time.Duration // bound on every request but watches; default 10 s
	DialTimeout    time.Duration // default 5 s
	Resync         time.Duration // informer resync; default 5 min

	Logger *slog.Logger // default slog.Default()
	// Metrics, when set, receives loom_store_reachable and
	// loom_store_last_contact_timestamp_seconds (the names the etcd
	// registry uses: here the store is the API server), and turns on the
	// monitor that checks the apiserver's /readyz every MonitorEvery
	// (default 10 s) from Start until Close.
	Metrics      prometheus.Registerer
	MonitorEvery time.Duration
}

// Client is a connection to the Kubernetes API with one shared informer
// per resource: the subnet manager's Node informer comes from it today;
// the Service proxy's and DNS's will come from the same Client later, so
// every resource is watched once per agent however many parts of it read
// it.
type Client struct {
	cfg    Config
	log    *slog.Logger
	server string // the apiserver's address, for messages

	core   *rest.RESTClient       // /api/v1
	params runtime.ParameterCodec // ListOptions and friends to query parameters

	reach reach.State

	ctx  context.Context // lives until Close: informers and the monitor run in it
	stop context.CancelFunc
	wg   sync.WaitGroup // informers and the monitor

	mu        sync.Mutex                       // guards the fields below
	informers map[reflect.Type]*sharedInformer // by the type of object they hold
	monitored bool                             // the monitor was started
	closed    bool                             // Close was called: start nothing more
}

// New builds the connection. Nothing is sent until an informer is started
// or a request made, so it succeeds while the apiserver is down.
func New(cfg Config) (*Client, error) {
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.MonitorEvery <= 0 {
		cfg.MonitorEvery = DefaultMonitorEvery
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	rc, err := restConfig(cfg)
	if err != nil {
		return nil, err
	}
	scheme, err := newScheme()
	if err != nil {
		return nil, err
	}
	hc, err := rest.HTTPClientFor(rc)
	if err != nil {
		return nil, fmt.Errorf("connect to the Kubernetes API at %s: %w", rc.Host, err)
	}
	core, err := restClient(rc, hc, scheme, "/api", v1.SchemeGroupVersion)
	if err != nil {
		return nil, fmt.Errorf("connect to the Kubernetes API at %s: %w", rc.Host, err)
	}
	c := &Client{
		cfg:       cfg,
		log:       cfg.Logger,
		server:    rc.Host,
		core:      core,
		params:    runtime.NewParameterCodec(scheme),
		informers: map[reflect.Type]*sharedInformer{},
	}
	// Informers log through the context's logger (client-go's contextual
	// logging), so their messages land in the agent's log, not klog's.
	ctx := logr.NewContext(context.Background(), logr.FromSlogHandler(cfg.Logger.With("component", "kube-client").Handler()))
	c.ctx, c.stop = context.WithCancel(ctx)
	if cfg.Metrics != nil {
		if err := c.registerMetrics(cfg.Metrics); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Server is the apiserver's address, for messages.
func (c *Client) Server() string { return c.server }

// Start runs every informer asked for so far that is not running yet,
// until Close, and the reachability monitor when Config.Metrics is set.
func (c *Client) Start() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	for _, si := range c.informers {
		if !si.started {
			si.started = true
			c.wg.Go(func() { si.inf.RunWithContext(c.ctx) })
		}
	}
	if c.cfg.Metrics != nil && !c.monitored {
		c.monitored = true
		c.wg.Go(c.monitor)
	}
}

// Close stops the informers and the monitor and waits for them.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.stop()
	c.wg.Wait()
	return nil
}

// bounded gives one request its deadline.
func (c *Client) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.cfg.RequestTimeout)
}

// readyz asks the apiserver whether it serves: any answer but a server
// error counts (a 401 or 403 still says the apiserver is there; /readyz
// is open to everyone by default). A 5xx means it is shutting down or has
// lost etcd.
func (c *Client) readyz(ctx context.Context) error {
	ctx, cancel := c.bounded(ctx)
	defer cancel()
	var code int
	res := c.core.Get().AbsPath("/readyz").Do(ctx).StatusCode(&code)
	if code != 0 && code < http.StatusInternalServerError {
		return nil
	}
	if err := res.Error(); err != nil {
		return err
	}
	return fmt.Errorf("/readyz answered %d", code)
}

// sharedInformer is one entry of the informer registry.
type sharedInformer struct {
	inf     cache.SharedIndexInformer
	started bool
}
