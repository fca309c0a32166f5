package doctor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/loomnet/loom/internal/registry"
)

// gatherStore reads the registry: the config and every lease, two range
// requests in parallel, each bounded by the timeout.
func gatherStore(ctx context.Context, cfg Config) StoreFacts {
	o := cfg.Opts
	s := StoreFacts{Endpoints: o.EtcdEndpoints, Prefix: o.EtcdPrefix}
	if o.KubeSubnetMgr {
		s.Err = errors.New("-kube-subnet-mgr: not an etcd registry")
		return s
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout+time.Second)
	defer cancel()
	start := time.Now()
	reg, err := registry.New(ctx, registry.Config{
		Endpoints:      o.EtcdEndpoints,
		Prefix:         o.EtcdPrefix,
		CertFile:       o.EtcdCertFile,
		KeyFile:        o.EtcdKeyFile,
		CAFile:         o.EtcdCAFile,
		Username:       o.EtcdUsername,
		Password:       o.EtcdPassword,
		DialTimeout:    cfg.Timeout,
		RequestTimeout: cfg.Timeout,
		Logger:         cfg.Logger,
	})
	if err != nil {
		s.Err = err
		return s
	}
	defer reg.Close()
	var wg sync.WaitGroup
	wg.Go(func() {
		c, err := reg.NetworkConfig(ctx)
		if err != nil {
			s.ConfigErr = err
			return
		}
		s.Config = &c
	})
	s.Leases, s.Revision, s.Err = reg.List(ctx)
	wg.Wait()
	s.Took = time.Since(start)
	if s.Err != nil {
		s.Dials = dialEndpoints(o.EtcdEndpoints, time.Second)
	}
	return s
}

// dialEndpoints connects to each endpoint's host:port, to tell a stopped
// store (refused) from an unreachable one (timeout) from a TLS or auth
// problem (connected).
func dialEndpoints(endpoints []string, timeout time.Duration) []string {
	out := make([]string, len(endpoints))
	var wg sync.WaitGroup
	for i, e := range endpoints {
		wg.Go(func() {
			u, err := url.Parse(e)
			if err != nil || u.Host == "" {
				out[i] = fmt.Sprintf("%s: not a URL", e)
				return
			}
			c, err := net.DialTimeout("tcp", u.Host, timeout)
			if err != nil {
				out[i] = fmt.Sprintf("TCP connect to %s: %v", u.Host, inner(err))
				return
			}
			c.Close()
			out[i] = fmt.Sprintf("TCP connect to %s: connected (the port is open: check TLS and auth flags)", u.Host)
		})
	}
	wg.Wait()
	return out
}

// gatherReady reads the agent's /readyz.
func gatherReady(ctx context.Context, cfg Config) ReadyFacts {
	o := cfg.Opts
	if o.HealthzPort == 0 {
		return ReadyFacts{}
	}
	ip := o.HealthzIP
	if !ip.IsValid() || ip.IsUnspecified() {
		ip = netip.MustParseAddr("127.0.0.1")
	}
	r := ReadyFacts{URL: fmt.Sprintf("http://%s/readyz", netip.AddrPortFrom(ip, uint16(o.HealthzPort)))}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.URL, nil)
	if err != nil {
		r.Err = err
		return r
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	resp, err := client.Do(req)
	if err != nil {
		r.Err = inner(err)
		return r
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 8192))
	r.Status, r.Body = resp.StatusCode, string(body)
	return r
}

// probePeers connects once to every peer's public IP, in parallel.
func probePeers(ctx context.Context, cfg Config, f *Facts) []PeerProbe {
	if !f.Store.Listed() {
		return nil
	}
	port := cfg.Opts.HealthzPort
	if port == 0 {
		port = defaultPeerPort
	}
	var probes []PeerProbe
	for _, l := range f.peerLeases() {
		ip := l.Attrs.PublicIP
		if l.Reserved() || !ip.IsValid() || ip == f.Underlay.PublicIP {
			continue
		}
		probes = append(probes, PeerProbe{Lease: l, Target: netip.AddrPortFrom(ip, uint16(port))})
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i := range probes {
		p := &probes[i]
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			start := time.Now()
			d := net.Dialer{Timeout: min(cfg.Timeout, time.Second)} // a live peer on the underlay answers in milliseconds
			c, err := d.DialContext(ctx, "tcp", p.Target.String())
			p.Took = time.Since(start)
			switch {
			case err == nil:
				c.Close()
				p.Alive, p.Answer = true, "connected"
			case errors.Is(err, syscall.ECONNREFUSED):
				p.Alive, p.Answer = true, "refused (the host answers)"
			case errors.Is(err, syscall.EHOSTUNREACH):
				p.Answer = "no route to host (no ARP answer)"
			case errors.Is(err, syscall.ENETUNREACH):
				p.Answer = "network unreachable"
			case errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded):
				p.Answer = "timeout"
			default:
				p.Answer = err.Error()
			}
		})
	}
	wg.Wait()
	return probes
}

// gatherFirewall dumps nftables and iptables.
func gatherFirewall(ctx context.Context, cfg Config) FirewallFacts {
	var fw FirewallFacts
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout+3*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		js, err := cfg.Run(ctx, "nft", "-j", "list", "ruleset")
		if err != nil {
			fw.NFTErr = err
			return
		}
		rs, err := ParseNFTJSON(js)
		if err != nil {
			fw.NFTErr = err
			return
		}
		if text, err := cfg.Run(ctx, "nft", "-a", "list", "ruleset"); err == nil {
			rs.AddText(string(text))
		}
		fw.NFT = rs
	})
	wg.Go(func() {
		out, err := cfg.Run(ctx, "iptables-save")
		if err != nil {
			fw.IPTErr = err
			return
		}
		fw.IPT, fw.IPTErr = ParseIPTablesSave(string(out))
		fw.IPTSaver = "iptables-save"
	})
	wg.Wait()
	return fw
}

// runProgram runs a read-only dump program, found in PATH or in the sbin
// directories a root shell would have.
func runProgram(ctx context.Context, name string, args ...string) ([]byte, error) {
	path, err := exec.LookPath(name)
	if err != nil {
		for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
			if _, serr := os.Stat(filepath.Join(dir, name)); serr == nil {
				path, err = filepath.Join(dir, name), nil
				break
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s not found: %w", name, err)
	}
	cmd := exec.CommandContext(ctx, path, args...)
	var stderr limitedBuffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %v: %w: %s", name, args, err, stderr.String())
	}
	return out, nil
}

// limitedBuffer keeps the first 1 KiB written to it.
type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := 1024 - len(l.b); room > 0 {
		l.b = append(l.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string { return string(l.b) }

// inner drops one layer of wrapping (url.Error, net.OpError) that only
// repeats what the message around it says.
func inner(err error) error {
	if u := errors.Unwrap(err); u != nil {
		return u
	}
	return err
}
