package kubeclient

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/client-go/util/flowcontrol"

	"github.com/loomnet/loom/internal/version"
)

const (
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

// restConfig builds the connection config: -kubeconfig-file, else the
// in-cluster config, with -kube-api-url as the server when given.
func restConfig(cfg Config) (*rest.Config, error) {
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
	// One limiter for every API group's REST client, as the clientset
	// shares one: the budget is the agent's, not each group's.
	rc.RateLimiter = flowcontrol.NewTokenBucketRateLimiter(rc.QPS, rc.Burst)
	rc.UserAgent = cfg.UserAgent
	if rc.UserAgent == "" {
		rc.UserAgent = "loom/" + version.String()
	}
	rc.Dial = cfg.Dial
	if rc.Dial == nil {
		rc.Dial = (&net.Dialer{Timeout: cfg.DialTimeout, KeepAlive: tcpKeepAlive}).DialContext
	}
	if rc.TLSClientConfig.Insecure {
		// Not an error: a lab may run so. But never silently.
		cfg.Logger.Warn("the kubeconfig skips TLS verification of the apiserver (insecure-skip-tls-verify)", "server", rc.Host)
	}
	return rc, nil
}

// newScheme knows the API types loom decodes: core/v1 (with metav1's
// Status, WatchEvent and the option types every group version carries),
// nothing else. A resource of another group adds its AddToScheme here.
func newScheme() (*runtime.Scheme, error) {
	s := runtime.NewScheme()
	if err := v1.AddToScheme(s); err != nil {
		return nil, fmt.Errorf("register core/v1 types: %w", err)
	}
	return s, nil
}

// restClient is the REST client of one API group version (apiPath "/api"
// for core, "/apis" for the others) on the shared HTTP client, so every
// group uses one connection pool and one rate limiter.
func restClient(rc *rest.Config, hc *http.Client, scheme *runtime.Scheme, apiPath string, gv schema.GroupVersion) (*rest.RESTClient, error) {
	gc := rest.CopyConfig(rc)
	gc.APIPath = apiPath
	gc.GroupVersion = &gv
	// Objects come back as they were sent: the scheme has no internal
	// versions to convert to.
	gc.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	return rest.RESTClientForConfigAndClient(gc, hc)
}
