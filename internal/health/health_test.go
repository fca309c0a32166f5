package health

// Network plan: servers bind 127.0.0.1:0 only.

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func TestReadyz(t *testing.T) {
	var routesReady atomic.Bool
	checks := &Checks{}
	h := Handler(Config{Checks: checks})

	code, body := get(t, h, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "no readiness checks") {
		t.Errorf("no checks: %d %q, want 503 naming the absence of checks", code, body)
	}

	checks.Add("routes", Ready(routesReady.Load, "peer routes not programmed yet"))
	checks.Add("subnet-env", func(context.Context) error { return nil })
	code, body = get(t, h, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "[-]routes: peer routes not programmed yet") ||
		!strings.Contains(body, "[+]subnet-env ok") {
		t.Errorf("one check failing: %d %q, want 503 listing the failing and the passing check", code, body)
	}

	routesReady.Store(true)
	code, body = get(t, h, "/readyz")
	if code != http.StatusOK || !strings.Contains(body, "[+]routes ok") {
		t.Errorf("all checks passing: %d %q, want 200", code, body)
	}

	code, _ = get(t, h, "/healthz")
	if code != http.StatusOK {
		t.Errorf("/healthz: %d, want 200", code)
	}
}

func TestReadyzCheckTimeout(t *testing.T) {
	checks := &Checks{}
	checks.Add("stuck", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() })
	h := Handler(Config{Checks: checks, CheckTimeout: 50 * time.Millisecond})
	code, body := get(t, h, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "[-]stuck: context deadline exceeded") {
		t.Errorf("stuck check: %d %q, want 503 with the deadline", code, body)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "loom_test_events_total", Help: "Test events."})
	reg.MustRegister(c)
	c.Add(3)

	code, body := get(t, Handler(Config{Metrics: reg}), "/metrics")
	if code != http.StatusOK || !strings.Contains(body, "loom_test_events_total 3") {
		t.Errorf("/metrics: %d %q, want 200 with the counter", code, body)
	}
	if code, _ := get(t, Handler(Config{}), "/metrics"); code != http.StatusNotFound {
		t.Errorf("/metrics without a registry: %d, want 404", code)
	}
}

func TestServe(t *testing.T) {
	before := runtime.NumGoroutine()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	checks := &Checks{}
	var ready atomic.Bool
	checks.Add("backend", Ready(ready.Load, "not yet"))
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGauge(prometheus.GaugeOpts{Name: "loom_test_gauge", Help: "Test gauge."}))

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeListener(ctx, ln, Config{Checks: checks, Metrics: reg}) }()

	client := &http.Client{Timeout: 5 * time.Second}
	fetch := func(path string) (int, string) {
		t.Helper()
		resp, err := client.Get("http://" + ln.Addr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(b)
	}
	if code, _ := fetch("/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz before ready: %d, want 503", code)
	}
	ready.Store(true)
	if code, _ := fetch("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after ready: %d, want 200", code)
	}
	if code, body := fetch("/metrics"); code != http.StatusOK || !strings.Contains(body, "loom_test_gauge 0") {
		t.Errorf("/metrics: %d %q", code, body)
	}
	client.CloseIdleConnections()

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("ServeListener after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeListener did not return after its context ended")
	}
	if _, err := client.Get("http://" + ln.Addr().String() + "/healthz"); err == nil {
		t.Error("server still answers after shutdown")
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines after shutdown, %d before", n, before)
	}
}

func TestServeBindErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = Serve(context.Background(), ln.Addr().String(), Config{}) // port taken
	var opErr *net.OpError
	if !errors.As(err, &opErr) || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Errorf("Serve on a taken port: %v, want a listen error naming the address", err)
	}

	// Binding 127.0.0.1:0 works, and a cancelled context stops it cleanly.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := Serve(ctx, "127.0.0.1:0", Config{}); err != nil {
		t.Errorf("Serve on 127.0.0.1:0 until its context ends: %v", err)
	}
}

// Profiles are served only when asked for: a heap profile is how an
// operator explains the agent's memory, and not something to expose by
// default.
func TestProfiling(t *testing.T) {
	for _, path := range []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/goroutine?debug=1"} {
		if code, _ := get(t, Handler(Config{}), path); code != http.StatusNotFound {
			t.Errorf("%s without Profiling: %d, want 404", path, code)
		}
	}
	h := Handler(Config{Profiling: true})
	code, body := get(t, h, "/debug/pprof/heap")
	if code != http.StatusOK || !strings.HasPrefix(body, "\x1f\x8b") {
		t.Errorf("/debug/pprof/heap with Profiling: %d, %d bytes, want 200 with a gzipped profile", code, len(body))
	}
	code, body = get(t, h, "/debug/pprof/goroutine?debug=1")
	if code != http.StatusOK || !strings.Contains(body, "TestProfiling") {
		t.Errorf("/debug/pprof/goroutine?debug=1 with Profiling: %d, want 200 naming this test's goroutine:\n%.300s", code, body)
	}
	if code, _ := get(t, h, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz with Profiling: %d, want 200", code)
	}
}
