package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/loomnet/loom/internal/backend/routes"
	"github.com/loomnet/loom/internal/lab"
	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/subnetenv"
)

// storePrefix is the registry prefix the lab's agents use: flannel's
// default, /coreos.com/network (registry.DefaultPrefix).
const storePrefix = "/coreos.com/network"

// cluster is a running lab as the bench drives it: its store (an etcd
// client dialling from the router namespace), each agent's health and
// metrics endpoint, and netlink in each node.
type cluster struct {
	lab     *lab.Lab
	backend string
	etcd    *clientv3.Client
	subnets string // <prefix>/subnets/
	health  int    // the agents' health port
}

func newCluster(l *lab.Lab) (*cluster, error) {
	// Talk to the store the way the agents do: their endpoint and, when
	// the lab's store speaks TLS, their client certificate.
	args := l.AgentArgs(l.Nodes[0].Name)
	endpoint := argValue(args, "etcd-endpoints")
	if endpoint == "" {
		endpoint = l.StoreEndpoint()
	}
	var tlsConfig *tls.Config
	info := transport.TLSInfo{CertFile: argValue(args, "etcd-certfile"), KeyFile: argValue(args, "etcd-keyfile"),
		TrustedCAFile: argValue(args, "etcd-cafile")}
	if info.CertFile != "" || info.KeyFile != "" || info.TrustedCAFile != "" {
		var err error
		if tlsConfig, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("TLS for the lab's store: %w", err)
		}
	}
	d := netns.Dialer{NS: l.RouterNS()}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(endpoint, ","),
		DialTimeout: 5 * time.Second,
		TLS:         tlsConfig,
		Username:    argValue(args, "etcd-username"),
		Password:    argValue(args, "etcd-password"),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		})},
	})
	if err != nil {
		return nil, fmt.Errorf("connect to the lab's store: %w", err)
	}
	c := &cluster{lab: l, backend: l.Opts.Backend, etcd: cli, subnets: storePrefix + "/subnets/"}
	c.health, _ = strconv.Atoi(argValue(args, "healthz-port"))
	if c.health == 0 {
		cli.Close()
		return nil, fmt.Errorf("the lab's agents serve no health port (args %v)", args)
	}
	return c, nil
}

