package cni

// FuzzEnv: the CNI environment is outside input. A container runtime (or
// anyone who can run /opt/cni/bin/loom-cni) sets CNI_COMMAND,
// CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and CNI_PATH; skel reads
// them and calls loom's handlers. The fuzz drives that real dispatch path
// (skel.PluginMainFuncsWithError, with os.Stdin/Stdout/Stderr swapped for
// pipes) and, instead of the kernel steps, runs loom's own checks on what
// skel passed on: CNI_NETNS through openNetNS, the IPAM store keyed by
// (CNI_CONTAINERID, CNI_IFNAME), the node-side veth name.
//
// No kernel object is created: the handlers open namespaces read-only and
// the IPAM store lives in a temp dir. Address plan: node subnet
// 10.244.1.0/24 (gateway .1) of 10.244.0.0/16, IPv6 fc00:0:0:1::/64 of
// fc00::/48.

import (
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/utils"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/loomnet/loom/internal/ipam"
	"github.com/loomnet/loom/internal/subnetenv"
)

// podNetNSSeed in CNI_NETNS stands for a real pod network namespace that
// the fuzz creates (its path holds a thread ID, so it cannot be a fixed
// seed).
const podNetNSSeed = "@pod-netns"

// envStdin is one network configuration the fuzz puts on stdin.
type envStdin struct {
	name  string
	stdin []byte
	// loom says skel hands this stdin to loom's handlers; gcStatus that it
	// does so for GC and STATUS too (cniVersion 1.1.0 or later).
	loom, gcStatus bool
	// wantCode is the code of every command loom handles when not 0 (the
	// configuration is the problem, whatever the environment).
	wantCode uint
	// noSubnetEnv: the configuration names a subnet.env that does not
	// exist (the agent has not run yet).
	noSubnetEnv bool
}

func envStdins(f *testing.F) []envStdin {
	dir := f.TempDir()
	v4, dual := filepath.Join(dir, "subnet.env"), filepath.Join(dir, "dual", "subnet.env")
	e := subnetenv.Env{
		Network: netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:  netip.MustParsePrefix("10.244.1.1/24"),
		MTU:     1450,
		IPMasq:  true,
	}
	if err := subnetenv.Write(v4, e); err != nil {
		f.Fatal(err)
	}
	e.IPv6Network = netip.MustParsePrefix("fc00::/48")
	e.IPv6Subnet = netip.MustParsePrefix("fc00:0:0:1::1/64")
	if err := subnetenv.Write(dual, e); err != nil {
		f.Fatal(err)
	}
	conf := func(cniVersion, subnetFile string, extra map[string]any) []byte {
		m := map[string]any{"cniVersion": cniVersion, "name": "loomfuzz", "type": PluginType,
			"subnetFile": subnetFile, "dataDir": filepath.Join(dir, "ipam")}
		for k, v := range extra {
			m[k] = v
		}
		b, err := json.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	return []envStdin{
		{name: "1.1.0 IPv4", stdin: conf("1.1.0", v4, nil), loom: true, gcStatus: true},
		{name: "1.0.0 dual-stack", stdin: conf("1.0.0", dual, nil), loom: true},
		{name: "0.4.0 IPv4", stdin: conf("0.4.0", v4, nil), loom: true},
		{name: "0.3.1, older than loom-cni serves", stdin: conf("0.3.1", v4, nil)},
		{name: "no subnet.env yet", stdin: conf("1.1.0", filepath.Join(dir, "absent", "subnet.env"), nil), loom: true, gcStatus: true, noSubnetEnv: true},
		{name: "mtu not a number", stdin: conf("1.1.0", v4, map[string]any{"mtu": "x"}), loom: true, gcStatus: true, wantCode: types.ErrInvalidNetworkConfig},
		{name: "not JSON", stdin: []byte(`{"cniVersion":"1.1.0","name":`)},
		{name: "no network name", stdin: []byte(`{"cniVersion":"1.1.0","type":"loom-cni"}`)},
	}
}

// newPodNetNS returns the path of a network namespace that is not the
// test's own, the way CNI_NETNS names a pod's. It is held by a thread that
// does nothing else and lives until the fuzz ends; when that thread exits
// the namespace goes with it, so a crashed worker leaves nothing behind
// (a named netns would stay mounted). Creating it needs root: without root
// the seed using it runs as a path that does not exist, except in CI.
func newPodNetNS(f *testing.F) string {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			f.Fatal("FuzzEnv needs root for its pod netns seed and CI=true: run the suite as root")
		}
		f.Log("not root: the pod netns seed runs without a pod netns")
		return podNetNSSeed
	}
	path, errc, done := make(chan string), make(chan error), make(chan struct{})
	go holdPodNetNS(path, errc, done)
	select {
	case p := <-path:
		f.Cleanup(func() { close(done) })
		return p
	case err := <-errc:
		f.Fatalf("create a pod netns: %v", err)
		return ""
	}
}

