package kubesubnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/loomnet/loom/internal/version"
)

// Defaults of ClientConfig.
const (
	DefaultRequestTimeout = 10 * time.Second
	DefaultDialTimeout    = 5 * time.Second
	DefaultResync         = 5 * time.Minute // flannel's; informers re-deliver every object this often
	DefaultMonitorEvery   = 10 * time.Second
	// The agent makes a handful of requests at start and one per change
	// of its own Node afterwards; everything else comes through watches.
	// client-go's 5 QPS would only slow a burst of retries after an
	// apiserver restart.
	defaultQPS   = 20
	defaultBurst = 40
	// tcpKeepAlive finds a dead connection to an apiserver that went away
	// without a FIN; HTTP/2 pings (client-go's default, 30 s) find a hung
	// one.
	tcpKeepAlive = 30 * time.Second
)

// ClientConfig says how to reach the Kubernetes API.
type ClientConfig struct {
	// KubeconfigFile is -kubeconfig-file; "" means the in-cluster config
	// (the pod's ServiceAccount token and the KUBERNETES_SERVICE_* address).
	KubeconfigFile string
	// APIURL is -kube-api-url: it replaces the server of either config,
	// e.g. the apiserver's own address while the "kubernetes" Service is
	// not routable yet (no kube-proxy on a fresh node).
	APIURL string
	// Clientset, when set, is used instead of connecting: unit tests pass
	// client-go's fake clientset here.
	Clientset kubernetes.Interface
	// REST, when set, is the connection config to use as is, before
	// QPS, timeouts and user agent are filled in (tests that wrap the
	// transport to count requests).
	REST *rest.Config

	RequestTimeout time.Duration // bound on every request but watches; default 10 s
	DialTimeout    time.Duration // default 5 s
	Resync         time.Duration // informer resync; default 5 min

	Logger *slog.Logger // default slog.Default()
	// Metrics, when set, receives loom_store_reachable and
	// loom_store_last_contact_timestamp_seconds (the names the etcd
	// registry uses: here the store is the API server), and turns on the
	// monitor that checks the apiserver's /readyz every MonitorEvery
	// (default 10 s).
	Metrics      prometheus.Registerer
	MonitorEvery time.Duration
}

// Client is a connection to the Kubernetes API with one shared informer
// factory. The subnet manager's Node informer comes from it today; the
// Service proxy's and DNS's Service and EndpointSlice informers will come
// from the same factory later, so every resource is watched once per agent
// however many parts of it read it.
//
// Timeouts: every unary request is bounded by RequestTimeout (use
// Bounded); connections by DialTimeout, TCP keep-alive and HTTP/2 pings.
// rest.Config.Timeout is deliberately not set: it would cut every watch.
type Client struct {
	cs      kubernetes.Interface
	factory informers.SharedInformerFactory
	cfg     ClientConfig
	log     *slog.Logger
	server  string                          // the apiserver's address, for messages
	probe   func(ctx context.Context) error // the reachability check; nil without one

	reach   reachability
	ctx     context.Context // lives until Close: informers and the monitor run in it
	stop    context.CancelFunc
	wg      sync.WaitGroup // the monitor
	started sync.Once      // the monitor is started
}

