package cni_test

// End-to-end tests: the real loom-cni binary, driven through libcni exactly
// as a container runtime drives it, against the real kernel. They need root.
//
// Topology, all inside namespaces the test creates (testnet.NewNS):
//
//	node netns (loomt-node-*)                 pod netns (loomt-pod-*)
//	  cni0 10.244.1.1/24, fc00:0:0:1::1/64      eth0 10.244.1.x/24, fc00:0:0:1::x/64
//	   └─ veth<hash> ───────────────────────────── ┘
//
// The libcni calls run inside the node netns (ns.Do), so the plugin process
// they start is in the node netns, as it would be on a real node.
//
// Address plan: pod network 10.244.0.0/16, node subnet 10.244.1.0/24 (a
// /29 for exhaustion), IPv6 pod network fc00::/48 with node subnet
// fc00:0:0:1::/64, FLANNEL_MTU 1450. Files live in t.TempDir().

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/loomnet/loom/internal/cni"
	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/subnetenv"
	"github.com/loomnet/loom/internal/testnet"
)

const (
	netName = "loomtest"
	echo    = "loom-test-echo" // testdata/echoplugin
)

// pluginDir holds the loom-cni and echo binaries; TestMain builds them once
// for the package, as a node's /opt/cni/bin would hold them.
var pluginDir string

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "loom-cni-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	for name, pkg := range map[string]string{cni.PluginType: "github.com/loomnet/loom/cmd/loom-cni", echo: "./testdata/echoplugin"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, name), pkg)
		cmd.Env = append(os.Environ(), testnet.Static)
		out, err := cmd.CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, out)
			return 1
		}
	}
	pluginDir = dir

	// Guard against the one thing these tests must never do: create links
	// in the namespace the test process runs in. Only names these tests
	// make are watched, so other tenants of the machine do not trip it.
	before := ourLinks()
	code := m.Run()
	if extra := slices.DeleteFunc(ourLinks(), func(n string) bool { return slices.Contains(before, n) }); len(extra) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: links appeared in the test's own network namespace: %v\n", extra)
		return 1
	}
	return code
}

func ourLinks() []string {
	ourLinkName := regexp.MustCompile(`^(cni0|eth0|loomt-.*|veth[0-9a-f]{8})$`)
	links, _ := netlink.LinkList()
	var names []string
	for _, l := range links {
		if ourLinkName.MatchString(l.Attrs().Name) {
			names = append(names, l.Attrs().Name)
		}
	}
	return names
}

// node is one node: a netns for cni0 and the veths, a subnet.env, an IPAM
// store and a libcni cache.
type node struct {
	ns         ns.NetNS
	subnetFile string
	dataDir    string
	cacheDir   string
	recordDir  string
	rt         *libcni.CNIConfig
}

func ipv4Env() subnetenv.Env {
	return subnetenv.Env{
		Network: netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:  netip.MustParsePrefix("10.244.1.1/24"),
		MTU:     1450,
		IPMasq:  true,
	}
}

func dualEnv() subnetenv.Env {
	e := ipv4Env()
	e.IPv6Network = netip.MustParsePrefix("fc00::/48")
	e.IPv6Subnet = netip.MustParsePrefix("fc00:0:0:1::1/64")
	return e
}

// newNode makes a node; env nil means the agent has not written subnet.env.
func newNode(t *testing.T, env *subnetenv.Env) *node {
	t.Helper()
	dir := t.TempDir()
	n := &node{
		ns:         testnet.NewNS(t, "node"),
		subnetFile: filepath.Join(dir, "subnet.env"),
		dataDir:    filepath.Join(dir, "ipam"),
		cacheDir:   filepath.Join(dir, "cache"),
		recordDir:  filepath.Join(dir, "record"),
	}
	if err := os.Mkdir(n.recordDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if env != nil {
		n.writeEnv(t, *env)
	}
	n.rt = newRuntime(n.cacheDir)
	return n
}

// newRuntime is libcni as a runtime holds it. The exec is passed in because
// libcni fills in a nil one lazily, racing when a runtime issues concurrent
// calls (as the concurrency test does).
func newRuntime(cacheDir string) *libcni.CNIConfig {
	exec := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	return libcni.NewCNIConfigWithCacheDir([]string{pluginDir}, cacheDir, exec)
}

func (n *node) writeEnv(t *testing.T, env subnetenv.Env) {
	t.Helper()
	if err := subnetenv.Write(n.subnetFile, env); err != nil {
		t.Fatal(err)
	}
}

// list builds the node's network configuration list with loom-cni first.
func (n *node) list(t *testing.T, version string, conf cni.NetConf, chained ...any) *libcni.NetworkConfigList {
	t.Helper()
	conf.SubnetFile, conf.DataDir = n.subnetFile, n.dataDir
	b, err := cni.ConfList(version, netName, conf, chained...)
	if err != nil {
		t.Fatal(err)
	}
	return n.parseList(t, b)
}

func (n *node) parseList(t *testing.T, b []byte) *libcni.NetworkConfigList {
	t.Helper()
	l, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatalf("libcni rejects %s: %v", b, err)
	}
	return l
}

