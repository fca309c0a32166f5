package lab

// Reliability end-to-end tests (issue #6): faults of the store, the agent,
// the node and the registry's content, each injected into a running lab
// while pods on different nodes probe each other every 100 ms. Where a
// fault must not touch the data path, not one probe may go unanswered, and
// no node's subnet may change. Address plan as in lab_e2e_test.go
// (underlay 198.18.0.0/24, pods 10.244.0.0/16); hostile leases written by
// the tests point at 10.244.190-199.0/24, 10.99.0.0/24 and 127.0.0.0/8.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/loomnet/loom/internal/subnetenv"
)

// ring is the cross-node probing of a lab with one pod per node: each
// node's pod probes the next node's, around the ring.
func ring(l *Lab, skip ...string) []flow {
	var nodes []Node
	for _, n := range l.Nodes {
		if !slices.Contains(skip, n.Name) && len(n.Pods) > 0 {
			nodes = append(nodes, n)
		}
	}
	var flows []flow
	for i, n := range nodes {
		next := nodes[(i+1)%len(nodes)]
		if next.Name != n.Name {
			flows = append(flows, flow{from: n.Pods[0].Name, to: next.Pods[0].Name})
		}
	}
	return flows
}

// storeLease is a lease as etcd holds it, with what would show churn.
type storeLease struct {
	Value          string
	Create, Mod    int64
	EtcdLease      int64
	NodeName       string
	BackendVtepMAC string
}

// storeLeases reads every lease from the store, by key.
func storeLeases(t *testing.T, l *Lab) map[string]storeLease {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := etcdClient(t, l).Get(ctx, registryPrefix+"/subnets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]storeLease{}
	for _, kv := range resp.Kvs {
		var v struct {
			NodeName    string
			BackendData struct{ VtepMAC string }
		}
		_ = json.Unmarshal(kv.Value, &v)
		out[filepath.Base(string(kv.Key))] = storeLease{Value: string(kv.Value), Create: kv.CreateRevision, Mod: kv.ModRevision,
			EtcdLease: kv.Lease, NodeName: v.NodeName, BackendVtepMAC: v.BackendData.VtepMAC}
	}
	return out
}

// leaseOf returns node's lease key and lease from the store.
func leaseOf(t *testing.T, l *Lab, node string) (string, storeLease) {
	t.Helper()
	k, v, ok := findLease(t, l, node)
	if !ok {
		t.Fatalf("no lease of %s in the store", node)
	}
	return k, v
}

func findLease(t *testing.T, l *Lab, node string) (string, storeLease, bool) {
	t.Helper()
	for k, v := range storeLeases(t, l) {
		if v.NodeName == node {
			return k, v, true
		}
	}
	return "", storeLease{}, false
}

// dataPath is every node's routes, permanent neighbours and permanent FDB
// entries: what a fault that must not touch the data path must leave.
func dataPath(t *testing.T, l *Lab) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out := map[string]string{}
	for _, n := range l.Nodes {
		for _, c := range [][]string{
			{"ip", "-4", "route", "show", "table", "main"},
			{"ip", "neigh", "show", "nud", "permanent"},
			{"bridge", "fdb", "show", "dev", "flannel.1"},
		} {
			s, err := outputIn(ctx, n.NS, c...)
			if err != nil {
				t.Fatal(err)
			}
			var keep []string
			for line := range strings.Lines(s) {
				if c[0] != "bridge" || strings.Contains(line, "permanent") {
					keep = append(keep, strings.TrimSpace(line))
				}
			}
			out[n.Name+": "+strings.Join(c, " ")] = strings.Join(keep, "\n")
		}
	}
	return out
}

func sameMap(t *testing.T, what string, before, after map[string]string) {
	t.Helper()
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s changed: %s\nbefore:\n%s\nafter:\n%s", what, k, v, after[k])
		}
	}
}

// metric reads one sample of node's /metrics, e.g. `loom_store_reachable`.
func metric(t *testing.T, l *Lab, node, sample string) string {
	t.Helper()
	for line := range strings.Lines(httpGet(t, l, node, "/metrics")) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), sample+" "); ok {
			return v
		}
	}
	return ""
}

