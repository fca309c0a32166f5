package lab

// The external store: with --store cluster the lab runs a real 3-member
// etcd cluster (Debian's etcd-server, /usr/bin/etcd) instead of the
// embedded `loom store`, the way production runs, with TLS everywhere and
// client certificates required:
//
//	  loom-a-rt   br0 198.18.0.1/24
//	        |            |            |
//	  loom-a-s1     loom-a-s2     loom-a-s3        one namespace per member
//	  eth0 .2       eth0 .3       eth0 .4          client :2379, peer :2380, both TLS
//
// The harness makes the certificates in Go (package certs) under
// <lab dir>/pki: a CA, one certificate per member (server and client use,
// for its client and peer listeners, with its address as IP SAN) and one
// client certificate that every agent, doctor and the harness itself use.
// Agents get all three endpoints and -etcd-cafile/-certfile/-keyfile.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/loomnet/loom/internal/lab/certs"
	"github.com/loomnet/loom/internal/netns"
)

const (
	// clusterSize is the number of members of --store cluster.
	clusterSize = 3
	// etcdPeerPort is the members' raft port.
	etcdPeerPort = 2380
	// etcdBinary is what Debian's etcd-server package installs.
	etcdBinary = "etcd"
)

// Member is one member of the lab's etcd cluster.
type Member struct {
	Name string       // s1
	NS   string       // loom-a-s1
	Addr netip.Prefix // 198.18.0.2/24 on br0
}

// ClientURL is where agents reach the member.
func (m Member) ClientURL() string {
	return "https://" + netip.AddrPortFrom(m.Addr.Addr(), storePort).String()
}

func (m Member) peerURL() string {
	return "https://" + netip.AddrPortFrom(m.Addr.Addr(), etcdPeerPort).String()
}

// memberAddr is member i's (1-based) address: 198.18.0.2, .3, .4, below
// the nodes' .11 and up.
func memberAddr(i int) netip.Prefix {
	a := underlayBase.As4()
	a[3] = byte(1 + i)
	return netip.PrefixFrom(netip.AddrFrom4(a), 24)
}

// pki is where the cluster's certificates live.
func (l *Lab) pki() string { return filepath.Join(l.dir(), "pki") }

// clientTLS is the certificate every client of the cluster presents.
func (l *Lab) clientTLS() (ca string, client certs.Pair) {
	return filepath.Join(l.pki(), "ca.pem"), certs.Pair{Cert: filepath.Join(l.pki(), "client.pem"), Key: filepath.Join(l.pki(), "client-key.pem")}
}

// buildCluster makes the members' namespaces on br0 and their certificates.
func (l *Lab) buildCluster() error {
	if _, err := exec.LookPath(etcdBinary); err != nil {
		return fmt.Errorf("--store cluster runs etcd, which is not installed: install the etcd-server package (make deps): %w", err)
	}
	if err := os.MkdirAll(l.pki(), 0o700); err != nil {
		return err
	}
	ca, err := certs.NewCA(l.pki(), "ca", "loom lab "+l.Opts.Name+" etcd CA")
	if err != nil {
		return err
	}
	if _, err := ca.Client(l.pki(), "client", "loom-agent"); err != nil {
		return err
	}
	r, err := openHandle(l.RouterNS())
	if err != nil {
		return err
	}
	defer r.Close()
	br, err := r.LinkByName("br0")
	if err != nil {
		return fmt.Errorf("find br0: %w", err)
	}
	l.Members = nil
	for i := 1; i <= clusterSize; i++ {
		m := Member{Name: "s" + strconv.Itoa(i), NS: l.ns("s" + strconv.Itoa(i)), Addr: memberAddr(i)}
		if _, err := ca.Server(l.pki(), m.Name, "etcd "+m.Name, m.Addr.Addr()); err != nil {
			return err
		}
		if err := netns.Create(m.NS); err != nil {
			return err
		}
		if err := r.veth(m.Name, "eth0", m.NS, br.Attrs().Index, nodeMAC(m.Addr.Addr())); err != nil {
			return err
		}
		if err := r.up(m.Name); err != nil {
			return err
		}
		h, err := openHandle(m.NS)
		if err != nil {
			return err
		}
		err = errors.Join(h.addAddr("eth0", m.Addr), h.up("eth0"))
		if err == nil {
			err = h.defaultRoute("eth0", bridgeAddr(0).Addr())
		}
		h.Close()
		if err != nil {
			return err
		}
		l.Members = append(l.Members, m)
	}
	return nil
}

// Member returns the cluster member named s1, s2 or s3.
func (l *Lab) Member(name string) (Member, error) {
	for _, m := range l.Members {
		if m.Name == name {
			return m, nil
		}
	}
	return Member{}, fmt.Errorf("lab %s has no store member %q (members exist with --store cluster: s1..s%d)", l.Opts.Name, name, clusterSize)
}

