package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"google.golang.org/grpc"

	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/netns"
)

// undoStep is one recorded undo action of a Break.
type undoStep struct {
	Op    string
	NS    string `json:",omitempty"`
	Key   string `json:",omitempty"`
	Value string `json:",omitempty"`
	Data  []byte `json:",omitempty"`
}

// Undo operations.
const (
	opSysctl       = "sysctl"        // write Value to /proc/sys/Key in NS
	opMTU          = "mtu"           // set link Key's MTU to Value in NS
	opDelLink      = "del-link"      // delete link Key in NS
	opLinkUp       = "link-up"       // set link Key up in NS
	opDelRoute     = "del-route"     // delete route Key via Value in NS
	opFile         = "file"          // restore file Key to Data (Value "absent": remove it)
	opEtcdPut      = "etcd-put"      // put Data at Key
	opEtcdDel      = "etcd-del"      // delete Key
	opStopAgent    = "stop-agent"    // stop node Key's agent now
	opRestartAgent = "restart-agent" // restart node Key's agent with the lab's flags, last
	opStartStore   = "start-store"   // start the store again
	opCNIDel       = "cni-del"       // CNI DEL of pod namespace Value on node Key
	opIPAMRelease  = "ipam-release"  // release the attachments listed in Data on node Key
	opIPTPolicy    = "ipt-policy"    // set iptables filter chain Key's policy to Value in NS

	opStartControlPlane = "start-control-plane" // start what is down of the Kubernetes control plane
	opRecreatePods      = "recreate-pods"       // delete and re-create node Key's pods, last (its subnet may have moved)
)