// argValue is the value of flag name in an agent command line, given as
// "--name value", "--name=value" or with one dash.
func argValue(args []string, name string) string {
	for i, a := range args {
		f := strings.TrimLeft(a, "-")
		if f == a {
			continue // not a flag
		}
		if k, v, ok := strings.Cut(f, "="); ok && k == name {
			return v
		}
		if f == name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

func (c *cluster) close() { c.etcd.Close() }

func (c *cluster) nodeNS(node string) string {
	n, err := c.lab.Node(node)
	if err != nil {
		return ""
	}
	return n.NS
}

// subnet is node's pod subnet, from its subnet.env.
func (c *cluster) subnet(node string) (netip.Prefix, error) {
	env, err := subnetenv.Read(c.lab.SubnetFile(node))
	if err != nil {
		return netip.Prefix{}, err
	}
	return env.Subnet.Masked(), nil
}

// key is the store key of a subnet lease.
func (c *cluster) key(p netip.Prefix) string { return c.subnets + lease.MakeKey(p, netip.Prefix{}) }

// takenSubnets lists every subnet in the store.
func (c *cluster) takenSubnets(ctx context.Context) ([]netip.Prefix, error) {
	resp, err := c.etcd.Get(ctx, c.subnets, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("list the store's subnets: %w", err)
	}
	var out []netip.Prefix
	for _, kv := range resp.Kvs {
		v4, _, err := lease.ParseKey(string(kv.Key))
		if err == nil && v4.IsValid() {
			out = append(out, v4)
		}
	}
	return out, nil
}

// httpGet fetches path from node's agent health server.
func (c *cluster) httpGet(ctx context.Context, node, path string) (int, []byte, error) {
	client := &http.Client{
		Transport: &http.Transport{DialContext: netns.Dialer{NS: c.nodeNS(node)}.DialContext, DisableKeepAlives: true},
		Timeout:   2 * time.Second,
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d%s", c.health, path), nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, body, err
}

// ready reports whether node's agent answers /readyz with 200.
func (c *cluster) ready(ctx context.Context, node string) bool {
	code, _, err := c.httpGet(ctx, node, "/readyz")
	return err == nil && code == http.StatusOK
}

// waitReady polls node's /readyz every 5 ms until it is 200.
func (c *cluster) waitReady(ctx context.Context, node string, limit time.Duration) error {
	return poll(ctx, limit, 5*time.Millisecond, func() (bool, error) { return c.ready(ctx, node), nil })
}

// metrics scrapes node's /metrics into "name{labels}" → value.
func (c *cluster) metrics(ctx context.Context, node string) (map[string]float64, error) {
	code, body, err := c.httpGet(ctx, node, "/metrics")
	if err != nil {
		return nil, fmt.Errorf("scrape the metrics of %s: %w", node, err)
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("scrape the metrics of %s: HTTP %d", node, code)
	}
	return parseMetrics(body), nil
}

// parseMetrics reads the Prometheus text format, enough for loom's own
// gauges and counters: "name{labels} value" lines, comments skipped.
func parseMetrics(data []byte) map[string]float64 {
	out := make(map[string]float64)
	s := bufio.NewScanner(strings.NewReader(string(data)))
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		line := s.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// udpPeers is the number of peers in node's udp peer table.
func (c *cluster) udpPeers(ctx context.Context, node string) (int, error) {
	m, err := c.metrics(ctx, node)
	if err != nil {
		return 0, err
	}
	v, ok := m["loom_udp_peers"]
	if !ok {
		return 0, fmt.Errorf("%s exports no loom_udp_peers", node)
	}
	return int(v), nil
}

// openHandle is a netlink socket bound to the named namespace; the caller
// closes it and uses it from one goroutine at a time.
func openHandle(ns string) (*netlink.Handle, error) {
	nsh, err := vnetns.GetFromName(ns)
	if err != nil {
		return nil, fmt.Errorf("open namespace %s: %w", ns, err)
	}
	defer nsh.Close() // the handle's sockets keep the namespace
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return nil, fmt.Errorf("netlink in namespace %s: %w", ns, err)
	}
	return h, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// hasRoute reports whether the namespace of h routes exactly dst.
func hasRoute(h *netlink.Handle, dst netip.Prefix) (bool, error) {
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ipNet(dst)}, netlink.RT_FILTER_DST)
	if err != nil {
		return false, fmt.Errorf("list routes to %s: %w", dst, err)
	}
	for _, r := range rs {
		if r.Dst != nil && r.Dst.String() == dst.String() {
			return true, nil
		}
	}
	return false, nil
}

// vxlanState is what the vxlan backend has programmed on one device.
type vxlanState struct {
	routes int                   // loom's routes (proto 108) through the device
	neighs map[netip.Addr]string // permanent neighbours: IP → MAC
	fdb    map[string]netip.Addr // permanent FDB entries with a destination: MAC → dst
}

// readVXLAN dumps dev's routes, neighbours and FDB entries. A missing
// device reads as empty.
func readVXLAN(h *netlink.Handle, dev string) (vxlanState, error) {
	st := vxlanState{neighs: map[netip.Addr]string{}, fdb: map[string]netip.Addr{}}
	link, err := h.LinkByName(dev)
	if err != nil {
		if errors.As(err, new(netlink.LinkNotFoundError)) {
			return st, nil
		}
		return st, fmt.Errorf("find %s: %w", dev, err)
	}
	idx := link.Attrs().Index
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: idx, Protocol: routes.Protocol},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return st, fmt.Errorf("list routes via %s: %w", dev, err)
	}
	st.routes = len(rs)
	ns, err := h.NeighList(idx, netlink.FAMILY_V4)
	if err != nil {
		return st, fmt.Errorf("list neighbours of %s: %w", dev, err)
	}
	for _, n := range ns {
		if a, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
			st.neighs[a.Unmap()] = n.HardwareAddr.String()
		}
	}
	fs, err := h.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return st, fmt.Errorf("list FDB entries of %s: %w", dev, err)
	}
	for _, n := range fs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 && len(n.HardwareAddr) == 6 {
			st.fdb[n.HardwareAddr.String()] = a.Unmap()
		}
	}
	return st, nil
}