// StartMember starts member name's etcd. A member that has its data
// directory rejoins the cluster; --initial-cluster only matters the first
// time.
func (l *Lab) StartMember(name string) error {
	m, err := l.Member(name)
	if err != nil {
		return err
	}
	var peers []string
	for _, o := range l.Members {
		peers = append(peers, o.Name+"="+o.peerURL())
	}
	ca := filepath.Join(l.pki(), "ca.pem")
	cert, key := filepath.Join(l.pki(), m.Name+".pem"), filepath.Join(l.pki(), m.Name+"-key.pem")
	args := []string{
		"--name", m.Name,
		"--data-dir", filepath.Join(l.dir(), "store-"+m.Name),
		"--listen-client-urls", m.ClientURL(),
		"--advertise-client-urls", m.ClientURL(),
		"--listen-peer-urls", m.peerURL(),
		"--initial-advertise-peer-urls", m.peerURL(),
		"--initial-cluster", strings.Join(peers, ","),
		"--initial-cluster-token", "loom-lab-" + l.Opts.Name,
		"--initial-cluster-state", "new",
		"--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
		"--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca, "--peer-client-cert-auth",
		"--logger", "zap", "--log-outputs", "stderr",
	}
	bin, err := exec.LookPath(etcdBinary)
	if err != nil {
		return fmt.Errorf("start etcd member %s: %w", name, err)
	}
	p, err := startIn(m.NS, filepath.Join(l.dir(), "store-"+m.Name+".log"), bin, args...)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(l.dir(), "store-"+m.Name+".pid"), []byte(strconv.Itoa(p.Pid)), 0o644)
}

// StopMember sends sig to member name's etcd and waits until it is gone.
func (l *Lab) StopMember(name string, sig syscall.Signal) error {
	m, err := l.Member(name)
	if err != nil {
		return err
	}
	return stopIn(m.NS, "etcd", "etcd member "+name, sig)
}

// MemberAlive reports whether member name's etcd is running.
func (l *Lab) MemberAlive(name string) bool { return l.recordedAlive("store-" + name) }

// Leader returns the name of the cluster's current leader, asking every
// member that answers.
func (l *Lab) Leader(ctx context.Context) (string, error) {
	cli, err := l.etcd()
	if err != nil {
		return "", err
	}
	defer cli.Close()
	var errs []error
	for _, m := range l.Members {
		if !l.MemberAlive(m.Name) {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		st, err := cli.Status(sctx, m.ClientURL())
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", m.Name, err))
			continue
		}
		if st.Leader == 0 {
			continue
		}
		ms, err := cli.MemberList(ctx)
		if err != nil {
			return "", err
		}
		for _, mm := range ms.Members {
			if mm.ID == st.Leader {
				return mm.Name, nil
			}
		}
	}
	return "", fmt.Errorf("no member knows a leader: %w", errors.Join(errs...))
}

// seedConfig writes the network config to the cluster unless it is there.
func (l *Lab) seedConfig(ctx context.Context) error {
	data, err := os.ReadFile(filepath.Join(l.dir(), "net-conf.json"))
	if err != nil {
		return err
	}
	cli, err := l.etcd()
	if err != nil {
		return err
	}
	defer cli.Close()
	key := registryPrefix + "/config"
	_, err = cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).Then(clientv3.OpPut(key, string(data))).Commit()
	if err != nil {
		return fmt.Errorf("write the network config to the etcd cluster: %w", err)
	}
	return nil
}

// waitCluster waits until the cluster serves writes (it has a leader) and
// holds the network config.
func (l *Lab) waitCluster(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var last error
	for {
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		last = l.seedConfig(wctx)
		wcancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcd cluster did not come up: %w; see %s", last, filepath.Join(l.dir(), "store-s1.log"))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// etcdConfig is a client configuration for the lab's store, dialling from
// the router's namespace.
func (l *Lab) etcdConfig() (clientv3.Config, error) {
	cfg := clientv3.Config{
		Endpoints:   l.StoreEndpoints(),
		DialTimeout: 5 * time.Second,
		DialOptions: grpcDialer(netns.Dialer{NS: l.RouterNS()}),
		// The client logs every retried request; callers get the error.
		Logger: zap.NewNop(),
	}
	if l.Opts.Store == "cluster" {
		ca, client := l.clientTLS()
		tlsCfg, err := (transport.TLSInfo{CertFile: client.Cert, KeyFile: client.Key, TrustedCAFile: ca}).ClientConfig()
		if err != nil {
			return clientv3.Config{}, fmt.Errorf("client TLS of the lab's etcd cluster: %w", err)
		}
		cfg.TLS = tlsCfg
	}
	return cfg, nil
}

// stopIn sends sig to every process running `what` (a loom subcommand,
// or "etcd") in namespace ns and waits for each to exit.
func stopIn(ns, what, desc string, sig syscall.Signal) error {
	pids, err := pidsIn([]string{ns})
	if err != nil {
		return err
	}
	for _, pid := range pids {
		if cmdline(pid) != what {
			continue
		}
		_ = syscall.Kill(pid, sig)
		if !waitGone(pid, 10*time.Second) {
			return fmt.Errorf("%s (pid %d) still running 10s after %v", desc, pid, sig)
		}
	}
	return nil
}