// in runs f in the node's netns.
func (n *node) in(f func() error) error {
	return n.ns.Do(func(ns.NetNS) error { return f() })
}

func (n *node) add(l *libcni.NetworkConfigList, p *pod) (res types.Result, err error) {
	err = n.in(func() error {
		res, err = n.rt.AddNetworkList(context.Background(), l, p.rt)
		return err
	})
	return res, err
}

func (n *node) mustAdd(t *testing.T, l *libcni.NetworkConfigList, p *pod) *current.Result {
	t.Helper()
	res, err := n.add(l, p)
	if err != nil {
		t.Fatalf("ADD %s: %v", p.rt.ContainerID, err)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	return cur
}

func (n *node) del(l *libcni.NetworkConfigList, p *pod) error {
	return n.in(func() error { return n.rt.DelNetworkList(context.Background(), l, p.rt) })
}

func (n *node) check(l *libcni.NetworkConfigList, p *pod) error {
	return n.in(func() error { return n.rt.CheckNetworkList(context.Background(), l, p.rt) })
}

func (n *node) status(l *libcni.NetworkConfigList) error {
	return n.in(func() error { return n.rt.GetStatusNetworkList(context.Background(), l) })
}

// nl opens netlink in a test namespace.
func nl(t *testing.T, in ns.NetNS) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(netns.NsHandle(in.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// allocated lists the addresses in the node's store; the test also reads
// the directory itself, to see the files a runtime's tools would see.
func (n *node) allocated(t *testing.T) []ipam.Allocation {
	t.Helper()
	s, err := ipam.New(ipam.Config{DataDir: n.dataDir, Network: netName})
	if err != nil {
		t.Fatal(err)
	}
	all, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	return all
}

func (n *node) ipFiles(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(n.dataDir, netName))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, e := range entries {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			ips = append(ips, e.Name())
		}
	}
	return ips
}

// attachmentFiles lists the IPAM store's attachment files (package ipam
// keeps one per attachment it reserved for).
func (n *node) attachmentFiles(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(n.dataDir, netName))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "attachment-") {
			names = append(names, e.Name())
		}
	}
	return names
}

type pod struct {
	ns ns.NetNS
	rt *libcni.RuntimeConf
}

func newPod(t *testing.T) *pod {
	t.Helper()
	b := make([]byte, 16)
	rand.Read(b)
	p := testnet.NewNS(t, "pod")
	return &pod{ns: p, rt: &libcni.RuntimeConf{ContainerID: hex.EncodeToString(b), NetNS: p.Path(), IfName: "eth0"}}
}

func podAddr(t *testing.T, res *current.Result, is4 bool) netip.Prefix {
	t.Helper()
	for _, ipc := range res.IPs {
		a, _ := netip.AddrFromSlice(ipc.Address.IP)
		if a.Unmap().Is4() == is4 {
			ones, _ := ipc.Address.Mask.Size()
			return netip.PrefixFrom(a.Unmap(), ones)
		}
	}
	t.Fatalf("result has no IPv4=%t address: %v", is4, res)
	return netip.Prefix{}
}

