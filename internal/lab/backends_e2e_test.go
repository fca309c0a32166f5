package lab

// End-to-end tests of every backend on both underlays: the full
// connectivity matrix, an agent restart that must not disturb pods or
// peers, and a deleted overlay device that must heal. Address plan as in
// lab_e2e_test.go.

import (
	"bytes"
	"context"
	"fmt"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sys/unix"
)

// overlayDevice is the device each backend owns on a node ("" = none).
var overlayDevice = map[string]string{"host-gw": "", "vxlan": "flannel.1", "udp": "flannel0"}

func TestBackends(t *testing.T) {
	for _, backend := range []string{"host-gw", "vxlan", "udp"} {
		for _, underlay := range []string{"flat", "routed"} {
			name := strings.ReplaceAll(backend, "-", "")[:2] + underlay[:1]
			t.Run(backend+"/"+underlay, func(t *testing.T) {
				l := upLab(t, Options{Name: "b" + name, Nodes: 3, Pods: 2, Backend: backend, Underlay: underlay})
				mustCheck(t, l, l.Matrix())
				restartKeepsPeersAndPods(t, l)
				if dev := overlayDevice[backend]; dev != "" {
					deletedDeviceHeals(t, l, dev)
				}
			})
		}
	}
}

// leaseValues reads every lease value from the store, by key.
func leaseValues(t *testing.T, l *Lab) map[string]string {
	t.Helper()
	c := etcdClient(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := c.Get(ctx, "/coreos.com/network/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = string(kv.Value)
	}
	return out
}

// fdb lists the permanent FDB entries on the node's flannel.1 ("" when the
// node has no such device).
func fdb(t *testing.T, l *Lab, node string) string {
	t.Helper()
	n, _ := l.Node(node)
	h, err := openHandle(n.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	link, err := h.LinkByName("flannel.1")
	if err != nil {
		return ""
	}
	entries, err := h.NeighList(link.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, e := range entries {
		if e.State&netlink.NUD_PERMANENT != 0 && e.IP != nil {
			lines = append(lines, fmt.Sprintf("%s dst %s", e.HardwareAddr, e.IP))
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// restartKeepsPeersAndPods restarts n1's agent: its pods keep working while
// it is down, and afterwards its lease (subnet, VtepMAC, public IP) and the
// peers' FDB entries for it are exactly what they were.
func restartKeepsPeersAndPods(t *testing.T, l *Lab) {
	t.Helper()
	leasesBefore := leaseValues(t, l)
	fdbBefore := fdb(t, l, "n2")
	if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Kernel data paths outlive the agent; the udp backend's data path is
	// the agent itself (as flannel's udp is flanneld), so its pods wait for
	// the restart.
	if l.Opts.Backend != "udp" {
		mustCheck(t, l, rowsFor(l.Matrix(), "n1-p1"))
	}
	if err := l.StartAgent("n1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := l.WaitReady(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	if after := leaseValues(t, l); fmt.Sprint(after) != fmt.Sprint(leasesBefore) {
		t.Fatalf("leases changed across an agent restart:\nbefore %v\nafter  %v", leasesBefore, after)
	}
	if after := fdb(t, l, "n2"); after != fdbBefore {
		t.Fatalf("n2's FDB changed across n1's restart:\nbefore\n%s\nafter\n%s", fdbBefore, after)
	}
	mustCheck(t, l, l.Matrix())
}

// deletedDeviceHeals deletes n1's overlay device by hand and waits until
// every row involving n1's pods is green again; that must take no more
// than one resync (5 s) plus slack for a busy machine.
func deletedDeviceHeals(t *testing.T, l *Lab, dev string) {
	t.Helper()
	n1, _ := l.Node("n1")
	h, err := openHandle(n1.NS)
	if err != nil {
		t.Fatal(err)
	}
	link, err := h.LinkByName(dev)
	if err != nil {
		h.Close()
		t.Fatalf("n1 has no %s: %v", dev, err)
	}
	if err := h.LinkDel(link); err != nil {
		h.Close()
		t.Fatal(err)
	}
	h.Close()
	rows := rowsFor(l.Matrix(), "n1-p1")
	deadline := time.Now().Add(5*time.Second + 5*time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		got, err := l.Check(ctx, rows)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if PrintMatrix(&buf, got) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s deleted on n1: not healed within one resync:\n%s", dev, buf.String())
		}
		time.Sleep(200 * time.Millisecond)
	}
}
