package udp

// Throughput of one TCP stream pod to pod through two udp Networks, next
// to the same stream over the plain underlay between the nodes, measured in
// one run (topology in topo_test.go). Each sub-benchmark reports MB/s and
// the share of the machine's CPU time that was idle while it ran (the
// machine is shared: a low idle share at the start means a noisy run);
// the parent prints the ratios.
//
//	go test -run XXX -bench UDPBackendTCP -benchtime 3s ./internal/backend/udp/

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

func BenchmarkUDPBackendTCP(b *testing.B) {
	withOffload := newTopo(b, topoOptions{resync: 5 * time.Second})
	tunOnly := newTopo(b, topoOptions{resync: 5 * time.Second, noUDPOffload: true})
	without := newTopo(b, topoOptions{resync: 5 * time.Second, noOffload: true})
	waitIdle(b)

	rates := map[string]float64{}
	for _, c := range []struct {
		name           string
		client, server ns.NetNS
		addr           string
	}{
		{name: "underlay", client: withOffload.nodes[0].ns, server: withOffload.nodes[1].ns, addr: "198.18.0.12"},
		{name: "udp", client: withOffload.nodes[0].pod, server: withOffload.nodes[1].pod, addr: "10.244.2.10"},
		{name: "udp-tun-offload-only", client: tunOnly.nodes[0].pod, server: tunOnly.nodes[1].pod, addr: "10.244.2.10"},
		{name: "udp-no-offload", client: without.nodes[0].pod, server: without.nodes[1].pod, addr: "10.244.2.10"},
	} {
		b.Run(c.name, func(b *testing.B) {
			rates[c.name] = stream(b, c.client, c.server, c.addr)
		})
	}
	if u := rates["underlay"]; u > 0 {
		b.Logf("MB/s: underlay %.0f; udp %.0f (%.1f%% of underlay); TUN offload only %.0f (%.1f%%); no offloads %.0f (%.1f%%); "+
			"flannel's udp backend: ~2.6%%", u/1e6, rates["udp"]/1e6, 100*rates["udp"]/u,
			rates["udp-tun-offload-only"]/1e6, 100*rates["udp-tun-offload-only"]/u,
			rates["udp-no-offload"]/1e6, 100*rates["udp-no-offload"]/u)
	}
	for i, tn := range withOffload.nodes {
		b.Logf("n%d (offloads): %+v; kernel UDP counters: %s", i+1, tn.nw.Stats(), udpSNMP(b, tn.ns))
	}
}

// udpSNMP returns the kernel's UDP counters in n, where datagrams the
// kernel dropped (RcvbufErrors) show. /proc/net is the main thread's
// namespace; /proc/thread-self/net is the calling thread's.
func udpSNMP(b *testing.B, n ns.NetNS) string {
	var out string
	err := n.Do(func(ns.NetNS) error {
		data, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		var names []string
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) == 0 || f[0] != "Udp:" {
				continue
			}
			if names == nil {
				names = f[1:]
				continue
			}
			for i, v := range f[1:] {
				if i < len(names) && (names[i] == "InDatagrams" || names[i] == "RcvbufErrors" || names[i] == "SndbufErrors" || names[i] == "InErrors") {
					out += names[i] + "=" + v + " "
				}
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// stream sends b.N chunks over one TCP connection from client to a sink in
// server and returns the rate in bytes per second, measured until the sink
// has read everything.
func stream(b *testing.B, client, server ns.NetNS, addr string) float64 {
	const chunk = 128 << 10
	var ln *net.TCPListener
	err := server.Do(func(ns.NetNS) error {
		l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(addr), 0)))
		ln = l
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		n, err := io.Copy(io.Discard, c)
		if err == nil && n != int64(b.N)*chunk {
			err = errors.New("short stream: " + strconv.FormatInt(n, 10) + " bytes")
		}
		got <- err
	}()
	var conn *net.TCPConn
	err = client.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 10*time.Second)
		if err == nil {
			conn = c.(*net.TCPConn)
		}
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	idle0, total0 := cpuTimes(b)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := conn.CloseWrite(); err != nil {
		b.Fatal(err)
	}
	if err := <-got; err != nil {
		b.Fatal(err)
	}
	elapsed := time.Since(start)
	b.StopTimer()
	idle1, total1 := cpuTimes(b)
	if total1 > total0 {
		b.ReportMetric(100*float64(idle1-idle0)/float64(total1-total0), "idle%")
	}
	return float64(b.N) * chunk / elapsed.Seconds()
}

// cpuTimes reads the machine's idle and total CPU time from /proc/stat.
func cpuTimes(b *testing.B) (idle, total uint64) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		total += v
		if i == 3 || i == 4 { // idle, iowait
			idle += v
		}
	}
	return idle, total
}

// waitIdle waits (up to 30 s) for a second in which the machine is at
// least 80% idle, and logs the idle share it found.
func waitIdle(b *testing.B) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		i0, t0 := cpuTimes(b)
		time.Sleep(time.Second)
		i1, t1 := cpuTimes(b)
		share := float64(i1-i0) / float64(max(t1-t0, 1))
		if share >= 0.8 || time.Now().After(deadline) {
			b.Logf("machine idle share before the run: %.0f%%", 100*share)
			return
		}
	}
}
