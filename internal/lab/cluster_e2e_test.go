package lab

// The lab with --store cluster: a real 3-member etcd cluster (Debian's
// etcd-server) with TLS and client certificates, in namespaces s1..s3 on
// the underlay bridge (198.18.0.2-4); nodes and pods as in lab_e2e_test.go.

import (
	"context"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// etcd promises that a cluster survives the loss of a minority of its
// members and stops taking writes without a majority; loom passes that on
// to pods: the leader is killed, then a second member, and pods on
// different nodes never lose a probe, no lease changes, /readyz stays
// ready; when the members return, writes resume, an agent's re-claim
// included.
func TestClusterStoreMemberLoss(t *testing.T) {
	l := upLab(t, Options{Name: "tclu", Nodes: 3, Pods: 1, Store: "cluster"})
	mustCheck(t, l, l.Matrix()) // agents reach the store over TLS with client certificates
	for _, n := range l.Nodes {
		for _, want := range []string{"--etcd-cafile", "--etcd-certfile", "--etcd-keyfile", "https://"} {
			if !strings.Contains(strings.Join(l.AgentArgs(n.Name), " "), want) {
				t.Fatalf("agent of %s runs without %s: %v", n.Name, want, l.AgentArgs(n.Name))
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	tr := startTraffic(t, l, ring(l)...)
	leasesBefore, pathBefore := storeLeases(t, l), dataPath(t, l)
	cli := etcdClient(t, l)
	write := func(timeout time.Duration) error {
		wctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		_, err := cli.Put(wctx, "/loom-lab-test/write", time.Now().String())
		return err
	}

	leader, err := l.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.StopMember(leader, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the two members left elect a leader", func() bool {
		now, err := l.Leader(ctx)
		return err == nil && now != leader
	})
	if err := write(10 * time.Second); err != nil {
		t.Fatalf("write with two of three members: %v", err)
	}
	time.Sleep(6 * time.Second) // a resync with the leader gone
	sameMap(t, "data path after the leader was killed", pathBefore, dataPath(t, l))

	var second string
	for _, m := range l.Members {
		if m.Name != leader {
			second = m.Name
			break
		}
	}
	if err := l.StopMember(second, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for _, n := range l.Nodes {
		waitFor(t, time.Minute, n.Name+" reports the store unreachable (no quorum)", func() bool {
			return metric(t, l, n.Name, "loom_store_reachable") == "0"
		})
	}
	if err := write(2 * time.Second); err == nil {
		t.Fatal("a write succeeded with one member of three")
	}
	time.Sleep(6 * time.Second) // a resync without quorum
	for _, n := range l.Nodes {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := l.WaitReady(rctx, n.Name); err != nil {
			t.Errorf("%s not ready without quorum (its data path is fine): %v", n.Name, err)
		}
		cancel()
	}
	sameMap(t, "data path without quorum", pathBefore, dataPath(t, l))

	for _, name := range []string{second, leader} {
		if err := l.StartMember(name); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, time.Minute, "writes resume", func() bool { return write(5*time.Second) == nil })
	for _, n := range l.Nodes {
		waitFor(t, time.Minute, n.Name+" reports the store reachable", func() bool {
			return metric(t, l, n.Name, "loom_store_reachable") == "1"
		})
	}
	leasesAfter := storeLeases(t, l)
	for k, v := range leasesBefore {
		if leasesAfter[k] != v {
			t.Errorf("lease %s changed across the member losses:\nbefore %+v\nafter  %+v", k, v, leasesAfter[k])
		}
		ttl, err := cli.TimeToLive(ctx, clientv3.LeaseID(v.EtcdLease))
		if err != nil || ttl.TTL <= 0 {
			t.Errorf("etcd lease of %s (%s): TTL %v, %v; want it alive", k, v.NodeName, ttl, err)
		}
	}
	// An agent's own write: n2's key is deleted, n2 claims it again.
	key, old := leaseOf(t, l, "n2")
	if _, err := cli.Delete(ctx, registryPrefix+"/subnets/"+key); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "n2 re-claims its subnet", func() bool {
		k, now, ok := findLease(t, l, "n2")
		return ok && k == key && now.EtcdLease != old.EtcdLease
	})
	time.Sleep(6 * time.Second) // past the peers' removal delay
	tr.expectNoLoss("leader and a second member killed, then back")
	sameMap(t, "data path after the members came back", pathBefore, dataPath(t, l))
	if !slices.ContainsFunc(l.Members, func(m Member) bool { return l.MemberAlive(m.Name) }) {
		t.Fatal("no member running at the end")
	}
	mustCheck(t, l, l.Matrix())
}
