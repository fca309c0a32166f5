package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/probe"
)

// Row is one line of the connectivity matrix.
type Row struct {
	Kind   string // what a user relies on, e.g. "pod->pod cross-node"
	From   string // lab member: n1, n1-p1, ext
	To     string
	Proto  string // tcp | udp
	Target netip.AddrPort
	// WantSeen is the source address the target must see (invalid: any).
	WantSeen netip.Addr
	// WantFail marks a row that must not connect.
	WantFail bool

	Seen netip.AddrPort
	Err  error
}

// OK reports whether the row came out as expected.
func (r Row) OK() bool {
	if r.WantFail {
		return r.Err != nil
	}
	return r.Err == nil && (!r.WantSeen.IsValid() || r.Seen.Addr() == r.WantSeen)
}

// Matrix builds the rows the lab is expected to pass. Every node is probed;
// cross-node pairs go around the ring of the nodes that share its underlay
// segment, in both directions. With a routed underlay and host-gw, pods on
// different segments must NOT reach each other: host-gw cannot route to a
// peer that is not on-link, and says so instead of installing a route that
// blackholes traffic.
func (l *Lab) Matrix() []Row {
	var rows []Row
	port := uint16(probePort)
	for i, n := range l.Nodes {
		next, ok := l.nextOnSegment(i)
		if len(n.Pods) >= 2 {
			a, b := n.Pods[0], n.Pods[1]
			for _, proto := range []string{"tcp", "udp"} {
				rows = append(rows, Row{Kind: "pod->pod same node", From: a.Name, To: b.Name, Proto: proto,
					Target: netip.AddrPortFrom(b.IP, port), WantSeen: a.IP})
			}
		}
		if len(n.Pods) == 0 {
			continue
		}
		p := n.Pods[0]
		rows = append(rows,
			Row{Kind: "node->pod", From: n.Name, To: p.Name, Proto: "tcp", Target: netip.AddrPortFrom(p.IP, port)},
			Row{Kind: "pod->node", From: p.Name, To: n.Name, Proto: "tcp", Target: netip.AddrPortFrom(n.Underlay.Addr(), port), WantSeen: p.IP},
		)
		if ok {
			rows = append(rows, Row{Kind: "pod->node", From: p.Name, To: next.Name, Proto: "tcp", Target: netip.AddrPortFrom(next.Underlay.Addr(), port)})
			if len(next.Pods) >= 1 {
				q := next.Pods[0]
				for _, proto := range []string{"tcp", "udp"} {
					rows = append(rows,
						Row{Kind: "pod->pod cross-node", From: p.Name, To: q.Name, Proto: proto, Target: netip.AddrPortFrom(q.IP, port), WantSeen: p.IP},
						Row{Kind: "pod->pod cross-node", From: q.Name, To: p.Name, Proto: proto, Target: netip.AddrPortFrom(p.IP, port), WantSeen: q.IP})
				}
				rows = append(rows, Row{Kind: "node->pod", From: n.Name, To: q.Name, Proto: "tcp", Target: netip.AddrPortFrom(q.IP, port)})
			}
		}
		// The "internet" sees the node's address (masquerade), and cannot
		// open a connection to a pod (it has no route to pod networks).
		rows = append(rows,
			Row{Kind: "pod->internet", From: p.Name, To: "ext", Proto: "tcp", Target: netip.AddrPortFrom(extHost.Addr(), port), WantSeen: n.Underlay.Addr()},
			Row{Kind: "internet->pod", From: "ext", To: p.Name, Proto: "tcp", Target: netip.AddrPortFrom(p.IP, port), WantFail: true},
		)
		if other, ok := l.firstOffSegment(n); ok && len(other.Pods) >= 1 && l.Opts.Backend == "host-gw" {
			q := other.Pods[0]
			rows = append(rows, Row{Kind: "pod->pod other segment (host-gw: not on-link)", From: p.Name, To: q.Name, Proto: "tcp",
				Target: netip.AddrPortFrom(q.IP, port), WantFail: true})
		}
	}
	return rows
}

// nextOnSegment is the next node after node i, around the ring, that shares
// its underlay subnet.
func (l *Lab) nextOnSegment(i int) (Node, bool) {
	n := l.Nodes[i]
	for k := 1; k < len(l.Nodes); k++ {
		m := l.Nodes[(i+k)%len(l.Nodes)]
		if m.Underlay.Masked() == n.Underlay.Masked() {
			return m, true
		}
	}
	return Node{}, false
}

// firstOffSegment is the first node on another underlay subnet than n.
func (l *Lab) firstOffSegment(n Node) (Node, bool) {
	for _, m := range l.Nodes {
		if m.Underlay.Masked() != n.Underlay.Masked() {
			return m, true
		}
	}
	return Node{}, false
}

// Check runs the rows: it opens probe listeners in every target namespace,
// probes from every source namespace, and fills in Seen and Err.
func (l *Lab) Check(ctx context.Context, rows []Row) ([]Row, error) {
	servers := map[string]bool{}
	for _, r := range rows {
		servers[r.To] = true
	}
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	for member := range servers {
		ns, err := l.NSOf(member)
		if err != nil {
			return nil, err
		}
		addr := fmt.Sprintf(":%d", probePort)
		ln, err := netns.Listen(ns, "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("probe listener in %s: %w", ns, err)
		}
		closers = append(closers, ln)
		go probe.ServeTCP(ln)
		pc, err := netns.ListenPacket(ns, "udp", addr)
		if err != nil {
			return nil, fmt.Errorf("probe listener in %s: %w", ns, err)
		}
		closers = append(closers, pc)
		go probe.ServeUDP(pc)
	}

	out := make([]Row, len(rows))
	copy(out, rows)
	sem := make(chan struct{}, 8) // 2-core machine: a few probes at a time
	var wg sync.WaitGroup
	for i := range out {
		r := &out[i]
		ns, err := l.NSOf(r.From)
		if err != nil {
			return nil, err
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			d := netns.Dialer{NS: ns, D: net.Dialer{}}
			if r.Proto == "udp" {
				r.Seen, r.Err = probe.UDP(pctx, d, r.Target)
			} else {
				r.Seen, r.Err = probe.TCP(pctx, d, r.Target)
			}
		}()
	}
	wg.Wait()
	return out, nil
}

// PrintMatrix writes the matrix as a table and reports whether every row
// is as expected.
func PrintMatrix(w io.Writer, rows []Row) bool {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tFROM\tTO\tPROTO\tTARGET\tSEEN SOURCE\tEXPECT\tRESULT")
	all := true
	for _, r := range rows {
		expect := "connect"
		if r.WantSeen.IsValid() {
			expect = "source " + r.WantSeen.String()
		}
		if r.WantFail {
			expect = "refused"
		}
		seen := "-"
		if r.Err == nil {
			seen = r.Seen.Addr().String()
		}
		result := "OK"
		if !r.OK() {
			all = false
			result = "FAIL"
			if r.Err != nil {
				result += ": " + r.Err.Error()
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Kind, r.From, r.To, r.Proto, r.Target, seen, expect, result)
	}
	tw.Flush()
	return all
}