// Heal undoes what Break recorded, last change first, restarts every agent
// Break touched (or that is not running) with the lab's flags and the store
// if it is down, and waits until the lab is ready and converged.
func (l *Lab) Heal(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	st, err := l.loadBreak()
	if errors.Is(err, os.ErrNotExist) {
		st = &breakState{}
	} else if err != nil {
		return err
	}
	restart := map[string]bool{}
	var recreate []string
	var errs []error
	for i := len(st.Undo) - 1; i >= 0; i-- {
		u := st.Undo[i]
		switch u.Op {
		case opRestartAgent:
			restart[u.Key] = true
			continue
		case opRecreatePods:
			recreate = append(recreate, u.Key)
			continue
		}
		if err := l.undo(ctx, u); err != nil {
			errs = append(errs, fmt.Errorf("undo %s %s: %w", u.Op, u.Key, err))
		}
	}
	for node := range st.Overrides {
		restart[node] = true
	}
	for node := range st.Extra {
		restart[node] = true
	}
	if !l.storeRunning() {
		if err := l.startStore(); err != nil {
			errs = append(errs, err)
		} else if err := l.waitStore(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	// Agents wait for their podCIDR, which needs the controller manager.
	if l.Kube != nil {
		if err := l.StartControlPlane(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	for _, n := range l.Nodes {
		if !restart[n.Name] && l.recordedAlive("agent-"+n.Name) {
			continue
		}
		if err := l.StopAgent(n.Name, syscall.SIGTERM); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := l.StartAgent(n.Name); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("heal %s: %w", st.Scenario, err)
	}
	if err := l.waitAllReady(ctx); err != nil {
		return fmt.Errorf("heal %s: %w", st.Scenario, err)
	}
	if err := l.WaitConverged(ctx); err != nil {
		return fmt.Errorf("heal %s: %w", st.Scenario, err)
	}
	for _, node := range recreate {
		if err := l.recreatePods(ctx, node); err != nil {
			return fmt.Errorf("heal %s: %w", st.Scenario, err)
		}
	}
	if err := os.Remove(l.breakPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (l *Lab) undo(ctx context.Context, u undoStep) error {
	switch u.Op {
	case opSysctl:
		return netns.WriteSysctl(u.NS, u.Key, u.Value)
	case opMTU:
		mtu, err := strconv.Atoi(u.Value)
		if err != nil {
			return err
		}
		return withLink(u.NS, u.Key, func(h *handle, lk netlink.Link) error { return h.LinkSetMTU(lk, mtu) })
	case opDelLink:
		err := withLink(u.NS, u.Key, func(h *handle, lk netlink.Link) error { return h.LinkDel(lk) })
		if errors.As(err, new(netlink.LinkNotFoundError)) {
			return nil
		}
		return err
	case opLinkUp:
		return withLink(u.NS, u.Key, func(h *handle, lk netlink.Link) error { return h.LinkSetUp(lk) })
	case opDelRoute:
		return delStaticRoute(u.NS, netip.MustParsePrefix(u.Key), netip.MustParseAddr(u.Value))
	case opFile:
		if u.Value == "absent" {
			err := os.Remove(u.Key)
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		return os.WriteFile(u.Key, u.Data, 0o644)
	case opEtcdPut, opEtcdDel:
		cli, err := l.etcd()
		if err != nil {
			return err
		}
		defer cli.Close()
		if u.Op == opEtcdPut {
			_, err = cli.Put(ctx, u.Key, string(u.Data))
		} else {
			_, err = cli.Delete(ctx, u.Key)
		}
		return err
	case opStopAgent:
		return l.StopAgent(u.Key, syscall.SIGTERM)
	case opStartStore, opStartControlPlane:
		return nil // Heal starts the store and the control plane whenever they are down
	case opCNIDel:
		return l.cniDel(ctx, u.Key, u.Value)
	case opIPAMRelease:
		var ids []string
		if err := json.Unmarshal(u.Data, &ids); err != nil {
			return err
		}
		st, err := l.ipamStore(u.Key)
		if err != nil {
			return err
		}
		var errs []error
		for _, id := range ids {
			if _, err := st.Release(ipam.Attachment{ContainerID: id, IfName: podIfName}); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	case opIPTPolicy:
		return runIn(ctx, u.NS, "iptables", "-t", "filter", "-P", u.Key, u.Value)
	}
	return fmt.Errorf("unknown undo operation %q", u.Op)
}

// recreatePods deletes node's pods and makes them again under their names,
// as a kubelet re-creates sandboxes after its node moved to another
// subnet: the new ones get addresses of the node's current subnet.
func (l *Lab) recreatePods(ctx context.Context, node string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	var names []string
	for _, p := range n.Pods {
		names = append(names, p.Name)
	}
	for _, name := range names {
		if err := l.DelPod(ctx, name); err != nil {
			return err
		}
		if _, err := l.AddPod(ctx, node, name); err != nil {
			return err
		}
	}
	return nil
}

// cniDel calls CNI DEL for a pod whose namespace is gone, as a runtime's
// garbage collection does: loom-cni releases its address.
func (l *Lab) cniDel(ctx context.Context, node, podNS string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	list, cninet, err := l.cniConfig(node)
	if err != nil {
		return err
	}
	rt := l.runtimeConf(Pod{NS: podNS})
	return netns.Do(n.NS, func() error { return cninet.DelNetworkList(ctx, list, rt) })
}

func withLink(ns, name string, fn func(*handle, netlink.Link) error) error {
	h, err := openHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	lk, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	return fn(h, lk)
}

// addStubLink adds an interface that leads nowhere: a veth pair with both
// ends in ns (the dummy driver may not be built), name carrying addr.
func addStubLink(ns, name string, addr netip.Prefix) error {
	h, err := openHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: name + "-peer"}); err != nil {
		return fmt.Errorf("create %s in %s: %w", name, ns, err)
	}
	if err := h.up(name + "-peer"); err != nil {
		return err
	}
	if err := h.addAddr(name, addr); err != nil {
		return err
	}
	return h.up(name)
}

func setLinkDown(ns, name string) error {
	return withLink(ns, name, func(h *handle, lk netlink.Link) error { return h.LinkSetDown(lk) })
}

// staticRoute is a route as an operator adds it by hand (proto static).
func staticRoute(dst netip.Prefix, via netip.Addr) *netlink.Route {
	return &netlink.Route{
		Dst:      &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), 32)},
		Gw:       via.AsSlice(),
		Protocol: netlink.RouteProtocol(4), // RTPROT_STATIC
	}
}

func addStaticRoute(ns string, dst netip.Prefix, via netip.Addr) error {
	h, err := openHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	return h.RouteAdd(staticRoute(dst, via))
}

func delStaticRoute(ns string, dst netip.Prefix, via netip.Addr) error {
	h, err := openHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	err = h.RouteDel(staticRoute(dst, via))
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// runIn runs a command inside namespace ns.
func runIn(ctx context.Context, ns string, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s in %s: %w: %s", strings.Join(args, " "), ns, err, out)
	}
	return nil
}

func outputIn(ctx context.Context, ns string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...).Output()
	if err != nil {
		return "", fmt.Errorf("%s in %s: %w", strings.Join(args, " "), ns, err)
	}
	return string(out), nil
}

// iptablesPolicy reads a built-in chain's policy from iptables-save.
func iptablesPolicy(ctx context.Context, ns, table, chain string) (string, error) {
	out, err := outputIn(ctx, ns, "iptables-save", "-t", table)
	if err != nil {
		return "", err
	}
	for line := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == ":"+chain {
			return f[1], nil
		}
	}
	return "ACCEPT", nil // no table yet: the built-in default
}

// deleteMasqueradeRules deletes every masquerade rule in ns, in nftables
// table loom and in iptables' nat table, and says how many it deleted.
func deleteMasqueradeRules(ctx context.Context, ns string) (int, error) {
	n := 0
	if out, err := outputIn(ctx, ns, "nft", "-a", "list", "table", "ip", "loom"); err == nil {
		chain := ""
		sc := bufio.NewScanner(strings.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) >= 2 && f[0] == "chain" {
				chain = f[1]
			}
			if len(f) > 2 && strings.Contains(sc.Text(), "masquerade") && f[len(f)-2] == "handle" {
				if err := runIn(ctx, ns, "nft", "delete", "rule", "ip", "loom", chain, "handle", f[len(f)-1]); err != nil {
					return n, err
				}
				n++
			}
		}
	}
	out, err := outputIn(ctx, ns, "iptables-save", "-t", "nat")
	if err != nil {
		return n, nil
	}
	for line := range strings.SplitSeq(out, "\n") {
		if !strings.HasPrefix(line, "-A ") || !strings.Contains(line, "-j MASQUERADE") {
			continue
		}
		args, err := splitQuoted(strings.TrimPrefix(line, "-A "))
		if err != nil {
			return n, err
		}
		if err := runIn(ctx, ns, append([]string{"iptables", "-t", "nat", "-D"}, args...)...); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// splitQuoted splits an iptables-save rule into arguments, honouring quotes.
func splitQuoted(s string) ([]string, error) {
	var out []string
	var cur strings.Builder
	in, have := false, false
	for _, r := range s {
		switch {
		case r == '"':
			in, have = !in, true
		case r == ' ' && !in:
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if in {
		return nil, fmt.Errorf("unbalanced quotes in %q", s)
	}
	if have {
		out = append(out, cur.String())
	}
	return out, nil
}

// grpcDialer makes the etcd client dial from inside a namespace.
func grpcDialer(d netns.Dialer) []grpc.DialOption {
	return []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
		return d.DialContext(ctx, "tcp", addr)
	})}
}
