// Package storeserver is `loom store`: a real etcd server embedded in loom,
// the single-machine default datastore. Agents and flanneld talk to it with
// the ordinary etcd v3 client; nothing about it is loom-specific except that
// it can seed the network config on first start.
//
// It is a one-member cluster. The member still needs a peer URL (raft
// addresses members by it even when there is only one); by default it binds
// port 0 on loopback, so no fixed port is taken and no address outside the
// machine is opened.
package storeserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"go.uber.org/zap/zapcore"

	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/zapslog"
)

// Defaults, matching flanneld's -etcd-endpoints and -etcd-prefix.
const (
	DefaultListen = "http://127.0.0.1:2379"
	DefaultPrefix = "/coreos.com/network"
	DefaultName   = "loom"

	// defaultPeerListen binds a free loopback port: a one-member cluster
	// never dials its own peer URL.
	defaultPeerListen = "http://127.0.0.1:0"

	// startTimeout bounds the wait for the member to elect itself and serve.
	// It is seconds on a fresh data dir; a long WAL replay can take longer.
	startTimeout = time.Minute

	// compactionRetention keeps an hour of history. Without compaction the
	// store grows with every write forever; with it, an agent's watch that
	// falls more than an hour behind is told so (ErrCompacted) and re-lists.
	compactionRetention = "1h"
)

// Config says where the store listens and what it holds.
type Config struct {
	// Listen is the client URL, e.g. http://127.0.0.1:2379 (the default).
	// Port 0 picks a free port; ClientURL reports it.
	Listen string
	// PeerListen is the raft peer URL; default a free loopback port.
	PeerListen string
	// DataDir holds the WAL and the database. Required.
	DataDir string
	// Name is the member name; default "loom".
	Name string
	// NetworkConfig, when set, is a net-conf.json that is validated and
	// written to <Prefix>/config unless that key already exists.
	NetworkConfig []byte
	// Prefix is the registry prefix; default /coreos.com/network.
	Prefix string
	// Logger receives etcd's warnings and errors; default slog.Default().
	Logger *slog.Logger

	// CertFile and KeyFile, when set, make the client listener serve TLS
	// (Listen must then be an https URL). ClientCAFile, when set, makes it
	// require a client certificate signed by that CA.
	CertFile, KeyFile string
	ClientCAFile      string
}

// Server is a running store.
type Server struct {
	etcd      *embed.Etcd
	clientURL string
	log       *slog.Logger
	// closing is set when Close starts: etcd then logs every listener it
	// closes as a failure, which is not news.
	closing atomic.Bool
}

// noise are etcd warnings that do not apply to loom's store: it serves
// gRPC and HTTP on one port on purpose, and runs without etcd auth.
var noise = map[string]bool{
	"Running http and grpc server on single port. This is not recommended for production.": true,
	"simple token is not cryptographically signed":                                         true,
}

// demote picks the etcd log entries that are logged at debug level.
func (s *Server) demote(e zapcore.Entry) bool { return s.closing.Load() || noise[e.Message] }