// reach opens a real TCP connection from the pod to a listener on the
// node's gateway address and checks that the node saw the pod's address.
func reach(t *testing.T, n *node, p *pod, gw, podIP netip.Addr) {
	t.Helper()
	var ln net.Listener
	if err := n.in(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(gw, 0).String())
		return err
	}); err != nil {
		t.Fatalf("listen on %s in the node: %v", gw, err)
	}
	defer ln.Close()
	seen := make(chan netip.Addr, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(seen)
			return
		}
		defer c.Close()
		seen <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	}()
	err := p.ns.Do(func(ns.NetNS) error {
		c, err := (&net.Dialer{Timeout: 5 * time.Second}).Dial("tcp", ln.Addr().String())
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		t.Fatalf("connect from the pod to %s: %v", ln.Addr(), err)
	}
	select {
	case got := <-seen:
		if got != podIP {
			t.Fatalf("node saw the connection from %v, want the pod's %v", got, podIP)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("node never accepted the pod's connection")
	}
}

func cniCode(t *testing.T, err error) *types.Error {
	t.Helper()
	te, ok := errors.AsType[*types.Error](err)
	if !ok {
		t.Fatalf("err = %v (%T), want a CNI error", err, err)
	}
	return te
}

func TestAddCheckDel(t *testing.T) {
	t.Parallel()
	env := ipv4Env()
	n := newNode(t, &env)
	p := newPod(t)
	l := n.list(t, "1.1.0", cni.NetConf{})

	res := n.mustAdd(t, l, p)
	if res.CNIVersion != "1.1.0" {
		t.Errorf("result version %s, want 1.1.0", res.CNIVersion)
	}
	addr := podAddr(t, res, true)
	gw := netip.MustParseAddr("10.244.1.1")
	if !netip.MustParsePrefix("10.244.1.0/24").Contains(addr.Addr()) || addr.Bits() != 24 || addr.Addr() == gw {
		t.Fatalf("pod got %v, want an address of 10.244.1.0/24 other than the gateway", addr)
	}
	if len(res.Interfaces) != 3 || res.Interfaces[0].Name != "cni0" || res.Interfaces[1].Name != cni.HostVethName(p.rt.ContainerID, "eth0") ||
		res.Interfaces[2].Name != "eth0" || res.Interfaces[2].Sandbox != p.rt.NetNS {
		t.Fatalf("interfaces %+v, want cni0, the node veth and eth0 in the pod", res.Interfaces)
	}
	if ipc := res.IPs[0]; *ipc.Interface != 2 || !ipc.Gateway.Equal(gw.AsSlice()) {
		t.Errorf("ip config %+v, want interface 2 and gateway %v", ipc, gw)
	}
	if len(res.Routes) != 1 || res.Routes[0].Dst.String() != "0.0.0.0/0" || !res.Routes[0].GW.Equal(gw.AsSlice()) {
		t.Errorf("routes %v, want the default route via %v", res.Routes, gw)
	}

	// The kernel agrees with the result.
	nodeNL, podNL := nl(t, n.ns), nl(t, p.ns)
	br, err := nodeNL.LinkByName("cni0")
	if err != nil {
		t.Fatal(err)
	}
	if br.Attrs().HardwareAddr.String() != res.Interfaces[0].Mac || br.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("cni0 is %+v, want up with MAC %s", br.Attrs(), res.Interfaces[0].Mac)
	}
	hostVeth, err := nodeNL.LinkByName(res.Interfaces[1].Name)
	if err != nil {
		t.Fatal(err)
	}
	if hostVeth.Attrs().MasterIndex != br.Attrs().Index || hostVeth.Attrs().MTU != 1450 || hostVeth.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("node veth %+v, want an up port of cni0 with MTU 1450", hostVeth.Attrs())
	}
	// ADD reports MACs it chose itself instead of reading them back.
	if mac := hostVeth.Attrs().HardwareAddr.String(); mac != res.Interfaces[1].Mac || res.Interfaces[1].Mtu != 1450 {
		t.Errorf("node veth has MAC %s, result says %+v", mac, res.Interfaces[1])
	}
	if pi, err := nodeNL.LinkGetProtinfo(hostVeth); err != nil || !pi.Hairpin {
		t.Errorf("node veth protinfo %+v, %v: want hairpin on", pi, err)
	}
	eth0, err := podNL.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if eth0.Attrs().MTU != 1450 || eth0.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("pod eth0 %+v, want up with FLANNEL_MTU 1450", eth0.Attrs())
	}
	if mac := eth0.Attrs().HardwareAddr.String(); mac != res.Interfaces[2].Mac || res.Interfaces[2].Mtu != 1450 {
		t.Errorf("pod eth0 has MAC %s, result says %+v", mac, res.Interfaces[2])
	}
	if res.Interfaces[0].Mtu != br.Attrs().MTU {
		t.Errorf("cni0 has MTU %d, result says %d", br.Attrs().MTU, res.Interfaces[0].Mtu)
	}
	data, err := os.ReadFile(filepath.Join(n.dataDir, netName, addr.Addr().String()))
	if err != nil || string(data) != p.rt.ContainerID+"\r\neth0" {
		t.Errorf("allocation file holds %q, %v: want host-local's \"<id>\\r\\neth0\"", data, err)
	}

	reach(t, n, p, gw, addr.Addr())

	if err := n.check(l, p); err != nil {
		t.Fatalf("CHECK after ADD: %v", err)
	}
	// Take the pod's address away: CHECK must notice.
	if err := podNL.AddrDel(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	err = n.check(l, p)
	if err == nil || !strings.Contains(err.Error(), "lacks its address "+addr.String()) {
		t.Fatalf("CHECK without the pod's address: err = %v, want one naming %v", err, addr)
	}

	if err := n.del(l, p); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if files := n.ipFiles(t); len(files) != 0 {
		t.Errorf("after DEL the store still holds %v", files)
	}
	if _, err := nodeNL.LinkByName(res.Interfaces[1].Name); err == nil {
		t.Error("after DEL the node veth still exists")
	}
	if _, err := podNL.LinkByName("eth0"); err == nil {
		t.Error("after DEL the pod's eth0 still exists")
	}
	if err := n.del(l, p); err != nil {
		t.Fatalf("second DEL: %v", err)
	}
}

