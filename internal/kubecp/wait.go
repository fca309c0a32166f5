package kubecp

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

// Polling of readiness: often enough that a test does not wait for nothing,
// each request bounded so a black-holed address cannot hang a poll.
const (
	pollInterval   = 200 * time.Millisecond
	requestTimeout = 5 * time.Second
)

// WaitAPIServer polls the apiserver's /readyz (as AdminUser) until it
// answers ok or ctx is done. Start the controller manager after it: it
// gives up when the apiserver is not healthy within 10 s of its own start.
func (p *Plan) WaitAPIServer(ctx context.Context) error {
	c, err := p.httpClient()
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	return poll(ctx, "kube-apiserver "+p.URL+" ready", func(ctx context.Context) error {
		return get(ctx, c, p.URL+"/readyz", p.AdminToken)
	})
}

// Wait polls until the whole control plane works: the apiserver is ready,
// the controller manager's /healthz answers ok, and the "default"
// ServiceAccount of the "default" namespace exists (the controllers are at
// work, and Pods can be created: admission refuses Pods until it exists).
// Every connection goes through Config.DialContext, so the lab can wait,
// from the root namespace, for a control plane in its router namespace.
func (p *Plan) Wait(ctx context.Context) error {
	if err := p.WaitAPIServer(ctx); err != nil {
		return err
	}
	c, err := p.httpClient()
	if err != nil {
		return err
	}
	defer c.CloseIdleConnections()
	if err := poll(ctx, "kube-controller-manager "+p.ControllerManagerURL+" healthy", func(ctx context.Context) error {
		return get(ctx, c, p.ControllerManagerURL+"/healthz", p.AdminToken)
	}); err != nil {
		return err
	}
	return poll(ctx, "ServiceAccount default/default created by kube-controller-manager", func(ctx context.Context) error {
		return get(ctx, c, p.URL+"/api/v1/namespaces/default/serviceaccounts/default", p.AdminToken)
	})
}

// httpClient trusts only the cluster CA and dials through
// Config.DialContext.
func (p *Plan) httpClient() (*http.Client, error) {
	caPEM, err := os.ReadFile(p.CAFile)
	if err != nil {
		return nil, fmt.Errorf("read kubernetes CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("kubernetes CA %s: no certificate in it", p.CAFile)
	}
	dial := p.Config.DialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	return &http.Client{
		Timeout: requestTimeout,
		Transport: &http.Transport{
			DialContext:         dial,
			TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout: requestTimeout,
		},
	}, nil
}

// get succeeds when url answers 200.
func get(ctx context.Context, c *http.Client, url, token string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// poll calls check until it succeeds or ctx is done; the error then says
// what was awaited and how the last check failed.
func poll(ctx context.Context, what string, check func(context.Context) error) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	var last error
	for {
		err := check(ctx)
		if err == nil {
			return nil
		}
		// A try cut short by ctx only says that ctx ended; the one before
		// says why the wait failed.
		if last == nil || ctx.Err() == nil {
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w (last try: %w)", what, context.Cause(ctx), last)
		case <-t.C:
		}
	}
}
