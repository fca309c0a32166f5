// Package registry is the etcd v3 subnet registry: the node leases of a loom
// (or flannel) cluster, read and written with flannel's keys and values.
//
//	<prefix>/config                      the network config (net-conf.json)
//	<prefix>/subnets/10.244.1.0-24       a lease: attributes JSON, attached to an etcd lease
//	<prefix>/subnets/10.244.9.0-24       a reservation: the same, with no etcd lease
//
// What it does differently from flannel's etcd subnet manager, and why:
//
//   - A claim is one compare-and-set transaction on the key's CreateRevision,
//     so two nodes never hold one subnet, however many start at once.
//   - A node is identified by its name (Attrs.NodeName), not its public IP:
//     a restarted agent takes over its own lease, and a second node on the
//     same public IP is refused with an error that names both (a lease
//     written by flanneld has no name and is matched by IP, as flannel does).
//   - The lease is held by a session (Held) renewed by etcd keep-alive, never
//     by rewriting the key, and the session says when it is lost (Done).
//   - Reservations, keys without an etcd lease, are honoured: never handed to
//     another node (flannel's issue #1329).
//   - Listing costs one range request whatever the number of leases (flannel
//     issues one per lease), and every unary request carries a timeout, so a
//     stale store address cannot hang the agent.
package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/reach"
	"github.com/loomnet/loom/internal/zapslog"
)

// Defaults for Config's zero values.
const (
	DefaultPrefix         = "/coreos.com/network"
	DefaultDialTimeout    = 5 * time.Second
	DefaultRequestTimeout = 5 * time.Second
	DefaultTTL            = 24 * time.Hour // flannel's subnet lease TTL
	DefaultMonitorEvery   = 5 * time.Second

	// probeEvery is how often a watch reads the store directly. A watch
	// resumed against a store that lost its data (or was restored from an
	// older backup) waits for a revision the store has not reached and
	// hears nothing; etcd sends no progress to such a watch, and a 24 h
	// lease is renewed only every 8 h. A read that shows a revision below
	// the watch's, or a held key gone, is how loom finds out within this
	// interval.
	probeEvery = 30 * time.Second

	// keepAliveTime and keepAliveTimeout are the gRPC pings that find a dead
	// TCP connection in seconds rather than after minutes of retransmission.
	// etcd refuses pings more often than every 5 s (GRPCKeepAliveMinTime).
	keepAliveTime    = 10 * time.Second
	keepAliveTimeout = 5 * time.Second

	// reconnectMaxDelay caps the wait between two attempts to reconnect.
	reconnectMaxDelay = 5 * time.Second
)

// Config says how to reach the store.
type Config struct {
	Endpoints []string // e.g. http://127.0.0.1:2379
	Prefix    string   // default /coreos.com/network

	CertFile, KeyFile, CAFile string // client TLS; any of them set turns TLS on
	Username, Password        string

	DialTimeout    time.Duration // default 5s
	RequestTimeout time.Duration // bound on every unary request; default 5s
	TTL            time.Duration // etcd lease TTL of a node's subnet; default 24h

	Logger *slog.Logger // default slog.Default()
	// Metrics, when set, receives the registry's collectors (store
	// reachability, lease expiry, re-acquisitions, skipped leases) and
	// turns on the reachability monitor, which reads the store every
	// MonitorEvery (default 5s) and logs when it is lost and back.
	Metrics      prometheus.Registerer
	MonitorEvery time.Duration
}

// Registry is a connection to the subnet registry. Its methods are safe for
// concurrent use.
type Registry struct {
	cli *clientv3.Client
	// kv is cli.KV; a field of its own so a test can count requests.
	kv  clientv3.KV
	cfg Config
	log *slog.Logger
	// probeEvery and removeDelay are the constants of those names; fields
	// so a test need not wait for them.
	probeEvery   time.Duration
	removeDelay  time.Duration
	monitorEvery time.Duration // Config.MonitorEvery

	tls     *tls.Config // nil without TLS; for explaining handshake failures
	metrics *metrics
	reach   reach.State
	stop    context.CancelFunc // stops the monitor
	stopped chan struct{}      // closed when the monitor has returned

	heldMu sync.Mutex // guards held
	held   *Held      // the lease Keep holds now, for metrics

	configKey string // <prefix>/config
	subnets   string // <prefix>/subnets/
}