func TestDelIdempotent(t *testing.T) {
	t.Parallel()
	t.Run("unknown container, no subnet.env, no netns", func(t *testing.T) {
		n := newNode(t, nil)
		l := n.list(t, "1.1.0", cni.NetConf{})
		for _, netnsPath := range []string{"", "/run/netns/" + testnet.Prefix + "never-existed"} {
			rt := &libcni.RuntimeConf{ContainerID: "unknown", NetNS: netnsPath, IfName: "eth0"}
			if err := n.in(func() error { return n.rt.DelNetworkList(context.Background(), l, rt) }); err != nil {
				t.Errorf("DEL with netns %q: %v", netnsPath, err)
			}
		}
		if _, err := os.Stat(n.dataDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("DEL of an unknown container created the store (%v)", err)
		}
	})
	t.Run("netns path gone, subnet.env gone", func(t *testing.T) {
		env := ipv4Env()
		n := newNode(t, &env)
		p := newPod(t)
		l := n.list(t, "1.1.0", cni.NetConf{})
		res := n.mustAdd(t, l, p)
		if err := os.Remove(n.subnetFile); err != nil {
			t.Fatal(err)
		}
		// The runtime lost the netns path (already unmounted), but the
		// namespace lives on: DEL must still find the veth by name.
		p.rt.NetNS = "/run/netns/" + testnet.Prefix + "unmounted"
		if err := n.del(l, p); err != nil {
			t.Fatalf("DEL: %v", err)
		}
		if files := n.ipFiles(t); len(files) != 0 {
			t.Errorf("after DEL the store still holds %v", files)
		}
		if _, err := nl(t, n.ns).LinkByName(res.Interfaces[1].Name); err == nil {
			t.Error("after DEL the node veth still exists")
		}
		if _, err := nl(t, p.ns).LinkByName("eth0"); err == nil {
			t.Error("after DEL the pod's eth0 still exists")
		}
	})
}

