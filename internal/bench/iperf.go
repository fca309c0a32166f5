package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// iperfPort is where the iperf3 server of a throughput run listens, in the
// server's namespace.
const iperfPort = 5201

// iperfJSON is the part of `iperf3 -J` output the bench reads.
type iperfJSON struct {
	Error string `json:"error"`
	End   struct {
		SumReceived *iperfSum `json:"sum_received"`
		SumSent     *iperfSum `json:"sum_sent"`
	} `json:"end"`
}

type iperfSum struct {
	Seconds       float64 `json:"seconds"`
	Bytes         float64 `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
}

// parseIperf returns the throughput of an `iperf3 -c ... -J` run in bits per
// second: what the receiver got (end.sum_received, the sum over all
// streams), or what was sent when an old iperf3 reports no receiver side.
// An "error" in the output is returned as an error.
func parseIperf(data []byte) (float64, error) {
	var r iperfJSON
	if err := json.Unmarshal(data, &r); err != nil {
		return 0, fmt.Errorf("decode iperf3 JSON: %w", err)
	}
	if r.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", r.Error)
	}
	for _, s := range []*iperfSum{r.End.SumReceived, r.End.SumSent} {
		if s != nil && s.BitsPerSecond > 0 {
			return s.BitsPerSecond, nil
		}
	}
	return 0, errors.New("iperf3 JSON has no end.sum_received or end.sum_sent throughput")
}

// iperfRun is one iperf3 TCP test between two namespaces.
type iperfRun struct {
	serverNS, clientNS string
	server             netip.Addr // the server's address, reachable from the client
	streams            int        // -P
	duration           time.Duration
	omit               time.Duration // -O: ramp-up not counted
}

// runIperf runs iperf3 -s once in the server namespace and iperf3 -c in the
// client's, both through `ip netns exec`, and returns the bits per second
// the server received.
func runIperf(ctx context.Context, r iperfRun) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, r.duration+r.omit+30*time.Second)
	defer cancel()
	port := strconv.Itoa(iperfPort)
	var srvOut bytes.Buffer
	srv := exec.CommandContext(ctx, "ip", "netns", "exec", r.serverNS,
		"iperf3", "-s", "-1", "-B", r.server.String(), "-p", port)
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		return 0, fmt.Errorf("start iperf3 server in %s: %w", r.serverNS, err)
	}
	srvDone := make(chan struct{})
	go func() {
		_ = srv.Wait() // a server killed after a failed client run has nothing to say
		close(srvDone)
	}()
	defer func() {
		select {
		case <-srvDone:
		case <-time.After(5 * time.Second):
			_ = srv.Process.Kill()
			<-srvDone
		}
	}()
	if err := waitListening(ctx, srv.Process.Pid, iperfPort, srvDone); err != nil {
		return 0, fmt.Errorf("iperf3 server in %s: %w; it said: %s", r.serverNS, err, strings.TrimSpace(srvOut.String()))
	}

	args := []string{"netns", "exec", r.clientNS, "iperf3", "-c", r.server.String(), "-p", port, "-J",
		"-t", strconv.Itoa(max(1, int(r.duration/time.Second))), "-P", strconv.Itoa(max(1, r.streams)),
		"--connect-timeout", "5000"}
	if r.omit > 0 {
		args = append(args, "-O", strconv.Itoa(int(r.omit/time.Second)))
	}
	var stderr bytes.Buffer
	cli := exec.CommandContext(ctx, "ip", args...)
	cli.Stderr = &stderr
	out, runErr := cli.Output()
	bps, err := parseIperf(out)
	if err != nil {
		if runErr != nil {
			err = errors.Join(err, fmt.Errorf("%w: %s", runErr, strings.TrimSpace(stderr.String())))
		}
		return 0, fmt.Errorf("iperf3 client in %s to %s: %w", r.clientNS, r.server, err)
	}
	return bps, nil
}

// waitListening waits until process pid, once it is iperf3 (past the exec of
// `ip netns exec`), listens on TCP port in its namespace, read from
// /proc/PID/net/tcp, which shows the namespace of that process.
func waitListening(ctx context.Context, pid, port int, exited <-chan struct{}) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		exe, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/exe")
		if filepath.Base(exe) == "iperf3" {
			data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/net/tcp")
			if err == nil && listensOn(data, port) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not listening on port %d after 10s", port)
		}
		select {
		case <-exited:
			return errors.New("exited before listening")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// listensOn reports whether a /proc/net/tcp table has a socket in state
// LISTEN (0A) on port.
func listensOn(table []byte, port int) bool {
	suffix := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(string(table), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && strings.HasSuffix(f[1], suffix) && f[3] == "0A" {
			return true
		}
	}
	return false
}
