package kubecp

// Address plan: one namespace loomt-kcp-<random> standing in for a lab's
// router, with 198.18.0.1/32 on its loopback; an embedded loom store on
// 127.0.0.1:2379/2380 inside it. Nothing is added to the test's own
// namespace.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/storeserver"
	"github.com/loomnet/loom/internal/testnet"
)

// TestPlanInNamespace runs a plan the way the lab does: Prepare for the
// router's underlay address, a loom store inside the namespace as etcd, the
// processes started with `ip netns exec`, and Wait and Kubectl reaching them
// from the test's namespace through the router's.
func TestPlanInNamespace(t *testing.T) {
	testnet.RequireRoot(t)
	dir := t.TempDir()

	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	ns := testnet.Prefix + "kcp-" + hex.EncodeToString(b)
	if err := netns.Create(ns); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := netns.Delete(ns); err != nil {
			t.Error(err)
		}
	})
	if out, err := exec.Command("ip", "-n", ns, "addr", "add", "198.18.0.1/32", "dev", "lo").CombinedOutput(); err != nil {
		t.Fatalf("address the router stand-in: %v\n%s", err, out)
	}

	if _, err := Prepare(Config{
		Dir:         filepath.Join(dir, "kube"),
		Address:     netip.MustParseAddr("198.18.0.1"),
		EtcdServers: []string{"http://127.0.0.1:2379"},
		ClusterCIDR: clusterCIDR,
	}); err != nil {
		t.Fatal(err)
	}
	// `loom lab up` prepares, later lab commands load.
	p, err := Load(filepath.Join(dir, "kube"))
	if err != nil {
		t.Fatal(err)
	}
	p.Config.DialContext = netns.Dialer{NS: ns}.DialContext
	// The children machinery of Start, with `ip netns exec` in front: the
	// lab's daemons are started the same way.
	cp := &ControlPlane{Plan: p}
	t.Cleanup(cp.Stop)
	in := func(c Command) Command {
		return Command{Bin: "ip", Args: append([]string{"netns", "exec", ns, c.Bin}, c.Args...)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The lab's loom store, in process: its listeners are opened inside
	// the namespace and keep it.
	err = netns.Do(ns, func() error {
		var err error
		cp.etcd, err = storeserver.Start(ctx, storeserver.Config{
			Listen:     "http://127.0.0.1:2379",
			PeerListen: "http://127.0.0.1:2380",
			DataDir:    filepath.Join(dir, "store"),
			Logger:     slog.New(slog.DiscardHandler),
		})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	api, err := cp.startChild("kube-apiserver", in(p.APIServer))
	if err != nil {
		t.Fatal(err)
	}
	if err := api.whileAlive(ctx, p.WaitAPIServer); err != nil {
		t.Fatal(err)
	}
	cm, err := cp.startChild("kube-controller-manager", in(p.ControllerManager))
	if err != nil {
		t.Fatal(err)
	}
	if err := cm.whileAlive(ctx, p.Wait); err != nil {
		t.Fatal(err)
	}

	// A routable advertise address: the apiserver publishes itself as the
	// "kubernetes" Service's endpoint, which pods reach it by.
	out, err := p.Kubectl(ctx, ns, "get", "endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=kubernetes",
		"-o", "jsonpath={.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != "198.18.0.1:6443" {
		t.Errorf("kubernetes Service endpoint %q, want 198.18.0.1:6443", got)
	}
	if _, err := p.Apply(ctx, ns, nodeManifest("lab-n1", "198.18.0.11")); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool {
		out, err := p.Kubectl(ctx, ns, "get", "node", "lab-n1", "-o", "jsonpath={.spec.podCIDR}")
		return err == nil && strings.HasPrefix(string(out), "10.244.")
	}) {
		t.Fatal("node lab-n1 got no podCIDR within 5s")
	}
}
