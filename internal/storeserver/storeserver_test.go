package storeserver

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/netconf"
)

// Address plan: the store binds 127.0.0.1 only, on ports the kernel picks
// (port 0), for both the client and the peer listener.

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// tWriter sends log lines to t.Log, so they show only for failing tests.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func start(t *testing.T, dir string, netConf []byte) *Server {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{Listen: "http://127.0.0.1:0", DataDir: dir, NetworkConfig: netConf, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func client(t *testing.T, s *Server) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{s.ClientURL()}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func get(t *testing.T, cli *clientv3.Client, key string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return ""
	}
	return string(resp.Kvs[0].Value)
}

func TestStartServesOnLoopback(t *testing.T) {
	begin := time.Now()
	s := start(t, filepath.Join(t.TempDir(), "etcd"), nil)
	defer s.Close()
	if d := time.Since(begin); d > 10*time.Second {
		t.Errorf("start took %v", d)
	}
	if !strings.HasPrefix(s.ClientURL(), "http://127.0.0.1:") || strings.HasSuffix(s.ClientURL(), ":0") {
		t.Fatalf("ClientURL = %q, want the bound loopback port", s.ClientURL())
	}
	cli := client(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "/coreos.com/network/probe", "x"); err != nil {
		t.Fatal(err)
	}
	if got := get(t, cli, "/coreos.com/network/probe"); got != "x" {
		t.Fatalf("read back %q", got)
	}
	if get(t, cli, "/coreos.com/network/config") != "" {
		t.Fatal("a config was written without --network-config")
	}
}

// --network-config seeds <prefix>/config on first start and never
// overwrites it afterwards.
func TestNetworkConfigWrittenOnlyIfAbsent(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "etcd")
	first := []byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	s := start(t, dir, first)
	cli := client(t, s)
	if got := get(t, cli, "/coreos.com/network/config"); got != string(first) {
		t.Fatalf("config = %q, want %q", got, first)
	}
	// An operator edits the config...
	edited := `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "/coreos.com/network/config", edited); err != nil {
		t.Fatal(err)
	}
	cli.Close()
	s.Close()

	// ...and a restart with the original flag keeps the edit.
	s = start(t, dir, first)
	defer s.Close()
	if got := get(t, client(t, s), "/coreos.com/network/config"); got != edited {
		t.Fatalf("config after restart = %q, want the edited %q", got, edited)
	}
}

func TestNetworkConfigCustomPrefix(t *testing.T) {
	conf := []byte(`{"Network":"10.50.0.0/16"}`)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{Listen: "http://127.0.0.1:0", DataDir: filepath.Join(t.TempDir(), "etcd"), NetworkConfig: conf, Prefix: "/loom/net/", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := get(t, client(t, s), "/loom/net/config"); got != string(conf) {
		t.Fatalf("config = %q", got)
	}
}

func TestNetworkConfigInvalid(t *testing.T) {
	bad := []byte(`{"Network":"10.244.0.0/16","SubnetLen":33}`)
	_, want := netconf.Parse(bad)
	if want == nil {
		t.Fatal("netconf.Parse accepted the invalid config")
	}
	dir := filepath.Join(t.TempDir(), "etcd")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{Listen: "http://127.0.0.1:0", DataDir: dir, NetworkConfig: bad, Logger: testLogger(t)})
	if err == nil {
		s.Close()
		t.Fatal("Start accepted an invalid network config")
	}
	if !strings.Contains(err.Error(), want.Error()) {
		t.Fatalf("err = %v\nwant it to carry netconf's %v", err, want)
	}
}

func TestRunStopsOnCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		errc <- Run(ctx, Config{Listen: "http://127.0.0.1:0", DataDir: filepath.Join(t.TempDir(), "etcd"), Logger: testLogger(t)})
	}()
	time.Sleep(2 * time.Second) // let it start; Run must stop cleanly either way
	cancel()
	select {
	case err := <-errc:
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func TestStartNeedsDataDir(t *testing.T) {
	if _, err := Start(context.Background(), Config{Listen: "http://127.0.0.1:0"}); err == nil || !strings.Contains(err.Error(), "data directory") {
		t.Fatalf("err = %v", err)
	}
}

// TLS settings that cannot work are refused before etcd starts.
func TestTLSConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{name: "certificate on http", cfg: Config{Listen: "http://127.0.0.1:0", CertFile: "c.pem", KeyFile: "k.pem"}, want: "use https:// with a certificate"},
		{name: "https without certificate", cfg: Config{Listen: "https://127.0.0.1:0"}, want: "use https:// with a certificate and http:// without one"},
		{name: "certificate without key", cfg: Config{Listen: "https://127.0.0.1:0", CertFile: "c.pem"}, want: "give both the certificate and its key"},
		{name: "client CA without certificate", cfg: Config{Listen: "http://127.0.0.1:0", ClientCAFile: "ca.pem"}, want: "needs a server certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := embedConfig(withDefaults(tc.cfg), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("embedConfig: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
