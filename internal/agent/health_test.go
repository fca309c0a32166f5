package agent

// The health server runs while the node waits for its subnet, so a
// DaemonSet's liveness probe finds the agent alive instead of restarting
// it in a loop. Kubernetes mode, where the wait is for a podCIDR, is
// tested with the real binary and control plane in internal/kubesubnet
// (TestAgentProcess); here the same code path in etcd mode, where the
// wait is for the network config. Without root: the agents never get past
// the wait, so they touch no kernel state.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/options"
	"github.com/loomnet/loom/internal/storeserver"
)

// freePort returns a port of 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// runAgent runs the agent with args until the test ends, and returns the
// base URL of its health server and a channel with Run's result.
func runAgent(t *testing.T, args ...string) (string, <-chan error) {
	t.Helper()
	port := freePort(t)
	args = append(args, "-node-name", "n1", "-healthz-ip", "127.0.0.1", "-healthz-port", fmt.Sprint(port),
		"-subnet-file", t.TempDir()+"/subnet.env", "-state-dir", t.TempDir())
	opts, err := options.Parse(args, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, opts, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run after its context ended: %v, want nil", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Run did not return within 15 s of its context ending")
		}
	})
	return fmt.Sprintf("http://127.0.0.1:%d", port), done
}

func get(url string) (int, string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// waitFor polls the endpoint until ok accepts its answer.
func waitFor(t *testing.T, url string, done <-chan error, ok func(code int, body string) bool) (int, string) {
	t.Helper()
	var (
		code int
		body string
		err  error
	)
	for end := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		select {
		case err := <-done:
			t.Fatalf("agent stopped: %v", err)
		default:
		}
		if code, body, err = get(url); err == nil && ok(code, body) {
			return code, body
		}
		if time.Now().After(end) {
			t.Fatalf("GET %s: %d %q %v", url, code, body, err)
		}
	}
}

func TestHealthWhileWaiting(t *testing.T) {
	store, err := storeserver.Start(context.Background(), storeserver.Config{Listen: "http://127.0.0.1:0", DataDir: t.TempDir(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	unreachable := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	for _, tc := range []struct {
		name     string
		endpoint string
		reason   string // in /readyz while waiting
	}{
		{name: "no network config in the store", endpoint: store.ClientURL(),
			reason: "[-]lease: waiting for the network config (etcd at " + store.ClientURL() + "): network config /coreos.com/network/config is not in etcd: write it with etcdctl put"},
		{name: "store unreachable", endpoint: unreachable,
			reason: "[-]lease: waiting for the network config (etcd at " + unreachable + "): read network config /coreos.com/network/config from etcd: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, done := runAgent(t, "-etcd-endpoints", tc.endpoint, "-etcd-dial-timeout", "1s", "-etcd-request-timeout", "1s")
			// Liveness: the process is alive and working.
			waitFor(t, base+"/healthz", done, func(code int, _ string) bool { return code == http.StatusOK })
			// Readiness: not ready, and why.
			_, body := waitFor(t, base+"/readyz", done, func(code int, body string) bool {
				return code == http.StatusServiceUnavailable && strings.Contains(body, tc.reason)
			})
			for _, want := range []string{"[-]subnet.env: not written yet", "[-]datapath: not set up yet", "not ready"} {
				if !strings.Contains(body, want) {
					t.Errorf("/readyz lacks %q:\n%s", want, body)
				}
			}
			waitFor(t, base+"/metrics", done, func(code int, body string) bool {
				return code == http.StatusOK && strings.Contains(body, "\nloom_lease_held 0\n") && strings.Contains(body, "\nloom_peers 0\n")
			})
		})
	}
}

// A health port in use is an error at start, not after the wait.
func TestHealthPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	opts, err := options.Parse([]string{"-node-name", "n1", "-healthz-port", fmt.Sprint(port), "-etcd-endpoints", "http://127.0.0.1:1"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = Run(ctx, opts, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("127.0.0.1:%d", port)) || !strings.Contains(err.Error(), "-healthz-port") {
		t.Fatalf("Run = %v, want an error naming the address and -healthz-port", err)
	}
	if ctx.Err() != nil {
		t.Fatal("Run waited for the store before binding the health port")
	}
}

// -profiling reaches the health server: the heap profile an operator takes
// of a running agent, and nothing of the kind without the flag.
func TestProfilingFlag(t *testing.T) {
	unreachable := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	common := []string{"-etcd-endpoints", unreachable, "-etcd-dial-timeout", "1s", "-etcd-request-timeout", "1s"}
	base, done := runAgent(t, append(common, "-profiling")...)
	waitFor(t, base+"/debug/pprof/heap", done, func(code int, body string) bool {
		return code == http.StatusOK && strings.HasPrefix(body, "\x1f\x8b")
	})
	base, done = runAgent(t, common...)
	waitFor(t, base+"/healthz", done, func(code int, _ string) bool { return code == http.StatusOK })
	if code, _, err := get(base + "/debug/pprof/heap"); err != nil || code != http.StatusNotFound {
		t.Errorf("GET /debug/pprof/heap without -profiling: %d %v, want 404", code, err)
	}
}