// NewClient builds the connection. Nothing is sent until an informer is
// started or a request made, so it succeeds while the apiserver is down.
func NewClient(cfg ClientConfig) (*Client, error) {
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
	c := &Client{cfg: cfg, log: cfg.Logger, cs: cfg.Clientset, server: "(fake)"}
	if c.cs == nil {
		rc, err := restConfig(cfg)
		if err != nil {
			return nil, err
		}
		c.server = rc.Host
		if c.cs, err = kubernetes.NewForConfig(rc); err != nil {
			return nil, fmt.Errorf("connect to the Kubernetes API at %s: %w", rc.Host, err)
		}
	}
	if rc := c.cs.Discovery().RESTClient(); rc != nil {
		c.probe = func(ctx context.Context) error { return readyz(ctx, rc) }
	}
	// Informers log through the context's logger (client-go's contextual
	// logging), so their messages land in the agent's log, not klog's.
	ctx := logr.NewContext(context.Background(), logr.FromSlogHandler(cfg.Logger.With("component", "kube-client").Handler()))
	c.ctx, c.stop = context.WithCancel(ctx)
	c.factory = informers.NewSharedInformerFactoryWithOptions(c.cs, cfg.Resync, informers.WithTransform(slim))
	if cfg.Metrics != nil {
		if err := c.registerMetrics(cfg.Metrics); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// restConfig builds the connection config: -kubeconfig-file, else the
// in-cluster config, with -kube-api-url as the server when given.
func restConfig(cfg ClientConfig) (*rest.Config, error) {
	var rc *rest.Config
	var err error
	switch {
	case cfg.REST != nil:
		rc = rest.CopyConfig(cfg.REST)
	case cfg.KubeconfigFile != "":
		rules := &clientcmd.ClientConfigLoadingRules{ExplicitPath: cfg.KubeconfigFile}
		over := &clientcmd.ConfigOverrides{ClusterInfo: clientcmdapi.Cluster{Server: cfg.APIURL}}
		if rc, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, over).ClientConfig(); err != nil {
			return nil, fmt.Errorf("-kubeconfig-file %s: %w", cfg.KubeconfigFile, err)
		}
	default:
		rc, err = rest.InClusterConfig()
		switch {
		case errors.Is(err, rest.ErrNotInCluster) && cfg.APIURL != "":
			// No credentials, but the user named a server: maybe one
			// that needs none (an insecure test apiserver).
			rc, err = &rest.Config{}, nil
		case errors.Is(err, rest.ErrNotInCluster):
			return nil, errors.New("-kube-subnet-mgr: no -kubeconfig-file given and not running in a pod (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT unset): " +
				"run the agent from its DaemonSet, or give -kubeconfig-file=FILE with the credentials of a user allowed to get, list and watch nodes and patch nodes/status")
		case err != nil:
			return nil, fmt.Errorf("-kube-subnet-mgr: read the in-cluster config (the pod's ServiceAccount): %w", err)
		}
		if cfg.APIURL != "" {
			rc.Host = cfg.APIURL
		}
	}
	rc.QPS, rc.Burst = defaultQPS, defaultBurst
	rc.UserAgent = "loom/" + version.String()
	rc.Dial = (&net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: tcpKeepAlive}).DialContext
	if rc.TLSClientConfig.Insecure {
		// Not an error: a lab may run so. But never silently.
		cfg.Logger.Warn("the kubeconfig skips TLS verification of the apiserver (insecure-skip-tls-verify)", "server", rc.Host)
	}
	return rc, nil
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

// Clientset is the typed client.
func (c *Client) Clientset() kubernetes.Interface { return c.cs }

// Informers is the shared informer factory. Ask it for informers, then
// call Start.
func (c *Client) Informers() informers.SharedInformerFactory { return c.factory }

// Start runs every informer requested from Informers so far that is not
// running yet, until Close, and the reachability monitor.
func (c *Client) Start() {
	c.factory.StartWithContext(c.ctx)
	c.started.Do(func() {
		if c.cfg.Metrics != nil && c.probe != nil {
			c.wg.Go(c.monitor)
		}
	})
}

// Close stops the informers and the monitor and waits for them.
func (c *Client) Close() error {
	c.stop()
	c.factory.Shutdown()
	c.wg.Wait()
	return nil
}

// Bounded gives one request its deadline.
func (c *Client) Bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.cfg.RequestTimeout)
}

// Server is the apiserver's address, for messages.
func (c *Client) Server() string { return c.server }

// NodeOfPod returns the node a pod runs on. flannel's DaemonSet
// (kube-flannel.yml) gives its agent POD_NAME and POD_NAMESPACE but not
// NODE_NAME; this is how the node is found there.
func (c *Client) NodeOfPod(ctx context.Context, namespace, name string) (string, error) {
	rctx, cancel := c.Bounded(ctx)
	defer cancel()
	pod, err := c.cs.CoreV1().Pods(namespace).Get(rctx, name, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("find this node's name from pod %s/%s (POD_NAMESPACE/POD_NAME): %w; or set NODE_NAME (downward API spec.nodeName) or -node-name", namespace, name, err)
	}
	if pod.Spec.NodeName == "" {
		return "", fmt.Errorf("pod %s/%s (POD_NAMESPACE/POD_NAME) is not scheduled on a node: set NODE_NAME or -node-name", namespace, name)
	}
	return pod.Spec.NodeName, nil
}

// readyz asks the apiserver whether it serves: any answer but a server
// error counts (a 401 or 403 still says the apiserver is there; /readyz
// is open to everyone by default). A 5xx means it is shutting down or has
// lost etcd.
func readyz(ctx context.Context, rc rest.Interface) error {
	var code int
	res := rc.Get().AbsPath("/readyz").Do(ctx).StatusCode(&code)
	if code != 0 && code < http.StatusInternalServerError {
		return nil
	}
	if err := res.Error(); err != nil {
		return err
	}
	return fmt.Errorf("/readyz answered %d", code)
}
