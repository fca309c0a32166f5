package cni_test

// No lost IPs: loom-cni killed in the middle of an ADD, after it reserved
// an address and before it made the pod's interface, leaves an allocation
// with no pod. The runtime's next step frees it: the DEL it sends for a
// failed ADD, or, when it forgot the sandbox, a GC with the attachments it
// knows; an ADD it retries instead gets that same address. Topology and
// address plan as in cni_test.go.
//
// How the test stops the real plugin at exactly that point, without a test
// hook in the plugin: the IPAM store's last_reserved_ip.0 is replaced by a
// named pipe. The plugin reads it before reserving (the test lets that
// read through with an empty write), creates the address file with O_EXCL,
// then opens the pipe to record the address and blocks, since nobody
// reads. The test waits for the address file and sends SIGKILL.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/loomnet/loom/internal/cni"
	"github.com/loomnet/loom/internal/ipam"
)

func TestCrashMidAddLeaksNoAddress(t *testing.T) {
	t.Parallel()
	env := ipv4Env()
	n := newNode(t, &env)
	l := n.list(t, "1.1.0", cni.NetConf{})
	alive := newPod(t)
	n.mustAdd(t, l, alive) // creates the store and its last_reserved_ip.0

	crash := func(t *testing.T, p *pod) string {
		t.Helper()
		before := n.ipFiles(t)
		hint := filepath.Join(n.dataDir, netName, "last_reserved_ip.0")
		if err := os.Remove(hint); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if err := syscall.Mkfifo(hint, 0o600); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(hint) // a pipe left there would block every later ADD

		stdin := fmt.Sprintf(`{"cniVersion":"1.1.0","name":%q,"type":%q,"subnetFile":%q,"dataDir":%q}`,
			netName, cni.PluginType, n.subnetFile, n.dataDir)
		cmd := exec.Command(filepath.Join(pluginDir, cni.PluginType))
		cmd.Env = []string{"CNI_COMMAND=ADD", "CNI_CONTAINERID=" + p.rt.ContainerID, "CNI_NETNS=" + p.rt.NetNS,
			"CNI_IFNAME=" + p.rt.IfName, "CNI_PATH=" + pluginDir}
		stdinPipe, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		// Started from the node's namespace, as a runtime starts it.
		if err := n.in(cmd.Start); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() { _ = cmd.Process.Kill() })
		if _, err := stdinPipe.Write([]byte(stdin)); err != nil {
			t.Fatal(err)
		}
		stdinPipe.Close()

		// Let the read of the hint through: open blocks until the plugin
		// opens the pipe to read; closing at once gives it an empty hint.
		opened := make(chan error, 1)
		go func() {
			f, err := os.OpenFile(hint, os.O_WRONLY, 0)
			if err == nil {
				f.Close()
			}
			opened <- err
		}()
		select {
		case err := <-opened:
			if err != nil {
				t.Fatal(err)
			}
		case err := <-exited:
			t.Fatalf("plugin exited before reading the reservation hint: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("plugin never read the reservation hint")
		}

		// Wait for the reservation, then kill the plugin while it blocks.
		var reserved string
		deadline := time.Now().Add(30 * time.Second)
		for reserved == "" {
			for _, ip := range n.ipFiles(t) {
				if !slices.Contains(before, ip) {
					reserved = ip
				}
			}
			select {
			case err := <-exited:
				t.Fatalf("plugin exited instead of blocking after the reservation: %v", err)
			default:
			}
			if time.Now().After(deadline) {
				t.Fatal("plugin reserved no address")
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-exited

		// The crash left what it is meant to: an address, no interface.
		if _, err := nl(t, n.ns).LinkByName(cni.HostVethName(p.rt.ContainerID, p.rt.IfName)); err == nil {
			t.Fatal("the plugin got as far as the veth; the test did not stop it where it should")
		}
		owner := ""
		for _, al := range n.allocated(t) {
			if al.IP.String() == reserved {
				owner = al.ContainerID
			}
		}
		if owner != p.rt.ContainerID {
			t.Fatalf("leaked %s belongs to %q, want the killed ADD's %s", reserved, owner, p.rt.ContainerID)
		}
		return reserved
	}

	t.Run("DEL after the failed ADD frees it", func(t *testing.T) {
		p := newPod(t)
		leaked := crash(t, p)
		if err := n.del(l, p); err != nil {
			t.Fatalf("DEL after the crash: %v", err)
		}
		if slices.Contains(n.ipFiles(t), leaked) {
			t.Fatalf("%s still allocated after DEL", leaked)
		}
	})
	t.Run("a retried ADD reuses it", func(t *testing.T) {
		p := newPod(t)
		leaked := crash(t, p)
		got := podAddr(t, n.mustAdd(t, l, p), true).Addr()
		if got.String() != leaked {
			t.Fatalf("retried ADD got %s, want the address the killed ADD reserved, %s", got, leaked)
		}
		held := 0
		for _, al := range n.allocated(t) {
			if al.ContainerID == p.rt.ContainerID {
				held++
			}
		}
		if held != 1 {
			t.Fatalf("after the retry the pod holds %d addresses, want 1", held)
		}
		if err := n.del(l, p); err != nil {
			t.Fatalf("DEL: %v", err)
		}
	})
	t.Run("GC with the runtime's attachments frees it", func(t *testing.T) {
		p := newPod(t)
		leaked := crash(t, p)
		forgetful := newRuntime(t.TempDir()) // a runtime that lost its state
		err := n.in(func() error {
			return forgetful.GCNetworkList(context.Background(), l, &libcni.GCArgs{
				ValidAttachments: []types.GCAttachment{{ContainerID: alive.rt.ContainerID, IfName: alive.rt.IfName}},
			})
		})
		if err != nil {
			t.Fatalf("GC: %v", err)
		}
		if slices.Contains(n.ipFiles(t), leaked) {
			t.Fatalf("%s still allocated after GC", leaked)
		}
	})

	// Only the live pod holds an address, it is intact, and a new pod gets
	// one without conflict. The killed ADDs' attachment files went with
	// their addresses.
	if all := n.allocated(t); len(all) != 1 || all[0].ContainerID != alive.rt.ContainerID {
		t.Fatalf("store holds %v, want only the live pod's address", all)
	}
	if files := n.attachmentFiles(t); len(files) != 1 {
		t.Fatalf("store holds attachment files %v, want only the live pod's", files)
	}
	if err := n.check(l, alive); err != nil {
		t.Fatalf("CHECK of the live pod: %v", err)
	}
	fresh := newPod(t)
	got := podAddr(t, n.mustAdd(t, l, fresh), true).Addr()
	all := n.allocated(t)
	if len(all) != 2 || all[0].IP == all[1].IP || !slices.ContainsFunc(all, func(al ipam.Allocation) bool {
		return al.IP == got && al.ContainerID == fresh.rt.ContainerID
	}) {
		t.Fatalf("after a new ADD the store holds %v, want the live pod's and the new pod's %s", all, got)
	}
}