// Run starts the store and serves until ctx is done, then stops it cleanly.
// It returns nil after a requested stop and an error if the store failed to
// start or died.
func Run(ctx context.Context, cfg Config) error {
	s, err := Start(ctx, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	select {
	case <-ctx.Done():
		return nil
	case err := <-s.Err():
		return fmt.Errorf("etcd store at %s stopped: %w", s.ClientURL(), err)
	}
}

// Start starts the store and returns once it serves clients and, when
// cfg.NetworkConfig is set, the config is in place. ctx bounds the start
// only; the server runs until Close.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	cfg = withDefaults(cfg)
	if cfg.DataDir == "" {
		return nil, errors.New("start etcd store: no data directory given")
	}
	// Validate before starting: a bad config should fail in milliseconds,
	// and it must never reach the store.
	if len(cfg.NetworkConfig) > 0 {
		if _, err := netconf.Parse(cfg.NetworkConfig); err != nil {
			return nil, fmt.Errorf("network config: %w", err)
		}
	}
	// etcd wants its data private; creating the directory here gets the
	// mode right for a fresh store instead of warning about it later.
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("start etcd store: %w", err)
	}
	s := &Server{log: cfg.Logger}
	ec, err := embedConfig(cfg, s.demote)
	if err != nil {
		return nil, err
	}
	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("start etcd store in %s: %w", cfg.DataDir, err)
	}
	s.etcd, s.clientURL = e, boundURL(ec.ListenClientUrls[0], e)

	timer := time.NewTimer(startTimeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		s.Close()
		return nil, fmt.Errorf("start etcd store in %s: %w", cfg.DataDir, err)
	case <-timer.C:
		s.Close()
		return nil, fmt.Errorf("start etcd store in %s: not ready after %v", cfg.DataDir, startTimeout)
	case <-ctx.Done():
		s.Close()
		return nil, fmt.Errorf("start etcd store in %s: %w", cfg.DataDir, ctx.Err())
	}

	if len(cfg.NetworkConfig) > 0 {
		if err := s.seedConfig(ctx, cfg.Prefix+"/config", cfg.NetworkConfig); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// ClientURL is the URL clients reach the store at, with the real port when
// Listen asked for port 0.
func (s *Server) ClientURL() string { return s.clientURL }

// Err delivers an error if the server fails while running.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

// Close stops the server: in-flight requests get a grace period, then the
// WAL is closed. Safe to call more than once.
func (s *Server) Close() {
	s.closing.Store(true)
	s.etcd.Close()
}

// seedConfig writes the network config in one transaction that puts the key
// only when it has never been written, so a restart with --network-config
// never overwrites a config an operator changed since.
func (s *Server) seedConfig(ctx context.Context, key string, data []byte) error {
	cli := v3client.New(s.etcd.Server)
	defer cli.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(data))).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return fmt.Errorf("write network config to %s: %w", key, err)
	}
	if resp.Succeeded {
		s.log.Info("wrote network config", "key", key)
		return nil
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 && !bytes.Equal(kvs[0].Value, data) {
		s.log.Warn("network config already in the store differs from --network-config; keeping the stored one",
			"key", key, "stored", string(kvs[0].Value))
	}
	return nil
}

func withDefaults(cfg Config) Config {
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.PeerListen == "" {
		cfg.PeerListen = defaultPeerListen
	}
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	cfg.Prefix = "/" + strings.Trim(cfg.Prefix, "/")
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg
}

func embedConfig(cfg Config, demote func(zapcore.Entry) bool) (*embed.Config, error) {
	client, err := url.Parse(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("store listen URL %q: %w", cfg.Listen, err)
	}
	peer, err := url.Parse(cfg.PeerListen)
	if err != nil {
		return nil, fmt.Errorf("store peer URL %q: %w", cfg.PeerListen, err)
	}
	ec := embed.NewConfig()
	ec.Name = cfg.Name
	ec.Dir = cfg.DataDir
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("store TLS: give both the certificate and its key")
	}
	if cfg.ClientCAFile != "" && cfg.CertFile == "" {
		return nil, errors.New("store TLS: client certificate authentication needs a server certificate and key")
	}
	if tls := cfg.CertFile != ""; tls != (client.Scheme == "https") {
		return nil, fmt.Errorf("store listen URL %q: use https:// with a certificate and http:// without one", cfg.Listen)
	}
	ec.ClientTLSInfo = transport.TLSInfo{CertFile: cfg.CertFile, KeyFile: cfg.KeyFile, TrustedCAFile: cfg.ClientCAFile, ClientCertAuth: cfg.ClientCAFile != ""}
	ec.ClientAutoTLS = false
	ec.ListenClientUrls = []url.URL{*client}
	ec.AdvertiseClientUrls = []url.URL{*client}
	ec.ListenPeerUrls = []url.URL{*peer}
	ec.AdvertisePeerUrls = []url.URL{*peer}
	ec.InitialCluster = ec.InitialClusterFromName(cfg.Name)
	ec.AutoCompactionMode = embed.CompactorModePeriodic
	ec.AutoCompactionRetention = compactionRetention
	// The HTTP/JSON gateway is not part of flannel's contract; one less
	// listener on the client port.
	ec.EnableGRPCGateway = false
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zapslog.New(cfg.Logger.With("component", "etcd"), zapcore.WarnLevel, demote))
	return ec, nil
}

// boundURL is u with the port the listener really got, for Listen URLs with
// port 0.
func boundURL(u url.URL, e *embed.Etcd) string {
	if len(e.Clients) > 0 {
		u.Host = e.Clients[0].Addr().String()
	}
	return u.String()
}