// New connects to the store. The connection is made lazily and re-made on
// failure by the etcd client, so New succeeds while the store is down unless
// a username is set (the auth token is fetched at once, within DialTimeout).
// ctx bounds New itself; the client lives until Close.
func New(ctx context.Context, cfg Config) (*Registry, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("connect to etcd: no endpoints given")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	cfg.Prefix = "/" + strings.Trim(cfg.Prefix, "/")
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = DefaultRequestTimeout
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.MonitorEvery <= 0 {
		cfg.MonitorEvery = DefaultMonitorEvery
	}
	if cfg.TTL < 2*time.Second {
		return nil, fmt.Errorf("lease TTL %v is shorter than etcd's minimum of 2s", cfg.TTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	var tlsConfig *tls.Config
	if cfg.CertFile != "" || cfg.KeyFile != "" || cfg.CAFile != "" {
		info := transport.TLSInfo{CertFile: cfg.CertFile, KeyFile: cfg.KeyFile, TrustedCAFile: cfg.CAFile}
		var err error
		if tlsConfig, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("connect to etcd: load TLS files (cert %q, key %q, CA %q): %w", cfg.CertFile, cfg.KeyFile, cfg.CAFile, err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("connect to etcd at %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    keepAliveTime,
		DialKeepAliveTimeout: keepAliveTimeout,
		PermitWithoutStream:  true,
		// gRPC's own reconnect backoff grows to two minutes, so after a
		// long partition the agent would find the store again only that
		// long after it is back. Five seconds, jittered, is cheap even
		// for a large fleet.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: reconnectMaxDelay},
			MinConnectTimeout: cfg.DialTimeout,
		})},
		TLS:      tlsConfig,
		Username: cfg.Username,
		Password: cfg.Password,
		// Values of ctx pass on, its cancellation does not: the client must
		// outlive a start-up context.
		Context: context.WithoutCancel(ctx),
		// The client logs every retried request at warn; loom reports the
		// failures that matter itself.
		Logger: zapslog.New(cfg.Logger.With("component", "etcd-client"), zapcore.ErrorLevel, nil),
	})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd at %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	r := &Registry{
		cli:          cli,
		kv:           cli.KV,
		cfg:          cfg,
		log:          cfg.Logger,
		probeEvery:   probeEvery,
		monitorEvery: cfg.MonitorEvery,
		removeDelay:  removeDelay,
		tls:          tlsConfig,
		configKey:    cfg.Prefix + "/config",
		subnets:      cfg.Prefix + "/subnets/",
		stopped:      make(chan struct{}),
	}
	r.metrics = r.newMetrics()
	if cfg.Metrics != nil {
		if err := r.metrics.register(cfg.Metrics); err != nil {
			cli.Close()
			return nil, err
		}
	}
	mctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	r.stop = stop
	go func() {
		defer close(r.stopped)
		if cfg.Metrics != nil {
			r.monitor(mctx)
		}
	}()
	return r, nil
}

// Close stops the reachability monitor and closes the connection. Held
// leases are not released: their etcd leases run out after the TTL unless
// an agent takes them over first. A Held still open when the Registry
// closes reports its lease lost.
func (r *Registry) Close() error {
	r.stop()
	<-r.stopped
	return r.cli.Close()
}

// SubnetKey is the etcd key of a subnet lease, e.g.
// /coreos.com/network/subnets/10.244.1.0-24.
func (r *Registry) SubnetKey(v4, v6 netip.Prefix) string { return r.subnets + lease.MakeKey(v4, v6) }

// storeRevision reads the store's current revision with the smallest
// linearizable request there is: a count of one key.
func (r *Registry) storeRevision(ctx context.Context) (int64, error) {
	rctx, cancel := r.bounded(ctx)
	defer cancel()
	resp, err := r.kv.Get(rctx, r.configKey, clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	return resp.Header.Revision, nil
}

// bounded gives one unary request its deadline.
func (r *Registry) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, r.cfg.RequestTimeout)
}

// NetworkConfig reads and validates <prefix>/config.
func (r *Registry) NetworkConfig(ctx context.Context) (netconf.Config, error) {
	rctx, cancel := r.bounded(ctx)
	defer cancel()
	resp, err := r.kv.Get(rctx, r.configKey)
	if err != nil {
		return netconf.Config{}, fmt.Errorf("read network config %s from etcd: %w", r.configKey, r.explain(ctx, err))
	}
	if len(resp.Kvs) == 0 {
		return netconf.Config{}, fmt.Errorf("network config %s is not in etcd: write it with "+
			`etcdctl put %s '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'`+
			" or start the store with loom store --network-config=FILE", r.configKey, r.configKey)
	}
	cfg, err := netconf.Parse(resp.Kvs[0].Value)
	if err != nil {
		return netconf.Config{}, fmt.Errorf("network config %s in etcd: %w", r.configKey, err)
	}
	return cfg, nil
}

// List returns every lease and reservation under <prefix>/subnets/ and the
// store revision they were read at (start a Watch from it). It is one range
// request. Keys or values that do not decode are logged and skipped: one bad
// entry written by hand must not stop every agent.
//
// Expiration of a live lease is an estimate, the listing time plus the
// registry's TTL: etcd reports lease TTLs only one lease per request, and
// holders renew by keep-alive, so the remaining TTL is never far below the
// full TTL while the holder lives. A reservation has the zero Expiration.
func (r *Registry) List(ctx context.Context) (leases []lease.Lease, revision int64, err error) {
	entries, revision, err := r.listing(ctx, true)
	if err != nil {
		return nil, 0, err
	}
	leases = make([]lease.Lease, len(entries))
	for i, e := range entries {
		leases[i] = e.Lease
	}
	return leases, revision, nil
}

