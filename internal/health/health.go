// Package health serves the agent's probe and metrics endpoints:
//
//	/healthz  200 while the process serves HTTP (liveness)
//	/readyz   200 only when every registered readiness check passes; the
//	          body lists each check as "[+]name ok" or "[-]name: reason"
//	/metrics  the given Prometheus registry (never the global one)
//
// Readiness checks are registered as the agent's parts come up (lease,
// subnet.env, backend data path), so the server can start first and report
// "not ready" with reasons meanwhile. With no check registered at all,
// /readyz says not ready: an agent that registered nothing is not ready.
package health

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Defaults for Config.
const (
	DefaultCheckTimeout    = 5 * time.Second
	DefaultShutdownTimeout = 5 * time.Second
)

// CheckFunc reports nil when its part of the agent is ready, else why not.
// It must return promptly after ctx is done.
type CheckFunc func(ctx context.Context) error

// Ready adapts a Ready() bool method (backend.Network, reconcilers) to a
// CheckFunc that fails with reason while ready returns false.
func Ready(ready func() bool, reason string) CheckFunc {
	return func(context.Context) error {
		if ready() {
			return nil
		}
		return errors.New(reason)
	}
}

// Checks is the set of readiness checks. The zero value is empty and ready
// to use; it is safe for concurrent use.
type Checks struct {
	mu     sync.Mutex // guards checks
	checks []namedCheck
}

type namedCheck struct {
	name string
	fn   CheckFunc
}

// Add registers a readiness check. A second check with the same name
// replaces the first.
func (c *Checks) Add(name string, fn CheckFunc) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.checks {
		if c.checks[i].name == name {
			c.checks[i].fn = fn
			return
		}
	}
	c.checks = append(c.checks, namedCheck{name: name, fn: fn})
}

// Result is the outcome of one check.
type Result struct {
	Name string
	Err  error // nil: ready
}

// Run runs every check, in registration order, and reports whether all
// passed (false when there is none).
func (c *Checks) Run(ctx context.Context) (results []Result, ready bool) {
	c.mu.Lock()
	checks := append([]namedCheck(nil), c.checks...)
	c.mu.Unlock()
	ready = len(checks) > 0
	for _, ch := range checks {
		err := ch.fn(ctx)
		if err == nil && ctx.Err() != nil {
			err = ctx.Err()
		}
		results = append(results, Result{Name: ch.name, Err: err})
		ready = ready && err == nil
	}
	return results, ready
}

// Config configures the endpoints.
type Config struct {
	// Checks are the readiness checks behind /readyz; nil means none
	// (never ready).
	Checks *Checks
	// Metrics is served on /metrics; nil leaves /metrics unserved (404).
	Metrics prometheus.Gatherer
	// CheckTimeout bounds one /readyz evaluation; 0 means DefaultCheckTimeout.
	CheckTimeout time.Duration
	// Logger; nil means slog.Default().
	Logger *slog.Logger
	// Profiling serves Go's runtime profiles under /debug/pprof/. Off by
	// default: a CPU profile costs the node CPU, and a heap profile shows
	// the agent's internals to whoever reaches the port.
	Profiling bool
}

// Handler returns the HTTP handler for the endpoints.
func Handler(cfg Config) http.Handler {
	if cfg.CheckTimeout <= 0 {
		cfg.CheckTimeout = DefaultCheckTimeout
	}
	if cfg.Checks == nil {
		cfg.Checks = &Checks{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	mux := http.NewServeMux()
	if cfg.Profiling {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), cfg.CheckTimeout)
		defer cancel()
		results, ready := cfg.Checks.Run(ctx)
		var b strings.Builder
		for _, res := range results {
			if res.Err == nil {
				fmt.Fprintf(&b, "[+]%s ok\n", res.Name)
			} else {
				fmt.Fprintf(&b, "[-]%s: %v\n", res.Name, res.Err)
			}
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		switch {
		case ready:
			w.WriteHeader(http.StatusOK)
			b.WriteString("ready\n")
		case len(results) == 0:
			w.WriteHeader(http.StatusServiceUnavailable)
			b.WriteString("not ready: no readiness checks registered yet\n")
		default:
			w.WriteHeader(http.StatusServiceUnavailable)
			b.WriteString("not ready\n")
		}
		_, _ = w.Write([]byte(b.String()))
	})
	if cfg.Metrics != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Metrics, promhttp.HandlerOpts{
			ErrorLog:      slog.NewLogLogger(cfg.Logger.Handler(), slog.LevelError),
			ErrorHandling: promhttp.ContinueOnError,
		}))
	}
	return mux
}

// Serve binds addr ("127.0.0.1:10256", flannel's -healthz-ip:-healthz-port)
// and serves the endpoints until ctx is done, then shuts down gracefully.
// It returns nil after a shutdown caused by ctx, or the error that stopped
// the server.
func Serve(ctx context.Context, addr string, cfg Config) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("health server: listen on %s: %w", addr, err)
	}
	return ServeListener(ctx, ln, cfg)
}

// ServeListener is Serve on a listener the caller made; it closes ln.
func ServeListener(ctx context.Context, ln net.Listener, cfg Config) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	srv := &http.Server{
		Handler:           Handler(cfg),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info("health server listening", "addr", ln.Addr().String())

	select {
	case err := <-served:
		return fmt.Errorf("health server on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), DefaultShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if serr := <-served; serr != nil && !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	if err != nil {
		return fmt.Errorf("health server on %s: shut down: %w", ln.Addr(), err)
	}
	return nil
}
