package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"

	"github.com/loomnet/loom/internal/lab"
	"github.com/loomnet/loom/internal/netns"
)

// Address plan of the bare veth baseline: two namespaces of the lab,
// loom-<lab>-va (198.19.255.1/30) and loom-<lab>-vb (198.19.255.2/30),
// joined by one veth pair and nothing else: no bridge, no router, no
// firewall. It is the fastest a TCP stream between two namespaces goes on
// this kernel and machine.
func vethAddrs() (a, b netip.Prefix) {
	return netip.MustParsePrefix("198.19.255.1/30"), netip.MustParsePrefix("198.19.255.2/30")
}

func throughputSpec(streams int, path string) spec {
	s := spec{name: fmt.Sprintf("throughput/tcp-%dstream/%s", streams, path), unit: "Gbit/s", better: higherIsBetter}
	switch path {
	case "pod-pod":
		s.baseline = fmt.Sprintf("throughput/tcp-%dstream/underlay", streams)
	case "underlay":
		s.baseline = fmt.Sprintf("throughput/tcp-%dstream/veth", streams)
	}
	return s
}

// throughput measures iperf3 TCP with 1 and 4 streams: pod→pod across
// nodes (n1-p1 → n2-p1), node→node on the underlay (n1 → n2) and over a
// bare veth pair, runs of the three interleaved.
func (b *bencher) throughput(ctx context.Context, c *cluster, idle float64) error {
	l := c.lab
	paths, err := crossNodePaths(l)
	if err != nil {
		return err
	}
	va, vb, err := vethPair(l)
	if err != nil {
		return err
	}
	defer func() {
		_ = netns.Delete(va)
		_ = netns.Delete(vb)
	}()
	_, vbAddr := vethAddrs()
	paths = append(paths, benchPath{"veth", vb, va, vbAddr.Addr()})
	failed := map[string]error{}
	for _, streams := range []int{1, 4} {
		for run := range b.cfg.Runs {
			for _, p := range paths {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				s := throughputSpec(streams, p.path)
				bps, err := runIperf(ctx, iperfRun{serverNS: p.serverNS, clientNS: p.clientNS, server: p.server,
					streams: streams, duration: b.d.iperf, omit: b.d.iperfOmit})
				if err != nil {
					failed[s.name] = err
					continue
				}
				b.rec.add(s, c.backend, idle, bps/1e9)
				b.log.Info("throughput", "backend", c.backend, "path", p.path, "streams", streams, "run", run+1,
					"Gbit/s", fmt.Sprintf("%.2f", bps/1e9))
			}
		}
	}
	var errs []error
	for name, err := range failed {
		errs = append(errs, fmt.Errorf("%s: %w", name, err))
	}
	return errors.Join(errs...)
}

// vethPair makes the two namespaces of the bare veth baseline and returns
// their names. They belong to the lab (its namespace prefix), so lab.Down
// removes them too.
func vethPair(l *lab.Lab) (a, b string, err error) {
	prefix := lab.NSPrefix + l.Opts.Name + "-"
	a, b = prefix+"va", prefix+"vb"
	for _, n := range []string{a, b} {
		if err := netns.Create(n); err != nil {
			return "", "", err
		}
	}
	defer func() {
		if err != nil {
			_ = netns.Delete(a)
			_ = netns.Delete(b)
		}
	}()
	ha, err := openHandle(a)
	if err != nil {
		return "", "", err
	}
	defer ha.Close()
	nb, err := vnetns.GetFromName(b)
	if err != nil {
		return "", "", fmt.Errorf("open namespace %s: %w", b, err)
	}
	defer nb.Close()
	attrs := netlink.NewLinkAttrs()
	attrs.Name = "veth0"
	if err := ha.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "veth0", PeerNamespace: netlink.NsFd(nb)}); err != nil {
		return "", "", fmt.Errorf("veth pair %s <-> %s: %w", a, b, err)
	}
	hb, err := openHandle(b)
	if err != nil {
		return "", "", err
	}
	defer hb.Close()
	aAddr, bAddr := vethAddrs()
	for _, side := range []struct {
		h *netlink.Handle
		p netip.Prefix
	}{{ha, aAddr}, {hb, bAddr}} {
		link, err := side.h.LinkByName("veth0")
		if err != nil {
			return "", "", fmt.Errorf("find veth0: %w", err)
		}
		if err := side.h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(side.p)}); err != nil {
			return "", "", fmt.Errorf("address %s on veth0: %w", side.p, err)
		}
		if err := side.h.LinkSetUp(link); err != nil {
			return "", "", fmt.Errorf("set veth0 up: %w", err)
		}
	}
	return a, b, nil
}