// waitFor polls cond every 200 ms until it holds, failing after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func agentLog(t *testing.T, l *Lab, node string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(l.NodeDir(node), "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func agentPID(t *testing.T, l *Lab, node string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(l.dir(), "agent-"+node+".pid"))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func waitAllReady(t *testing.T, l *Lab) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := l.waitAllReady(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
}

// Faults that must not touch the data path, one after the other on one
// lab (3 nodes, vxlan, one pod each): not one probe between pods on
// different nodes may go unanswered, and no node's subnet may change.
func TestFaultsKeepPodsConnected(t *testing.T) {
	l := upLab(t, Options{Name: "trel", Nodes: 3, Pods: 1})
	subnetsBefore := subnets(t, l)
	defer func() {
		if t.Failed() {
			return
		}
		if after := subnets(t, l); fmt.Sprint(after) != fmt.Sprint(subnetsBefore) {
			t.Errorf("subnets changed: before %v, after %v", subnetsBefore, after)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	// The instrument first: a real outage (n2 drops the VXLAN packets it
	// sends, for a second) must show as lost probes, or a zero below
	// would mean nothing.
	t.Run("control: the probe counts a real outage", func(t *testing.T) {
		tr := startTraffic(t, l, ring(l)...)
		time.Sleep(time.Second)
		n2, _ := l.Node("n2")
		for _, args := range [][]string{
			{"nft", "add", "table", "inet", "loomlab-outage"},
			{"nft", "add", "chain", "inet", "loomlab-outage", "out", "{ type filter hook output priority 0; policy accept; }"},
			{"nft", "add", "rule", "inet", "loomlab-outage", "out", "udp", "dport", "8472", "drop"},
		} {
			if err := runIn(ctx, n2.NS, args...); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(time.Second)
		if err := runIn(ctx, n2.NS, "nft", "delete", "table", "inet", "loomlab-outage"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * time.Second)
		sent, lost, _ := tr.stop()
		t.Logf("1 s outage: %d probes, %d lost", sent, lost)
		if lost == 0 {
			t.Fatal("the probe saw no loss during a 1 s outage")
		}
		mustCheck(t, l, l.Matrix())
	})

	// kill -9 loses nothing: the kernel keeps the data path, and the
	// restarted agent takes its own lease over (same subnet, same VTEP
	// MAC), so peers see no change at all.
	t.Run("agent kill -9 and restart", func(t *testing.T) {
		tr := startTraffic(t, l, ring(l)...)
		_, before := leaseOf(t, l, "n1")
		peerFDB := fdb(t, l, "n2")
		if err := l.StopAgent("n1", syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second) // down for a while, pods probing
		if err := l.StartAgent("n1"); err != nil {
			t.Fatal(err)
		}
		waitAllReady(t, l)
		time.Sleep(time.Second)
		tr.expectNoLoss("agent kill -9")
		_, after := leaseOf(t, l, "n1")
		if after.Value != before.Value {
			t.Errorf("n1's lease changed across kill -9:\nbefore %s\nafter  %s", before.Value, after.Value)
		}
		if got := fdb(t, l, "n2"); got != peerFDB {
			t.Errorf("n2's FDB changed:\nbefore\n%s\nafter\n%s", peerFDB, got)
		}
	})

	// An operator deletes the lease key, or revokes its etcd lease: the
	// agent re-claims the same subnet at once instead of exiting, and the
	// peers, which hold a removal back for 5 s, never drop their routes.
	for _, how := range []string{"key deleted", "etcd lease revoked"} {
		t.Run("lease "+how+" by an operator", func(t *testing.T) {
			tr := startTraffic(t, l, ring(l)...)
			pid := agentPID(t, l, "n1")
			key, before := leaseOf(t, l, "n1")
			cli := etcdClient(t, l)
			var err error
			if how == "key deleted" {
				_, err = cli.Delete(ctx, registryPrefix+"/subnets/"+key)
			} else {
				_, err = cli.Revoke(ctx, clientv3.LeaseID(before.EtcdLease))
			}
			if err != nil {
				t.Fatal(err)
			}
			waitFor(t, 30*time.Second, "n1 re-claims its lease", func() bool {
				k, now, ok := findLease(t, l, "n1")
				return ok && k == key && now.EtcdLease != before.EtcdLease
			})
			time.Sleep(7 * time.Second) // past the peers' 5 s removal delay
			tr.expectNoLoss("lease " + how)
			if got := agentPID(t, l, "n1"); got != pid || !l.recordedAlive("agent-n1") {
				t.Errorf("n1's agent exited (pid %s, now %s): it must re-acquire instead", pid, got)
			}
			if !strings.Contains(agentLog(t, l, "n1"), "re-acquiring subnet lease") {
				t.Error("n1's log does not say it re-acquired its lease")
			}
			if v := metric(t, l, "n1", `loom_lease_reacquired_total{subnet="same"}`); v == "" || v == "0" {
				t.Errorf("loom_lease_reacquired_total{subnet=\"same\"} = %q, want at least 1", v)
			}
		})
	}

	// The store is down for longer than several resyncs: the data path
	// stays exactly as it is, /readyz stays ready, and the metric and the
	// log say the store is unreachable; when it is back, no lease is
	// rewritten and no route, neighbour or FDB entry changes.
	t.Run("store down longer than a resync", func(t *testing.T) {
		tr := startTraffic(t, l, ring(l)...)
		leasesBefore, pathBefore := storeLeases(t, l), dataPath(t, l)
		if err := l.StopStore(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for _, n := range l.Nodes {
			waitFor(t, 30*time.Second, n.Name+" reports the store unreachable", func() bool {
				return metric(t, l, n.Name, "loom_store_reachable") == "0"
			})
		}
		time.Sleep(10 * time.Second) // two resyncs with the store gone
		for _, n := range l.Nodes {
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := l.WaitReady(rctx, n.Name)
			cancel()
			if err != nil {
				t.Errorf("%s not ready while the store is down (the data path is fine): %v", n.Name, err)
			}
			if !strings.Contains(agentLog(t, l, n.Name), "store unreachable") {
				t.Errorf("%s's log does not say the store is unreachable", n.Name)
			}
		}
		sameMap(t, "data path while the store is down", pathBefore, dataPath(t, l))
		if err := l.StartStore(ctx); err != nil {
			t.Fatal(err)
		}
		for _, n := range l.Nodes {
			waitFor(t, 60*time.Second, n.Name+" reports the store reachable", func() bool {
				return metric(t, l, n.Name, "loom_store_reachable") == "1"
			})
		}
		time.Sleep(6 * time.Second) // a resync and a removal delay after the return
		tr.expectNoLoss("store down")
		leasesAfter := storeLeases(t, l)
		for k, v := range leasesBefore {
			if leasesAfter[k] != v {
				t.Errorf("lease %s churned across the store outage:\nbefore %+v\nafter  %+v", k, v, leasesAfter[k])
			}
		}
		sameMap(t, "data path after the store came back", pathBefore, dataPath(t, l))
	})

	// The store loses all its data (a disk restored from nothing): every
	// agent notices within 30 s and re-claims its own subnet; peers hold
	// the removals back long enough that no route is dropped meanwhile.
	t.Run("store data wiped", func(t *testing.T) {
		tr := startTraffic(t, l, ring(l)...)
		before := storeLeases(t, l)
		if err := l.WipeStore(ctx); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 2*time.Minute, "every node re-claims its lease", func() bool {
			after := storeLeases(t, l)
			for k, v := range before {
				if after[k].NodeName != v.NodeName || after[k].BackendVtepMAC != v.BackendVtepMAC {
					return false
				}
			}
			return len(after) == len(before)
		})
		waitAllReady(t, l)
		time.Sleep(6 * time.Second)
		tr.expectNoLoss("store data wiped")
	})

	// Hostile and corrupt leases written into the store are skipped with
	// a warning and a metric: no route, neighbour or FDB entry for them
	// anywhere, no agent stops or turns unready, and pods keep talking.
	t.Run("hostile leases", func(t *testing.T) {
		tr := startTraffic(t, l, ring(l)...)
		pathBefore := dataPath(t, l)
		cli := etcdClient(t, l)
		hostile := map[string]string{
			"10.244.190.0-24": `{"PublicIP":`,
			"10.99.0.0-24":    `{"PublicIP":"198.18.0.91","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:91"}}`,
			"10.244.0.0-17":   `{"PublicIP":"198.18.0.92","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:92"}}`,
			"10.244.191.0-24": `{"PublicIP":"0.0.0.0","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:93"}}`,
			"10.244.192.0-24": `{"PublicIP":"127.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:94"}}`,
		}
		for _, s := range subnets(t, l) {
			for k := range hostile {
				if k == strings.Replace(s.String(), "/", "-", 1) {
					t.Fatalf("a node holds %s, which the test means to overwrite", s)
				}
			}
		}
		for k, v := range hostile {
			if _, err := cli.Put(ctx, registryPrefix+"/subnets/"+k, v); err != nil {
				t.Fatal(err)
			}
		}
		defer func() {
			for k := range hostile {
				_, _ = cli.Delete(context.Background(), registryPrefix+"/subnets/"+k)
			}
		}()
		for _, n := range l.Nodes {
			waitFor(t, 90*time.Second, n.Name+" counts the skipped leases", func() bool {
				return metric(t, l, n.Name, `loom_leases_skipped_total{reason="bad-public-ip"}`) == "2" &&
					metric(t, l, n.Name, `loom_leases_skipped_total{reason="bad-subnet"}`) == "1" &&
					metric(t, l, n.Name, `loom_leases_skipped_total{reason="outside-network"}`) == "1" &&
					metric(t, l, n.Name, `loom_leases_skipped_total{reason="undecodable"}`) != "0"
			})
		}
		time.Sleep(6 * time.Second) // a resync later
		bad := regexp.MustCompile(`10\.244\.(0\.0/17|19[0-2]\.0)|10\.99\.|198\.18\.0\.9[1-4]|0e:00:00:00:00:9`)
		for k, v := range dataPath(t, l) {
			if m := bad.FindString(v); m != "" {
				t.Errorf("%s: hostile lease programmed (%s):\n%s", k, m, v)
			}
		}
		sameMap(t, "data path with hostile leases in the store", pathBefore, dataPath(t, l))
		for _, n := range l.Nodes {
			rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := l.WaitReady(rctx, n.Name); err != nil {
				t.Errorf("%s: %v", n.Name, err)
			}
			cancel()
			if !strings.Contains(agentLog(t, l, n.Name), "skipping peer lease") {
				t.Errorf("%s's log does not warn about the hostile leases", n.Name)
			}
		}
		tr.expectNoLoss("hostile leases")
	})

	// A node with a route that overlaps the pod network (a VPN's
	// 10.0.0.0/8) is refused at start, naming the route, before the agent
	// touches anything.
	t.Run("network overlapping a host route is refused", func(t *testing.T) {
		n1, _ := l.Node("n1")
		if err := runIn(ctx, n1.NS, "ip", "route", "add", "10.0.0.0/8", "via", n1.Gateway.String()); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := runIn(context.Background(), n1.NS, "ip", "route", "del", "10.0.0.0/8"); err != nil {
				t.Error(err)
			}
		}()
		dir := t.TempDir()
		args := overrideFlags(l.AgentArgs("n1"), []string{"--node-name", "intruder", "--subnet-file", filepath.Join(dir, "subnet.env"), "--state-dir", dir, "--healthz-port", "0"})
		actx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(actx, "ip", append([]string{"netns", "exec", n1.NS, l.loomBin()}, args...)...).CombinedOutput()
		if err == nil || actx.Err() != nil {
			t.Fatalf("agent started with a route over the pod network (err %v):\n%s", err, out)
		}
		for _, want := range []string{"Network 10.244.0.0/16 overlaps this node's route 10.0.0.0/8 via " + n1.Gateway.String() + " dev eth0", "set Network to a range"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("refusal does not say %q:\n%s", want, out)
			}
		}
		if _, err := os.Stat(filepath.Join(dir, "subnet.env")); err == nil {
			t.Error("the refused agent wrote a subnet.env")
		}
	})

	// A node "reboots": its agent dies with kill -9, its namespace (every
	// device, route, rule, pod) is deleted and made again, /run is empty.
	// It comes back with the same subnet and VTEP MAC, so its peers' FDB
	// and neighbour entries never change; the other nodes' pods lose
	// nothing; its pods, made again through CNI, get addresses of the
	// same subnet without conflict.
	t.Run("node reboot", func(t *testing.T) {
		tr := startTraffic(t, l, ring(l, "n1")...)
		_, before := leaseOf(t, l, "n1")
		peerFDB, peerPath := fdb(t, l, "n2"), dataPath(t, l)
		if err := l.RebootNode(ctx, "n1"); err != nil {
			t.Fatal(err)
		}
		waitAllReady(t, l)
		time.Sleep(3 * time.Second) // and a while after
		tr.expectNoLoss("n1 reboots (pods of n2 and n3)")
		_, after := leaseOf(t, l, "n1")
		if after.BackendVtepMAC != before.BackendVtepMAC || after.Value != before.Value {
			t.Errorf("n1's lease changed across a reboot:\nbefore %s\nafter  %s", before.Value, after.Value)
		}
		if got := fdb(t, l, "n2"); got != peerFDB {
			t.Errorf("n2's FDB changed across n1's reboot:\nbefore\n%s\nafter\n%s", peerFDB, got)
		}
		for _, k := range []string{"n2: ip neigh show nud permanent", "n3: ip neigh show nud permanent"} {
			if now := dataPath(t, l)[k]; now != peerPath[k] {
				t.Errorf("%s changed:\nbefore\n%s\nafter\n%s", k, peerPath[k], now)
			}
		}
		env, err := subnetenv.Read(l.SubnetFile("n1"))
		if err != nil {
			t.Fatal(err)
		}
		n1, _ := l.Node("n1")
		seen := map[netip.Addr]bool{}
		for _, p := range n1.Pods {
			if !env.Subnet.Masked().Contains(p.IP) || seen[p.IP] {
				t.Errorf("pod %s got %s after the reboot: outside %s, or taken twice", p.Name, p.IP, env.Subnet.Masked())
			}
			seen[p.IP] = true
		}
		mustCheck(t, l, l.Matrix())
	})
}

// A node cut off from the store for longer than its lease's TTL (6 s
// here, -subnet-lease-ttl) loses the lease; peers drop its routes. When it
// is back it re-claims the same subnet if nobody took it. If another node
// took it meanwhile (here n3, restarted with n1's old subnet in its
// subnet.env), n1 takes a new subnet, rewrites subnet.env and says so
// loudly; never do two nodes hold one subnet.
func TestPartitionLongerThanLeaseTTL(t *testing.T) {
	l := upLab(t, Options{Name: "tpart", Nodes: 3, Pods: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if err := l.StopAgent("n1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgentWith("n1", "--subnet-lease-ttl", "6s"); err != nil {
		t.Fatal(err)
	}
	waitAllReady(t, l)
	first := subnets(t, l)["n1"]

	// partition cuts n1 off until its lease is gone from the store, then
	// runs meanwhile, then heals and waits until n1 holds a lease again.
	partition := func(meanwhile func()) (key string) {
		t.Helper()
		oldKey, _ := leaseOf(t, l, "n1")
		if err := l.PartitionFromStore(ctx, "n1"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, time.Minute, "n1's lease expires", func() bool {
			_, ok := storeLeases(t, l)[oldKey]
			return !ok
		})
		if meanwhile != nil {
			meanwhile()
		}
		if err := l.HealPartition(ctx, "n1"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 2*time.Minute, "n1 holds a lease again", func() bool {
			for k, v := range storeLeases(t, l) {
				if v.NodeName == "n1" && v.EtcdLease != 0 {
					key = k
					return true
				}
			}
			return false
		})
		waitAllReady(t, l)
		return key
	}
	noSharedSubnet := func() {
		t.Helper()
		holders := map[string]string{}
		for k, v := range storeLeases(t, l) {
			if other, ok := holders[k]; ok {
				t.Fatalf("nodes %s and %s both hold %s", other, v.NodeName, k)
			}
			holders[k] = v.NodeName
		}
		seen := map[netip.Prefix]string{}
		for node, s := range subnets(t, l) {
			if other, ok := seen[s]; ok {
				t.Fatalf("subnet.env of %s and %s both say %s", other, node, s)
			}
			seen[s] = node
		}
	}

	t.Run("subnet still free: the same one back", func(t *testing.T) {
		partition(nil)
		if got := subnets(t, l)["n1"]; got != first {
			t.Fatalf("n1 came back with %s, want its old %s", got, first)
		}
		noSharedSubnet()
		mustCheck(t, l, l.Matrix())
	})

	t.Run("subnet taken meanwhile: a new one, said loudly", func(t *testing.T) {
		partition(func() {
			// n3 restarts with n1's subnet in its subnet.env (a stale
			// file, a restored backup) and its own lease gone: it claims
			// the free subnet it finds there.
			if err := l.StopAgent("n3", syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			key, _ := leaseOf(t, l, "n3")
			if _, err := etcdClient(t, l).Delete(ctx, registryPrefix+"/subnets/"+key); err != nil {
				t.Fatal(err)
			}
			env, err := subnetenv.Read(l.SubnetFile("n3"))
			if err != nil {
				t.Fatal(err)
			}
			env.Subnet = netip.PrefixFrom(first.Addr().Next(), first.Bits())
			if err := subnetenv.Write(l.SubnetFile("n3"), env); err != nil {
				t.Fatal(err)
			}
			if err := l.StartAgent("n3"); err != nil {
				t.Fatal(err)
			}
			waitFor(t, time.Minute, "n3 takes n1's old subnet", func() bool {
				k, _, ok := findLease(t, l, "n3")
				return ok && k == strings.Replace(first.String(), "/", "-", 1)
			})
		})
		now := subnets(t, l)
		if now["n1"] == first {
			t.Fatalf("n1 still says %s, which n3 holds", first)
		}
		noSharedSubnet()
		log := agentLog(t, l, "n1")
		for _, want := range []string{"level=ERROR", "SUBNET CHANGED", "old=" + strings.Replace(first.String(), "/", "-", 1), "node n3"} {
			if !strings.Contains(log, want) {
				t.Errorf("n1's log lacks %q:\n%s", want, lastLines([]byte(log), 15))
			}
		}
		if v := metric(t, l, "n1", `loom_lease_reacquired_total{subnet="changed"}`); v != "1" {
			t.Errorf(`loom_lease_reacquired_total{subnet="changed"} = %q, want 1`, v)
		}
		// Peers route n1's new subnet to n1.
		if err := l.WaitConverged(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// 50 agents started at once against one store get 50 distinct subnets,
// and every node learns a route to every other (the lab's convergence
// wait). Every claim is one etcd transaction: no two can win one subnet.
func TestFiftyAgentsJoinAtOnce(t *testing.T) {
	const nodes = 50
	l := upLab(t, Options{Name: "t50", Nodes: nodes, Pods: 0})
	seen := map[netip.Prefix]string{}
	for node, p := range subnets(t, l) {
		if other, dup := seen[p]; dup {
			t.Fatalf("nodes %s and %s share subnet %s", node, other, p)
		}
		seen[p] = node
	}
	if len(seen) != nodes {
		t.Fatalf("%d distinct subnets, want %d", len(seen), nodes)
	}
	if got := len(storeLeases(t, l)); got != nodes {
		t.Fatalf("registry holds %d leases, want %d", got, nodes)
	}
	if missing, err := l.missingRoutes(); err != nil || len(missing) > 0 {
		t.Fatalf("not converged: %v %v", missing, err)
	}
}
