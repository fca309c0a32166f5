package lab

// Faults for reliability tests, beyond the doctor scenarios of break.go:
// the store stopped, wiped or cut off from one node, and a node rebooted.
// Each acts only inside lab namespaces and on the lab's state directory.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"

	"github.com/loomnet/loom/internal/netns"
)

// StopStore sends sig to the store (loom store, or every etcd member) and
// waits until it is gone.
func (l *Lab) StopStore(sig syscall.Signal) error {
	if l.Opts.Store == "cluster" {
		var errs []error
		for _, m := range l.Members {
			errs = append(errs, l.StopMember(m.Name, sig))
		}
		return errors.Join(errs...)
	}
	return stopIn(l.RouterNS(), "store", "store", sig)
}

// StartStore starts whatever part of the store is not running and waits
// until it serves (and holds the network config).
func (l *Lab) StartStore(ctx context.Context) error {
	if err := l.startStore(); err != nil {
		return err
	}
	return l.waitStore(ctx)
}

// storeRunning reports whether every part of the store runs.
func (l *Lab) storeRunning() bool {
	if l.Opts.Store == "cluster" {
		for _, m := range l.Members {
			if !l.MemberAlive(m.Name) {
				return false
			}
		}
		return true
	}
	return l.recordedAlive("store")
}

// WipeStore kills the store, deletes its data (every member's, with
// --store cluster) and starts it again empty but for the network config,
// as after a lost disk restored from nothing.
func (l *Lab) WipeStore(ctx context.Context) error {
	if err := l.StopStore(syscall.SIGKILL); err != nil {
		return err
	}
	dirs := []string{filepath.Join(l.dir(), "store")}
	if l.Opts.Store == "cluster" {
		dirs = nil
		for _, m := range l.Members {
			dirs = append(dirs, filepath.Join(l.dir(), "store-"+m.Name))
		}
	}
	for _, d := range dirs {
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("wipe store data %s: %w", d, err)
		}
	}
	return l.StartStore(ctx)
}

// partitionTable is the nftables table PartitionFromStore adds to a node.
const partitionTable = "loomlab-partition"

// PartitionFromStore cuts node off from the store: its packets to the
// store's client port are dropped (not refused, so connections hang as
// they do when a network partitions), and nothing else changes: pods and
// peers still reach the node. HealPartition undoes it.
func (l *Lab) PartitionFromStore(ctx context.Context, node string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	for _, args := range [][]string{
		{"nft", "add", "table", "inet", partitionTable},
		{"nft", "add", "chain", "inet", partitionTable, "out", "{ type filter hook output priority 0; policy accept; }"},
		{"nft", "add", "rule", "inet", partitionTable, "out", "tcp", "dport", strconv.Itoa(storePort), "drop"},
	} {
		if err := runIn(ctx, n.NS, args...); err != nil {
			_ = l.HealPartition(ctx, node)
			return fmt.Errorf("partition %s from the store: %w", node, err)
		}
	}
	return nil
}

// HealPartition lets node reach the store again.
func (l *Lab) HealPartition(ctx context.Context, node string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	out, err := outputIn(ctx, n.NS, "nft", "list", "tables")
	if err != nil {
		return err
	}
	if !slices.Contains(splitLines(out), "table inet "+partitionTable) {
		return nil
	}
	return runIn(ctx, n.NS, "nft", "delete", "table", "inet", partitionTable)
}

// RebootNode does to node what a power cycle does: the agent dies (kill
// -9), the node's network namespace goes with every interface, address,
// route, neighbour and rule in it, and its pods with it; /run is empty
// afterwards (subnet.env is gone) while /var/lib survives (the agent's
// state directory, the IPAM store, the runtime's CNI cache). Then the node
// comes back: the namespace is rebuilt with the same eth0 (address and
// MAC, as a real NIC), the agent starts, and, once it is ready, the
// runtime cleans up its dead sandboxes (CNI GC with no valid attachment)
// and creates the pods again through loom-cni, under their old names.
func (l *Lab) RebootNode(ctx context.Context, node string) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	if err := l.StopAgent(node, syscall.SIGKILL); err != nil {
		return err
	}
	if err := killAll([]string{n.NS}); err != nil { // anything else running there
		return err
	}
	pods := n.Pods
	n.Pods = nil
	for _, p := range pods {
		if err := netns.Delete(p.NS); err != nil {
			return err
		}
	}
	if err := netns.Delete(n.NS); err != nil {
		return err
	}
	if err := os.Remove(l.SubnetFile(node)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := l.save(); err != nil {
		return err
	}

	r, err := openHandle(l.RouterNS())
	if err != nil {
		return err
	}
	defer r.Close()
	// A namespace is torn down asynchronously: wait for the router's end
	// of the node's old cable before plugging in the new one.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := r.LinkByName(n.Name); errors.As(err, new(netlink.LinkNotFoundError)) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("reboot %s: the router still has its old port %s", node, n.Name)
		}
		time.Sleep(50 * time.Millisecond)
	}
	bridge := int(n.Underlay.Addr().As4()[2])
	if err := l.buildNode(r, *n, bridge); err != nil {
		return fmt.Errorf("reboot %s: %w", node, err)
	}
	if err := l.StartAgent(node); err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	if err := l.WaitReady(rctx, node); err != nil {
		return err
	}
	if err := l.gcPods(ctx, node, nil); err != nil {
		return err
	}
	for _, p := range pods {
		if _, err := l.AddPod(ctx, node, p.Name); err != nil {
			return err
		}
	}
	return nil
}

// gcPods is a runtime's CNI GC on node: every attachment not in valid is
// released.
func (l *Lab) gcPods(ctx context.Context, node string, valid []Pod) error {
	n, err := l.Node(node)
	if err != nil {
		return err
	}
	list, cninet, err := l.cniConfig(node)
	if err != nil {
		return err
	}
	args := &libcni.GCArgs{}
	for _, p := range valid {
		rt := l.runtimeConf(p)
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: rt.ContainerID, IfName: rt.IfName})
	}
	return netns.Do(n.NS, func() error { return cninet.GCNetworkList(ctx, list, args) })
}

func splitLines(s string) []string {
	var out []string
	for line := range strings.Lines(s) {
		out = append(out, strings.TrimSpace(line))
	}
	return out
}