// poll calls cond every interval until it returns true, fails, or limit
// passes.
func poll(ctx context.Context, limit, interval time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not done after %v", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// Synthetic peers: leases written straight to the store, for nodes that do
// not exist. Their pods are never sent a packet; what matters is the work
// they make every agent do (one route, neighbour and FDB entry each, with
// vxlan).
//
// Address plan of synthetic peers (lab namespaces only):
//
//	subnets     free /24s of 10.244.0.0/16 (scale runs: /29s inside them,
//	            since a /16 holds only 256 /24s)
//	PublicIP    198.19.<i/256>.<i%256>, generation 1: 198.19.128.0 + i;
//	            host-gw: 198.18.0.100 + i, on-link on the underlay
//	VtepMAC     0e:6c:6d:<generation>:<i/256>:<i%256>

// freeSubnets returns n subnets of length bits (24 or longer) inside the
// /24s of 10.244.0.0/16 that overlap nothing in taken.
func freeSubnets(n, bits int, taken []netip.Prefix) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for third := 1; third < 256 && len(out) < n; third++ {
		block := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(third), 0}), 24)
		free := true
		for _, t := range taken {
			if t.Overlaps(block) {
				free = false
				break
			}
		}
		if !free {
			continue
		}
		per := 1 << (bits - 24)
		for j := 0; j < per && len(out) < n; j++ {
			a := block.Addr().As4()
			a[3] = byte(j << (32 - bits))
			out = append(out, netip.PrefixFrom(netip.AddrFrom4(a), bits))
		}
	}
	if len(out) < n {
		return nil, fmt.Errorf("only %d free /%d subnets in 10.244.0.0/16, want %d", len(out), bits, n)
	}
	return out, nil
}

// synthLease is synthetic peer i (generation gen) on subnet, with what
// backend needs in its lease.
func synthLease(backend string, i, gen int, subnet netip.Prefix) lease.Lease {
	attrs := lease.Attrs{BackendType: backend, NodeName: fmt.Sprintf("bench-peer-%d", i)}
	switch backend {
	case netconf.BackendHostGW:
		attrs.PublicIP = netip.AddrFrom4([4]byte{198, 18, 0, byte(100 + (i+gen*50)%150)})
	default:
		attrs.PublicIP = netip.AddrFrom4([4]byte{198, 19, byte(i>>8 + gen*128), byte(i)})
	}
	if backend == netconf.BackendVXLAN {
		mac := net.HardwareAddr{0x0e, 0x6c, 0x6d, byte(gen), byte(i >> 8), byte(i)}
		attrs.BackendData, _ = json.Marshal(map[string]any{"VNI": 1, "VtepMAC": mac.String()})
	}
	return lease.Lease{Subnet: subnet, Attrs: attrs}
}

// vtepMAC is the VtepMAC of a synthetic vxlan lease.
func vtepMAC(l lease.Lease) string {
	var d struct{ VtepMAC string }
	_ = json.Unmarshal(l.Attrs.BackendData, &d)
	return d.VtepMAC
}

// putLeases writes leases to the store, attached to the etcd lease id (0:
// none), in transactions of 100 (etcd allows 128 operations in one).
func (c *cluster) putLeases(ctx context.Context, leases []lease.Lease, id clientv3.LeaseID) error {
	const batch = 100
	for start := 0; start < len(leases); start += batch {
		var ops []clientv3.Op
		for _, l := range leases[start:min(start+batch, len(leases))] {
			v, err := lease.MarshalAttrs(l.Attrs)
			if err != nil {
				return err
			}
			var opts []clientv3.OpOption
			if id != 0 {
				opts = append(opts, clientv3.WithLease(id))
			}
			ops = append(ops, clientv3.OpPut(c.key(l.Subnet), string(v), opts...))
		}
		if _, err := c.etcd.Txn(ctx).Then(ops...).Commit(); err != nil {
			return fmt.Errorf("write %d synthetic leases: %w", len(ops), err)
		}
	}
	return nil
}

// grant makes an etcd lease for synthetic leases: revoking it deletes them
// all in one request.
func (c *cluster) grant(ctx context.Context) (clientv3.LeaseID, error) {
	g, err := c.etcd.Grant(ctx, int64(time.Hour/time.Second))
	if err != nil {
		return 0, fmt.Errorf("grant an etcd lease for synthetic peers: %w", err)
	}
	return g.ID, nil
}

func (c *cluster) revoke(ctx context.Context, id clientv3.LeaseID) error {
	if _, err := c.etcd.Revoke(ctx, id); err != nil {
		return fmt.Errorf("revoke the synthetic peers' etcd lease: %w", err)
	}
	return nil
}