// entry is a listed lease with the etcd metadata that claims need.
type entry struct {
	lease.Lease
	create  int64 // CreateRevision: the older of two claims wins
	etcdID  int64 // etcd lease ID; 0 for a reservation
	hasName bool  // Attrs.NodeName set (a loom node, not flanneld)
}

func (r *Registry) list(ctx context.Context) ([]entry, int64, error) { return r.listing(ctx, false) }

// listing lists the registry; count says whether entries that do not
// decode are counted in loom_leases_skipped_total (listings for peers are,
// listings for a claim are not, so a claim does not count them again).
func (r *Registry) listing(ctx context.Context, count bool) ([]entry, int64, error) {
	rctx, cancel := r.bounded(ctx)
	defer cancel()
	resp, err := r.kv.Get(rctx, r.subnets, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("list subnet leases under %s: %w", r.subnets, err)
	}
	now := time.Now()
	entries := make([]entry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		e, err := r.decode(kv, now)
		if err != nil {
			r.log.Warn("skipping registry entry", "key", string(kv.Key), "err", err)
			if count {
				r.metrics.skipped.WithLabelValues(SkipUndecodable).Inc()
			}
			continue
		}
		entries = append(entries, e)
	}
	return entries, resp.Header.Revision, nil
}

// decode turns one key-value pair under <prefix>/subnets/ into an entry.
func (r *Registry) decode(kv *mvccpb.KeyValue, now time.Time) (entry, error) {
	v4, v6, err := r.parseKey(kv.Key)
	if err != nil {
		return entry{}, err
	}
	attrs, err := lease.UnmarshalAttrs(kv.Value)
	if err != nil {
		return entry{}, err
	}
	e := entry{
		Lease:   lease.Lease{Subnet: v4, IPv6Subnet: v6, Attrs: attrs, Revision: kv.ModRevision},
		create:  kv.CreateRevision,
		etcdID:  kv.Lease,
		hasName: attrs.NodeName != "",
	}
	if kv.Lease != 0 {
		e.Expiration = now.Add(r.cfg.TTL)
	}
	return e, nil
}

// parseKey accepts only a direct child of <prefix>/subnets/.
func (r *Registry) parseKey(key []byte) (v4, v6 netip.Prefix, err error) {
	name, ok := strings.CutPrefix(string(key), r.subnets)
	if !ok || strings.Contains(name, "/") {
		return v4, v6, fmt.Errorf("key %q is not a subnet key under %s", key, r.subnets)
	}
	return lease.ParseKey(name)
}

// explain adds the reason to a request that failed because no endpoint
// could be reached over TLS. The etcd client retries a failed handshake
// until the request's deadline and then reports only "context deadline
// exceeded"; a wrong -etcd-cafile, or a server certificate without the
// address the agent dials, then looks like a dead store. One handshake per
// endpoint, made only after a failure and only with TLS on, names it.
func (r *Registry) explain(ctx context.Context, err error) error {
	if r.tls == nil || err == nil {
		return err
	}
	var reasons []string
	for _, ep := range r.cfg.Endpoints {
		u, perr := url.Parse(ep)
		if perr != nil || u.Host == "" {
			continue
		}
		herr := r.handshake(ctx, u.Host)
		var verr *tls.CertificateVerificationError
		var rerr x509.HostnameError
		switch {
		case herr == nil:
			continue
		case errors.As(herr, &verr), errors.As(herr, &rerr):
			reasons = append(reasons, fmt.Sprintf("%s: the server's certificate is not trusted (%v): check -etcd-cafile, and that the certificate names %s", ep, herr, u.Hostname()))
		case strings.Contains(herr.Error(), "certificate"), strings.Contains(herr.Error(), "tls:"):
			reasons = append(reasons, fmt.Sprintf("%s: TLS handshake failed (%v): check -etcd-certfile and -etcd-keyfile", ep, herr))
		}
	}
	if len(reasons) == 0 {
		return err
	}
	return fmt.Errorf("%w; %s", err, strings.Join(reasons, "; "))
}

// handshake makes one TLS handshake with host:port, as the etcd client
// would: the same certificates, and the dialled address as server name.
func (r *Registry) handshake(ctx context.Context, hostport string) error {
	ctx, cancel := context.WithTimeout(ctx, min(r.cfg.DialTimeout, 2*time.Second))
	defer cancel()
	cfg := r.tls.Clone()
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(hostport)
		if err != nil {
			host = hostport
		}
		cfg.ServerName = host
	}
	cfg.NextProtos = []string{"h2"}
	d := tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", hostport)
	if err != nil {
		return err
	}
	return c.Close()
}