// Fifty ADDs at once on one node, each its own plugin process, as a runtime
// starting a deployment would issue them.
func TestConcurrentAddDel(t *testing.T) {
	t.Parallel()
	const pods = 50
	env := ipv4Env()
	n := newNode(t, &env)
	l := n.list(t, "1.1.0", cni.NetConf{})
	ps := make([]*pod, pods)
	for i := range ps {
		ps[i] = newPod(t)
	}

	results := make([]*current.Result, pods)
	errs := make([]error, pods)
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Go(func() {
			res, err := n.add(l, p)
			if err == nil {
				results[i], err = current.NewResultFromResult(res)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("concurrent ADDs: %v", err)
	}
	seen := make(map[netip.Addr]string)
	for i, res := range results {
		a := podAddr(t, res, true).Addr()
		if other, dup := seen[a]; dup {
			t.Fatalf("%s and %s both got %v", other, ps[i].rt.ContainerID, a)
		}
		seen[a] = ps[i].rt.ContainerID
	}
	if got := len(n.ipFiles(t)); got != pods {
		t.Fatalf("store holds %d addresses after %d ADDs", got, pods)
	}
	// The bridge kept the fixed MAC while fifty ports joined.
	nodeNL := nl(t, n.ns)
	br, err := nodeNL.LinkByName("cni0")
	if err != nil {
		t.Fatal(err)
	}
	if br.Attrs().HardwareAddr.String() != results[0].Interfaces[0].Mac {
		t.Errorf("cni0 MAC changed to %s from %s", br.Attrs().HardwareAddr, results[0].Interfaces[0].Mac)
	}

	for i, p := range ps {
		wg.Go(func() { errs[i] = n.del(l, p) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("concurrent DELs: %v", err)
	}
	if files := n.ipFiles(t); len(files) != 0 {
		t.Fatalf("after %d DELs the store still holds %v", pods, files)
	}
	links, err := nodeNL.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, lk := range links {
		if lk.Type() == "veth" {
			t.Errorf("after all DELs veth %s is left on the node", lk.Attrs().Name)
		}
	}
}

func TestGC(t *testing.T) {
	t.Parallel()
	env := ipv4Env()
	n := newNode(t, &env)
	l := n.list(t, "1.1.0", cni.NetConf{})
	ps := []*pod{newPod(t), newPod(t), newPod(t)}
	var results []*current.Result
	for _, p := range ps {
		results = append(results, n.mustAdd(t, l, p))
	}

	// A runtime that lost its cache (restart, wiped /var/lib/cni) has only
	// GC left: libcni then has nothing to DEL and the plugin must find the
	// stale allocations itself.
	forgetful := newRuntime(t.TempDir())
	keep := ps[0].rt
	err := n.in(func() error {
		return forgetful.GCNetworkList(context.Background(), l, &libcni.GCArgs{
			ValidAttachments: []types.GCAttachment{{ContainerID: keep.ContainerID, IfName: keep.IfName}},
		})
	})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	all := n.allocated(t)
	if len(all) != 1 || all[0].ContainerID != keep.ContainerID || all[0].IP != podAddr(t, results[0], true).Addr() {
		t.Fatalf("after GC the store holds %v, want only %s's address", all, keep.ContainerID)
	}
	nodeNL := nl(t, n.ns)
	for i, res := range results {
		_, err := nodeNL.LinkByName(res.Interfaces[1].Name)
		if exists := err == nil; exists != (i == 0) {
			t.Errorf("pod %d's veth exists=%t after GC, want %t", i, exists, i == 0)
		}
	}
	// The same GC through the runtime's real cache DELs the stale
	// attachments first; after the plugin's own GC that must still succeed.
	err = n.in(func() error {
		return n.rt.GCNetworkList(context.Background(), l, &libcni.GCArgs{
			ValidAttachments: []types.GCAttachment{{ContainerID: keep.ContainerID, IfName: keep.IfName}},
		})
	})
	if err != nil {
		t.Fatalf("GC with the runtime's cache: %v", err)
	}
	if err := n.check(l, ps[0]); err != nil {
		t.Fatalf("CHECK of the pod GC kept: %v", err)
	}
}

func TestErrors(t *testing.T) {
	t.Parallel()
	n := newNode(t, nil)
	l := n.list(t, "1.1.0", cni.NetConf{})
	p := newPod(t)

	t.Run("no subnet.env: ADD and STATUS say not available", func(t *testing.T) {
		_, err := n.add(l, p)
		te := cniCode(t, err)
		if want := "loom agent has not written " + n.subnetFile + " yet"; te.Code != types.ErrPluginNotAvailable || !strings.Contains(te.Msg, want) {
			t.Errorf("ADD: code %d %q, want 50 saying %q", te.Code, te.Msg, want)
		}
		if te := cniCode(t, n.status(l)); te.Code != types.ErrPluginNotAvailable {
			t.Errorf("STATUS: code %d %q, want 50", te.Code, te.Msg)
		}
		if files := n.ipFiles(t); len(files) != 0 {
			t.Errorf("failed ADD left allocations %v", files)
		}
	})

	env := ipv4Env()
	n.writeEnv(t, env)
	if err := n.status(l); err != nil {
		t.Fatalf("STATUS with subnet.env: %v", err)
	}

	// Direct invocations, for input libcni itself would refuse to send.
	base := []string{"CNI_CONTAINERID=c1", "CNI_NETNS=" + p.rt.NetNS, "CNI_IFNAME=eth0", "CNI_PATH=" + pluginDir}
	good := fmt.Sprintf(`{"cniVersion":"1.1.0","name":%q,"type":"loom-cni","subnetFile":%q,"dataDir":%q}`, netName, n.subnetFile, n.dataDir)
	for _, tt := range []struct {
		name     string
		env      []string
		stdin    string
		wantCode uint
		wantMsg  string
	}{
		{name: "bad JSON", env: append([]string{"CNI_COMMAND=ADD"}, base...), stdin: `{"name":`, wantCode: types.ErrDecodingFailure},
		{name: "unknown command", env: append([]string{"CNI_COMMAND=FROB"}, base...), stdin: good, wantCode: types.ErrInvalidEnvironmentVariables, wantMsg: "FROB"},
		{name: "no container ID", env: []string{"CNI_COMMAND=ADD", "CNI_NETNS=" + p.rt.NetNS, "CNI_IFNAME=eth0", "CNI_PATH=" + pluginDir}, stdin: good, wantCode: types.ErrInvalidEnvironmentVariables, wantMsg: "CNI_CONTAINERID"},
		{name: "unsupported version", env: append([]string{"CNI_COMMAND=ADD"}, base...), stdin: strings.Replace(good, "1.1.0", "0.3.1", 1), wantCode: types.ErrIncompatibleCNIVersion},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			cmd := exec.Command(filepath.Join(pluginDir, cni.PluginType))
			cmd.Env, cmd.Stdin, cmd.Stdout = tt.env, strings.NewReader(tt.stdin), &out
			if err := n.in(cmd.Run); err == nil {
				t.Fatalf("plugin succeeded: %s", out.String())
			}
			var te types.Error
			if err := json.Unmarshal(out.Bytes(), &te); err != nil {
				t.Fatalf("stdout %q is not a CNI error: %v", out.String(), err)
			}
			if te.Code != tt.wantCode || !strings.Contains(te.Msg, tt.wantMsg) {
				t.Fatalf("code %d %q, want %d containing %q", te.Code, te.Msg, tt.wantCode, tt.wantMsg)
			}
		})
	}

	t.Run("mtu x is invalid config", func(t *testing.T) {
		bad := n.parseList(t, fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":%q,"plugins":[{"type":"loom-cni","subnetFile":%q,"dataDir":%q,"mtu":"x"}]}`,
			netName, n.subnetFile, n.dataDir))
		_, err := n.add(bad, p)
		if te := cniCode(t, err); te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, "mtu") {
			t.Fatalf("code %d %q, want 7 naming mtu", te.Code, te.Msg)
		}
	})
	t.Run("mtu above FLANNEL_MTU is refused", func(t *testing.T) {
		big := n.parseList(t, fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":%q,"plugins":[{"type":"loom-cni","subnetFile":%q,"dataDir":%q,"mtu":9000}]}`,
			netName, n.subnetFile, n.dataDir))
		_, err := n.add(big, p)
		if te := cniCode(t, err); te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, "9000 is larger than FLANNEL_MTU") {
			t.Fatalf("code %d %q, want 7 saying 9000 is larger than FLANNEL_MTU", te.Code, te.Msg)
		}
	})
	// A bad CNI_NETNS is the spec's code 4 (invalid environment variable),
	// naming the variable; nothing is configured anywhere.
	badNetNS := func(t *testing.T, err error, what string) {
		t.Helper()
		if te := cniCode(t, err); te.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(te.Msg, "CNI_NETNS") {
			t.Errorf("%s: code %d %q, want 4 naming CNI_NETNS", what, te.Code, te.Msg)
		}
	}
	t.Run("bad netns", func(t *testing.T) {
		rt := &libcni.RuntimeConf{ContainerID: "c2", NetNS: "/run/netns/" + testnet.Prefix + "never-existed", IfName: "eth0"}
		err := n.in(func() error { _, err := n.rt.AddNetworkList(context.Background(), l, rt); return err })
		badNetNS(t, err, "ADD")
	})
	t.Run("CNI_NETNS is not a network namespace", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "not-a-netns")
		if err := os.WriteFile(file, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		// A mount namespace passes a file system check; only its kind
		// tells it apart.
		for _, path := range []string{file, "/proc/self/ns/mnt", "/proc/1/ns/pid"} {
			rt := &libcni.RuntimeConf{ContainerID: "c4", NetNS: path, IfName: "eth0"}
			err := n.in(func() error { _, err := n.rt.AddNetworkList(context.Background(), l, rt); return err })
			badNetNS(t, err, "ADD "+path)
		}
	})
	t.Run("CNI_NETNS is the node's own", func(t *testing.T) {
		nodeNL := nl(t, n.ns)
		victim := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "loomt-victim"}, PeerName: "loomt-victim-p"}
		if err := nodeNL.LinkAdd(victim); err != nil {
			t.Fatal(err)
		}
		rt := &libcni.RuntimeConf{ContainerID: "c3", NetNS: n.ns.Path(), IfName: "loomt-victim"}
		err := n.in(func() error { _, err := n.rt.AddNetworkList(context.Background(), l, rt); return err })
		badNetNS(t, err, "ADD")
		err = n.in(func() error { return n.rt.DelNetworkList(context.Background(), l, rt) })
		badNetNS(t, err, "DEL")
		if _, err := nodeNL.LinkByName("loomt-victim"); err != nil {
			t.Errorf("the node's own interface is gone: %v", err)
		}
	})
	t.Run("bridge name taken: ADD rolls back its allocation", func(t *testing.T) {
		nodeNL := nl(t, n.ns)
		taken := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "loomt-taken"}, PeerName: "loomt-taken-p"}
		if err := nodeNL.LinkAdd(taken); err != nil {
			t.Fatal(err)
		}
		_, err := n.add(n.list(t, "1.1.0", cni.NetConf{Bridge: "loomt-taken"}), p)
		if err == nil || !strings.Contains(err.Error(), "loomt-taken exists and is a veth, not a bridge") {
			t.Fatalf("ADD onto a dummy bridge: err = %v, want one saying it is not a bridge", err)
		}
		if files := n.ipFiles(t); len(files) != 0 {
			t.Errorf("failed ADD left allocations %v", files)
		}
	})
	if files := n.ipFiles(t); len(files) != 0 {
		t.Errorf("failed ADDs left allocations %v", files)
	}
}