// holdPodNetNS moves its thread into a new network namespace, sends the
// namespace's path and holds it until done is closed. Never the main
// thread: /proc/self/ns/net is the main thread's namespace, which must
// stay the node's for the "/proc/self/ns/net" seed to mean the node.
func holdPodNetNS(path chan<- string, errc chan<- error, done <-chan struct{}) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// While this goroutine holds the main thread, the next one runs on
		// another; once that has locked its own, the main thread is let go.
		locked := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			close(locked)
			holdPodNetNS(path, errc, done)
		}()
		<-locked
		runtime.UnlockOSThread()
		return
	}
	// Never unlocked: the thread ends with this goroutine, and so does the
	// namespace only it is in.
	h, err := netns.New()
	if err != nil {
		errc <- err
		return
	}
	h.Close()
	path <- filepath.Join("/proc", "self", "task", strconv.Itoa(unix.Gettid()), "ns", "net")
	<-done
}

// FuzzEnv runs the CNI dispatch with fuzzed environment variables. It must
// never panic; every error is a *types.Error with a code the spec or
// loom-cni documents (never 8, which skel only uses after a handler let the
// node's own netns through, and never 999); an environment skel accepts
// reaches loom, which refuses a CNI_NETNS that is not another network
// namespace with code 4; every (CNI_CONTAINERID, CNI_IFNAME) skel accepts
// makes an IPAM store round trip (allocate, find, free) and a valid link
// name for the node-side veth.
func FuzzEnv(f *testing.F) {
	stdins := envStdins(f)
	podNS := newPodNetNS(f)

	const (
		containerd = "3f5d8c0b9a7e6d5c4b3a29180716f5e4d3c2b1a0f9e8d7c6b5a4938271605f4e"
		netnsPath  = "/var/run/netns/cni-4a1e9c3b-7d2f-4e8a-9b6c-1f0e2d3c4b5a"
		k8sArgs    = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=x;K8S_POD_INFRA_CONTAINER_ID=" + containerd
	)
	type seed struct {
		cmd, id, netns, ifname, args, path string
		stdin                              uint8
	}
	seeds := []seed{
		{"ADD", containerd, podNetNSSeed, "eth0", k8sArgs, "/opt/cni/bin", 0},
		{"ADD", containerd, podNetNSSeed, "eth1", "", "/opt/cni/bin", 1},
		{"ADD", containerd, netnsPath, "eth0", k8sArgs, "/opt/cni/bin", 2},
		{"ADD", containerd, podNetNSSeed, "eth0", k8sArgs, "/opt/cni/bin", 4},
		{"DEL", containerd, netnsPath, "eth0", k8sArgs, "/opt/cni/bin", 0},
		{"DEL", containerd, "", "eth0", "", "/opt/cni/bin", 0},
		{"CHECK", containerd, podNetNSSeed, "eth0", k8sArgs, "/opt/cni/bin", 0},
		{"GC", "", "", "", "", "/opt/cni/bin", 0},
		{"STATUS", "", "", "", "", "/opt/cni/bin", 4},
		{"VERSION", "", "", "", "", "", 0},
		{"", "", "", "", "", "", 0},
		{"add", containerd, netnsPath, "eth0", "", "/opt/cni/bin", 0},
		{"ADD", containerd, netnsPath, "eth0", "", "/opt/cni/bin", 3},
		{"ADD", containerd, netnsPath, "eth0", "", "/opt/cni/bin", 5},
		{"ADD", containerd, netnsPath, "eth0", "", "/opt/cni/bin", 6},
		{"ADD", containerd, netnsPath, "eth0", "", "/opt/cni/bin", 7},
		// Hostile: the node's own netns, other namespace kinds, paths that
		// are no namespace; IDs and ifnames that would escape a directory
		// or break host-local's "<id>\r\n<ifname>" file; the length limit.
		{"ADD", "c1", "/proc/self/ns/net", "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1", "/proc/1/ns/net", "eth0", "", "/opt/cni/bin", 0},
		{"DEL", "c1", "/proc/self/ns/net", "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1", "/proc/self/ns/mnt", "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1", "/proc/self", "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1", "../..", "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1", "/", "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1", "", "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "../..", netnsPath, "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "a/../../b", netnsPath, "eth0", "", "/opt/cni/bin", 0},
		{"ADD", ".", netnsPath, "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "..", netnsPath, "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1\r\neth1", netnsPath, "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1.", netnsPath, "eth0", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "eth0\n", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "abcdefghijklmnop", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "abcdefghijklmno", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, ".", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "..", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "a:b", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "\x01\u00e9", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "\u00a0eth0", "", "/opt/cni/bin", 0},
		{"DEL", "c1", "", "\xff\xfe", "", "/opt/cni/bin", 0},
		{"ADD", "c1", netnsPath, "eth0", "K8S_POD_NAME=;;=", "", 0},
	}
	for _, s := range seeds {
		f.Add(s.cmd, s.id, s.netns, s.ifname, s.args, s.path, s.stdin)
	}

	f.Fuzz(func(t *testing.T, cmd, containerID, netnsArg, ifName, cniArgs, cniPath string, stdinKind uint8) {
		env := map[string]string{
			"CNI_COMMAND": cmd, "CNI_CONTAINERID": containerID, "CNI_NETNS": netnsArg,
			"CNI_IFNAME": ifName, "CNI_ARGS": cniArgs, "CNI_PATH": cniPath,
			"CNI_NETNS_OVERRIDE": "",
		}
		for _, v := range env {
			if strings.ContainsRune(v, 0) {
				return // no environment variable can hold a NUL byte
			}
		}
		if netnsArg == podNetNSSeed {
			env["CNI_NETNS"] = podNS
		}
		// After a DEL that succeeds, skel opens CNI_NETNS itself, without
		// looking at what it is. Opening a device or a FIFO can block or
		// have effects (a watchdog), so the fuzz keeps away from them;
		// loom's own code opens only what statfs says is a namespace.
		if fi, err := os.Stat(env["CNI_NETNS"]); err == nil && fi.Mode()&(fs.ModeDevice|fs.ModeNamedPipe|fs.ModeSocket|fs.ModeIrregular) != 0 {
			return
		}
		in := stdins[int(stdinKind)%len(stdins)]
		for k, v := range env {
			t.Setenv(k, v)
		}

		called := ""
		funcs := skel.CNIFuncs{
			Add:    func(args *skel.CmdArgs) error { called = "ADD"; return fuzzAdd(t, args) },
			Del:    func(args *skel.CmdArgs) error { called = "DEL"; return fuzzDel(t, args) },
			Check:  func(args *skel.CmdArgs) error { called = "CHECK"; return Check(args) },
			GC:     func(args *skel.CmdArgs) error { called = "GC"; return GC(args) },
			Status: func(args *skel.CmdArgs) error { called = "STATUS"; return Status(args) },
		}
		stdout, stderr, cerr := runSkel(t, funcs, in.stdin)

		var err error
		if cerr != nil { // a nil *types.Error is no error
			err = cerr
		}
		// Every failure is a CNI error with a message and a code that the
		// spec documents and that says what is wrong.
		if cerr != nil {
			if cerr.Msg == "" || !slices.Contains([]uint{
				types.ErrIncompatibleCNIVersion, types.ErrUnknownContainer, types.ErrInvalidEnvironmentVariables,
				types.ErrDecodingFailure, types.ErrInvalidNetworkConfig, types.ErrPluginNotAvailable,
			}, cerr.Code) {
				t.Fatalf("%s: error %#v: want code 1, 3, 4, 6, 7 or 50 with a message", describe(env, in), cerr)
			}
		}

		switch cmd {
		case "":
			if err != nil || !strings.Contains(stderr, About) {
				t.Fatalf("%s: no CNI_COMMAND: %v, stderr %q; want the About text and no error", describe(env, in), err, stderr)
			}
			return
		case "VERSION":
			info, derr := (&version.PluginDecoder{}).Decode([]byte(stdout))
			if err != nil || derr != nil || !slices.Equal(info.SupportedVersions(), Versions().SupportedVersions()) {
				t.Fatalf("%s: VERSION printed %q (%v), error %v; want loom-cni's versions", describe(env, in), stdout, derr, err)
			}
			return
		case "ADD", "DEL", "CHECK", "GC", "STATUS":
		default:
			if called != "" || err == nil {
				t.Fatalf("%s: unknown command ran %q, error %v", describe(env, in), called, err)
			}
			return
		}

		if want := skelAccepts(cmd, env, in); want != (called == cmd) {
			t.Fatalf("%s: handler %q ran, want it to run: %t (error %v)", describe(env, in), called, want, err)
		}
		if called == "" {
			if err == nil {
				t.Fatalf("%s: refused without an error", describe(env, in))
			}
			return
		}
		code := uint(0)
		if cerr != nil {
			code = cerr.Code
		}
		want := loomCodes(cmd, in)
		if code == types.ErrInvalidEnvironmentVariables && !strings.Contains(cerr.Msg, "CNI_NETNS") {
			t.Fatalf("%s: %v; want a code 4 only for CNI_NETNS, naming it (skel vetted the rest)", describe(env, in), err)
		}
		if !slices.Contains(want, code) {
			t.Fatalf("%s: %s returned %v (code %d), want a code in %v (0: success)", describe(env, in), cmd, err, code, want)
		}
		// The one thing CNI_NETNS must never do: make ADD or DEL work on
		// the node's own interfaces.
		if (cmd == "ADD" || cmd == "DEL") && sameFile(env["CNI_NETNS"], "/proc/self/ns/net") && in.wantCode == 0 && !(cmd == "ADD" && in.noSubnetEnv) && code != types.ErrInvalidEnvironmentVariables {
			t.Fatalf("%s: %s into the node's own netns returned %v, want code 4", describe(env, in), cmd, err)
		}
		if cmd == "ADD" && netnsArg == podNetNSSeed && podNS != podNetNSSeed && !in.noSubnetEnv && in.wantCode == 0 && code != 0 {
			t.Fatalf("%s: ADD into a pod netns failed: %v", describe(env, in), err)
		}
	})
}

// loomCodes are the codes loom-cni may answer cmd with (0: success) once
// skel has accepted the environment.
func loomCodes(cmd string, in envStdin) []uint {
	switch {
	case in.wantCode != 0:
		return []uint{in.wantCode}
	case in.noSubnetEnv && (cmd == "ADD" || cmd == "CHECK" || cmd == "STATUS"):
		return []uint{types.ErrPluginNotAvailable}
	case cmd == "ADD", cmd == "DEL":
		return []uint{0, types.ErrInvalidEnvironmentVariables} // CNI_NETNS
	case cmd == "CHECK":
		// Nothing was added: the store knows no such attachment.
		return []uint{types.ErrUnknownContainer}
	}
	return []uint{0}
}

// runSkel runs skel's dispatch with stdin as the network configuration and
// returns what it printed and its error. skel reads the process's
// os.Stdin/Stdout/Stderr, so those are swapped for pipes for the call.
func runSkel(t *testing.T, funcs skel.CNIFuncs, stdin []byte) (stdout, stderr string, err *types.Error) {
	t.Helper()
	pipe := func() (r, w *os.File) {
		r, w, perr := os.Pipe()
		if perr != nil {
			t.Fatal(perr)
		}
		t.Cleanup(func() { r.Close(); w.Close() })
		return r, w
	}
	inR, inW := pipe()
	outR, outW := pipe()
	errR, errW := pipe()
	// Written and read beside the call: a pipe holds only 64 KiB.
	go func() { inW.Write(stdin); inW.Close() }()
	outc, errc := make(chan string, 1), make(chan string, 1)
	for _, p := range []struct {
		r *os.File
		c chan string
	}{{outR, outc}, {errR, errc}} {
		go func() { b, _ := io.ReadAll(p.r); p.c <- string(b) }()
	}

	oldIn, oldOut, oldErr := os.Stdin, os.Stdout, os.Stderr
	os.Stdin, os.Stdout, os.Stderr = inR, outW, errW
	func() {
		defer func() { os.Stdin, os.Stdout, os.Stderr = oldIn, oldOut, oldErr }()
		err = skel.PluginMainFuncsWithError(funcs, Versions(), About)
	}()
	outW.Close()
	errW.Close()
	return <-outc, <-errc, err
}

// skelAccepts says whether skel should hand cmd to loom: the variables the
// command needs are set, container ID and ifname pass CNI's own checks,
// and the configuration is one skel lets through for the command.
func skelAccepts(cmd string, env map[string]string, in envStdin) bool {
	if !in.loom || env["CNI_PATH"] == "" {
		return false
	}
	switch cmd {
	case "GC", "STATUS":
		return in.gcStatus
	case "ADD", "CHECK":
		if env["CNI_NETNS"] == "" {
			return false
		}
	}
	id, ifName := env["CNI_CONTAINERID"], env["CNI_IFNAME"]
	return id != "" && ifName != "" && utils.ValidateContainerID(id) == nil && utils.ValidateInterfaceName(ifName) == nil
}

func sameFile(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

func describe(env map[string]string, in envStdin) string {
	b, _ := json.Marshal(env)
	return string(b) + " with stdin " + in.name
}

// fuzzAdd is ADD up to the kernel: the configuration and subnet.env as ADD
// reads them, CNI_NETNS through openNetNS, then an IPAM round trip for the
// attachment and the veth name. The netns is only opened and closed.
func fuzzAdd(t *testing.T, args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	p, err := readPlan(c)
	if err != nil {
		return err
	}
	pod, nsErr := openNetNS(args.Netns)
	if nsErr == nil {
		pod.Close()
	} else if te, ok := errors.AsType[*types.Error](nsErr); !ok || te.Code != types.ErrInvalidEnvironmentVariables {
		t.Errorf("openNetNS(%q) = %#v, want a CNI error with code 4", args.Netns, nsErr)
	}
	ipamRoundTrip(t, c, p, ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName})
	checkVethName(t, args)
	return nsErr
}

// fuzzDel is DEL without netlink: a CNI_NETNS that is gone is fine (the
// pod's interfaces went with it), one that is something else is refused,
// and freeing the attachment's addresses succeeds when it holds none.
func fuzzDel(t *testing.T, args *skel.CmdArgs) error {
	c, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	if args.Netns != "" {
		pod, err := ns.GetNS(args.Netns)
		switch {
		case netnsGone(err):
		case err != nil:
			return badNetNS(args.Netns, err.Error())
		default:
			err := checkPodNetNS(pod)
			pod.Close()
			if err != nil {
				return err
			}
		}
	}
	checkVethName(t, args)
	store, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name})
	if err != nil {
		t.Fatalf("open the IPAM store of a parsed config: %v", err)
	}
	freed, err := store.Release(ipam.Attachment{ContainerID: args.ContainerID, IfName: args.IfName})
	if err != nil || len(freed) != 0 {
		t.Errorf("DEL of %q/%q that holds nothing: freed %v, %v; want nothing and no error", args.ContainerID, args.IfName, freed, err)
	}
	return nil
}

