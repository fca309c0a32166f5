package lab

// Background traffic for fault tests: pods probe each other every 100 ms
// while a fault is injected and healed, and every probe that gets no answer
// is counted. A UDP probe is one datagram, never resent, so an outage of
// any length shows up as at least one lost reply; a TCP probe is a fresh
// connection, so a broken path for connection set-up shows too. Probes go
// to a port of their own (probePort+1), so Check can run meanwhile.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/probe"
)

const (
	trafficPort  = probePort + 1
	trafficEvery = 100 * time.Millisecond
	// trafficWait is how long a probe waits for its answer. It only
	// decides when a late answer counts as lost: a UDP probe is never
	// resent, so a generous wait hides no outage.
	trafficWait = 2 * time.Second
)

// flow is one direction of probing, between two pods.
type flow struct{ from, to string }

// traffic probes flows until stop.
type traffic struct {
	t       *testing.T
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	closers []io.Closer

	mu     sync.Mutex // guards the counts
	sent   int
	lost   int
	losses []string // the first few, for the failure message
}

// startTraffic starts probing every flow in both protocols.
func startTraffic(t *testing.T, l *Lab, flows ...flow) *traffic {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tr := &traffic{t: t, cancel: cancel}
	targets := map[string]netip.AddrPort{}
	for _, f := range flows {
		if _, ok := targets[f.to]; ok {
			continue
		}
		p := podOf(t, l, f.to)
		ln, err := netns.Listen(p.NS, "tcp", fmt.Sprintf(":%d", trafficPort))
		if err != nil {
			t.Fatal(err)
		}
		pc, err := netns.ListenPacket(p.NS, "udp", fmt.Sprintf(":%d", trafficPort))
		if err != nil {
			ln.Close()
			t.Fatal(err)
		}
		tr.closers = append(tr.closers, ln, pc)
		go probe.ServeTCP(ln)
		go probe.ServeUDP(pc)
		targets[f.to] = netip.AddrPortFrom(p.IP, trafficPort)
	}
	for _, f := range flows {
		src, dst := podOf(t, l, f.from), targets[f.to]
		name := f.from + "->" + f.to
		tr.wg.Go(func() { tr.run(ctx, name, src.NS, dst) })
	}
	t.Cleanup(func() { tr.stop() })
	return tr
}

func podOf(t *testing.T, l *Lab, name string) Pod {
	t.Helper()
	for _, n := range l.Nodes {
		for _, p := range n.Pods {
			if p.Name == name {
				return p
			}
		}
	}
	t.Fatalf("lab %s has no pod %s", l.Opts.Name, name)
	return Pod{}
}

func (tr *traffic) run(ctx context.Context, name, ns string, dst netip.AddrPort) {
	d := netns.Dialer{NS: ns}
	udp, err := d.DialContext(ctx, "udp", dst.String())
	if err != nil {
		tr.record(name, "udp", fmt.Errorf("open socket: %w", err))
		return
	}
	defer udp.Close()
	tick := time.NewTicker(trafficEvery)
	defer tick.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if i%2 == 0 {
			tr.record(name, "udp", udpOnce(udp))
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, trafficWait)
		_, err := probe.TCP(pctx, d, dst)
		cancel()
		if ctx.Err() != nil {
			return // stopped mid-probe: neither sent nor lost
		}
		tr.record(name, "tcp", err)
	}
}

// udpOnce sends one probe datagram and waits for its answer; answers to
// earlier probes that arrive late are skipped.
func udpOnce(c net.Conn) error {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	token := hex.EncodeToString(b)
	if _, err := c.Write([]byte("loom-probe " + token)); err != nil {
		return err
	}
	deadline := time.Now().Add(trafficWait)
	buf := make([]byte, 1500)
	for {
		_ = c.SetReadDeadline(deadline)
		n, err := c.Read(buf)
		if err != nil {
			return fmt.Errorf("no answer: %w", err)
		}
		if strings.HasSuffix(string(buf[:n]), " "+token) {
			return nil
		}
	}
}

func (tr *traffic) record(name, proto string, err error) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.sent++
	if err == nil {
		return
	}
	tr.lost++
	if len(tr.losses) < 10 {
		tr.losses = append(tr.losses, fmt.Sprintf("%s %s %s at %s: %v", name, proto, "lost", time.Now().Format("15:04:05.000"), err))
	}
}

// stop ends the probing and returns how many probes went out and how
// many got no answer. It may be called more than once.
func (tr *traffic) stop() (sent, lost int, losses []string) {
	tr.cancel()
	tr.wg.Wait()
	for _, c := range tr.closers {
		c.Close()
	}
	tr.closers = nil
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.sent, tr.lost, tr.losses
}

// expectNoLoss stops the traffic and fails the test if any probe got no
// answer, or if too few went out for the check to mean anything.
func (tr *traffic) expectNoLoss(what string) {
	tr.t.Helper()
	sent, lost, losses := tr.stop()
	tr.t.Logf("%s: %d probes, %d lost", what, sent, lost)
	if sent < 20 {
		tr.t.Errorf("%s: only %d probes went out: the traffic did not run through the fault", what, sent)
	}
	if lost > 0 {
		tr.t.Errorf("%s: %d of %d probes between pods got no answer; first ones:\n%s", what, lost, sent, strings.Join(losses, "\n"))
	}
}