// A failure after the veth exists (here: IPv6 disabled in the pod, so the
// IPv6 address cannot be added) must leave neither veth nor address.
func TestAddRollsBack(t *testing.T) {
	t.Parallel()
	env := dualEnv()
	n := newNode(t, &env)
	l := n.list(t, "1.1.0", cni.NetConf{})
	p := newPod(t)
	err := p.ns.Do(func(ns.NetNS) error {
		return os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("1"), 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.add(l, p); err == nil {
		t.Fatal("ADD with IPv6 disabled in the pod succeeded")
	}
	if files := n.ipFiles(t); len(files) != 0 {
		t.Errorf("failed ADD left allocations %v", files)
	}
	if _, err := nl(t, n.ns).LinkByName(cni.HostVethName(p.rt.ContainerID, "eth0")); err == nil {
		t.Error("failed ADD left the node veth")
	}
	if _, err := nl(t, p.ns).LinkByName("eth0"); err == nil {
		t.Error("failed ADD left eth0 in the pod")
	}
}

func TestExhausted(t *testing.T) {
	t.Parallel()
	env := ipv4Env()
	env.Subnet = netip.MustParsePrefix("10.244.1.1/29") // 5 pod addresses
	n := newNode(t, &env)
	l := n.list(t, "1.1.0", cni.NetConf{})
	for range 5 {
		n.mustAdd(t, l, newPod(t))
	}
	_, err := n.add(l, newPod(t))
	if te := cniCode(t, err); te.Code != types.ErrPluginNotAvailable || !strings.Contains(te.Msg, "range 10.244.1.0/29 is full: 5 of 5 addresses allocated") {
		t.Fatalf("sixth ADD: code %d %q, want 50 naming the full range", te.Code, te.Msg)
	}
	if te := cniCode(t, n.status(l)); te.Code != types.ErrPluginNotAvailable || !strings.Contains(te.Msg, "is full") {
		t.Fatalf("STATUS of a full node: code %d %q, want 50", te.Code, te.Msg)
	}
}

// Callers of older spec versions get results in their version, and CHECK
// and DEL work for them.
func TestOlderCallers(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"0.4.0", "1.0.0"} {
		t.Run(v, func(t *testing.T) {
			env := ipv4Env()
			n := newNode(t, &env)
			l := n.list(t, v, cni.NetConf{})
			p := newPod(t)
			res, err := n.add(l, p)
			if err != nil {
				t.Fatal(err)
			}
			if res.Version() != v {
				t.Fatalf("result version %s, want %s", res.Version(), v)
			}
			var wire struct {
				CNIVersion string `json:"cniVersion"`
				IPs        []struct {
					Address string `json:"address"`
				} `json:"ips"`
			}
			var buf bytes.Buffer
			if err := res.PrintTo(&buf); err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(buf.Bytes(), &wire); err != nil || wire.CNIVersion != v || len(wire.IPs) != 1 ||
				!strings.HasPrefix(wire.IPs[0].Address, "10.244.1.") {
				t.Fatalf("result %s (%v): want version %s with a 10.244.1.x address", buf.String(), err, v)
			}
			if err := n.check(l, p); err != nil {
				t.Fatalf("CHECK: %v", err)
			}
			if err := n.del(l, p); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if files := n.ipFiles(t); len(files) != 0 {
				t.Errorf("after DEL the store holds %v", files)
			}
		})
	}
}

// loom-cni first in a list, a chained plugin after it (where portmap goes):
// the chained plugin receives our result as prevResult.
func TestChained(t *testing.T) {
	t.Parallel()
	env := ipv4Env()
	n := newNode(t, &env)
	l := n.list(t, "1.1.0", cni.NetConf{}, map[string]any{"type": echo, "recordDir": n.recordDir})
	p := newPod(t)
	res := n.mustAdd(t, l, p)
	addr := podAddr(t, res, true)

	data, err := os.ReadFile(filepath.Join(n.recordDir, p.rt.ContainerID))
	if err != nil {
		t.Fatalf("chained plugin was not called: %v", err)
	}
	var got struct {
		PrevResult *current.Result `json:"prevResult"`
	}
	if err := json.Unmarshal(data, &got); err != nil || got.PrevResult == nil {
		t.Fatalf("chained plugin got %s (%v), want a prevResult", data, err)
	}
	if len(got.PrevResult.IPs) != 1 || got.PrevResult.IPs[0].Address.String() != addr.String() ||
		len(got.PrevResult.Interfaces) != 3 || got.PrevResult.Interfaces[2].Sandbox != p.rt.NetNS {
		t.Fatalf("prevResult %s, want our address %v and the pod interface", data, addr)
	}
	if err := n.check(l, p); err != nil {
		t.Fatalf("CHECK of the list: %v", err)
	}
	if err := n.del(l, p); err != nil {
		t.Fatalf("DEL of the list: %v", err)
	}
}

// Dual stack with every option away from its default.
func TestDualStackOptions(t *testing.T) {
	t.Parallel()
	env := dualEnv()
	n := newNode(t, &env)
	no := false
	l := n.list(t, "1.1.0", cni.NetConf{MTU: 1400, HairpinMode: &no, IsDefaultGateway: &no})
	p := newPod(t)
	res := n.mustAdd(t, l, p)
	v4, v6 := podAddr(t, res, true), podAddr(t, res, false)
	if !netip.MustParsePrefix("fc00:0:0:1::/64").Contains(v6.Addr()) || v6.Bits() != 64 {
		t.Fatalf("pod got IPv6 %v, want an address of fc00:0:0:1::/64", v6)
	}
	var routes []string
	for _, r := range res.Routes {
		routes = append(routes, r.Dst.String()+" via "+r.GW.String())
	}
	if want := []string{"10.244.0.0/16 via 10.244.1.1", "fc00::/48 via fc00:0:0:1::1"}; !slices.Equal(routes, want) {
		t.Errorf("routes %q, want %q (no default route)", routes, want)
	}

	podNL := nl(t, p.ns)
	eth0, err := podNL.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if eth0.Attrs().MTU != 1400 {
		t.Errorf("pod MTU %d, want the configured 1400", eth0.Attrs().MTU)
	}
	kernelRoutes, err := podNL.RouteList(eth0, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range kernelRoutes {
		if r.Gw != nil && (r.Dst == nil || r.Dst.IP.IsUnspecified()) {
			t.Errorf("pod has a default route %v with isDefaultGateway false", r)
		}
	}
	nodeNL := nl(t, n.ns)
	hostVeth, err := nodeNL.LinkByName(res.Interfaces[1].Name)
	if err != nil {
		t.Fatal(err)
	}
	if pi, err := nodeNL.LinkGetProtinfo(hostVeth); err != nil || pi.Hairpin {
		t.Errorf("node veth protinfo %+v, %v: want hairpin off", pi, err)
	}
	if _, err := os.Stat(filepath.Join(n.dataDir, netName, "last_reserved_ip.1")); err != nil {
		t.Errorf("IPv6 range has no last_reserved_ip.1: %v", err)
	}

	reach(t, n, p, netip.MustParseAddr("10.244.1.1"), v4.Addr())
	reach(t, n, p, netip.MustParseAddr("fc00:0:0:1::1"), v6.Addr())

	if err := n.check(l, p); err != nil {
		t.Fatalf("CHECK: %v", err)
	}
	if err := n.del(l, p); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if files := n.ipFiles(t); len(files) != 0 {
		t.Errorf("after DEL the store holds %v", files)
	}
}

// The node moved to another subnet (its lease was lost and re-taken): the
// next ADD replaces the stale gateway on cni0 instead of failing the way
// flannel's bridge plugin does.
func TestSubnetChange(t *testing.T) {
	t.Parallel()
	env := ipv4Env()
	n := newNode(t, &env)
	l := n.list(t, "1.1.0", cni.NetConf{})
	first := newPod(t)
	n.mustAdd(t, l, first)
	if err := n.del(l, first); err != nil {
		t.Fatal(err)
	}
	env.Subnet = netip.MustParsePrefix("10.244.7.1/24")
	n.writeEnv(t, env)
	p := newPod(t)
	res := n.mustAdd(t, l, p)
	addr := podAddr(t, res, true)
	if !netip.MustParsePrefix("10.244.7.0/24").Contains(addr.Addr()) {
		t.Fatalf("pod got %v after the subnet moved to 10.244.7.0/24", addr)
	}
	nodeNL := nl(t, n.ns)
	br, err := nodeNL.LinkByName("cni0")
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := nodeNL.AddrList(br, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.244.7.1/24" {
		t.Fatalf("cni0 has %v, want only 10.244.7.1/24", addrs)
	}
	reach(t, n, p, netip.MustParseAddr("10.244.7.1"), addr.Addr())
}