// ipamRoundTrip allocates for att, checks that the store records exactly
// att as the owner (host-local's file format must carry the ID and ifname
// unchanged) and that no other attachment sees the addresses, then frees
// them and checks that nothing is left.
func ipamRoundTrip(t *testing.T, c *Config, p plan, att ipam.Attachment) {
	t.Helper()
	store, err := ipam.New(ipam.Config{DataDir: c.DataDir, Network: c.Name})
	if err != nil {
		t.Fatalf("open the IPAM store of a parsed config: %v", err)
	}
	got, err := store.Allocate(att, p.pools())
	if err != nil {
		t.Fatalf("allocate for %q/%q: %v", att.ContainerID, att.IfName, err)
	}
	if len(got) != len(p.families) {
		t.Fatalf("allocate for %q/%q gave %v, want one address per family", att.ContainerID, att.IfName, got)
	}
	for i, a := range got {
		if f := p.families[i]; !f.pool.Contains(a) || a == f.gateway.Addr() {
			t.Fatalf("allocate for %q/%q gave %s, outside %s or the gateway", att.ContainerID, att.IfName, a, f.pool)
		}
	}
	all, err := store.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, al := range all {
		if al.ContainerID != att.ContainerID || al.IfName != att.IfName || !slices.Contains(got, al.IP) {
			t.Fatalf("the store holds %+v after allocating %v for %q/%q", al, got, att.ContainerID, att.IfName)
		}
	}
	if len(all) != len(got) {
		t.Fatalf("the store holds %+v, want exactly %v", all, got)
	}
	if again, err := store.Allocate(att, p.pools()); err != nil || !slices.Equal(again, got) {
		t.Fatalf("retried allocate for %q/%q gave %v, %v; want %v again", att.ContainerID, att.IfName, again, err, got)
	}
	if found, err := store.Lookup(att); err != nil || !sameAddrs(found, got) {
		t.Fatalf("lookup of %q/%q gave %v, %v; want %v", att.ContainerID, att.IfName, found, err, got)
	}
	for _, other := range []ipam.Attachment{
		{ContainerID: att.ContainerID + "0", IfName: att.IfName},
		{ContainerID: att.ContainerID, IfName: att.IfName + "0"},
		// What a file "<ID>\r\n<ifname>" would hold if the ID smuggled
		// in a line break of its own.
		{ContainerID: att.ContainerID + "\r\n" + att.IfName, IfName: att.IfName},
	} {
		if found, err := store.Lookup(other); err != nil || len(found) != 0 {
			t.Fatalf("lookup of %q/%q, another attachment, found %v, %v", other.ContainerID, other.IfName, found, err)
		}
	}
	if freed, err := store.Release(att); err != nil || !sameAddrs(freed, got) {
		t.Fatalf("release of %q/%q freed %v, %v; want %v", att.ContainerID, att.IfName, freed, err, got)
	}
	if freed, err := store.Release(att); err != nil || len(freed) != 0 {
		t.Fatalf("second release of %q/%q freed %v, %v; want nothing", att.ContainerID, att.IfName, freed, err)
	}
	// Only the store's own files remain: nothing the ID or ifname named.
	entries, err := os.ReadDir(store.Dir())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if n := e.Name(); n != "lock" && !strings.HasPrefix(n, "last_reserved_ip.") {
			t.Fatalf("%s holds %q after %q/%q was released", store.Dir(), n, att.ContainerID, att.IfName)
		}
	}
	parent, err := os.ReadDir(filepath.Dir(store.Dir()))
	if err != nil {
		t.Fatal(err)
	}
	if len(parent) != 1 || parent[0].Name() != c.Name {
		t.Fatalf("the data dir holds %v, want only the network's directory %s", parent, c.Name)
	}
}

func sameAddrs(a, b []netip.Addr) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, netip.Addr.Compare)
	slices.SortFunc(b, netip.Addr.Compare)
	return slices.Equal(a, b)
}

// checkVethName: the node end's name must be one the kernel and runtimes
// accept, whatever ID and ifname it is derived from, and stable, since DEL
// and GC find the veth by it.
func checkVethName(t *testing.T, args *skel.CmdArgs) {
	t.Helper()
	name := HostVethName(args.ContainerID, args.IfName)
	if err := validIfName(name); err != nil || utils.ValidateInterfaceName(name) != nil || !strings.HasPrefix(name, "veth") {
		t.Errorf("HostVethName(%q, %q) = %q: %v; want a valid link name", args.ContainerID, args.IfName, name, err)
	}
	if again := HostVethName(args.ContainerID, args.IfName); again != name {
		t.Errorf("HostVethName(%q, %q) gave %q, then %q", args.ContainerID, args.IfName, name, again)
	}
}
