package kubecp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/loomnet/loom/internal/storeserver"
)

// startTimeout bounds Start's wait for the two processes. Both are ready in
// about 5 s on two busy cores; the rest is headroom for a loaded CI machine.
const startTimeout = 90 * time.Second

// ControlPlane is a control plane started by Start: an embedded etcd and the
// apiserver and controller manager as child processes.
type ControlPlane struct {
	*Plan
	etcd    *storeserver.Server
	etcdLog *os.File
	procs   []*child // in start order

	stopOnce sync.Once
}

// Start runs a control plane for tests: an embedded etcd on a free loopback
// port with its data under cfg.Dir/etcd, then the apiserver and the
// controller manager as children of this process (a crash of the test kills
// them too), logging to cfg.Dir/<name>.log. It returns once the apiserver is
// ready, the controller manager healthy and the controllers at work (the
// "default" ServiceAccount exists, so Pods can be created). cfg.Port and
// cfg.ControllerManagerPort 0 pick free ports; cfg.EtcdServers is ignored.
// ctx bounds the start only; the control plane runs until Stop.
func Start(ctx context.Context, cfg Config) (_ *ControlPlane, err error) {
	if cfg.Dir == "" {
		return nil, errors.New("start kubernetes control plane: no directory given (Config.Dir)")
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("start kubernetes control plane: %w", err)
	}
	if cfg.Bins == (Bins{}) {
		// Before anything runs: a missing binary is the one error a
		// developer meets first, and its fix must not drown in etcd logs.
		if cfg.Bins, err = FindBins(); err != nil {
			return nil, err
		}
	}
	if !cfg.Address.IsValid() {
		cfg.Address = loopback()
	}
	// A port picked here could be taken by someone else before the process
	// binds it; that is rare on a test machine and fails loudly (the log
	// tail says "address already in use").
	if cfg.Port == 0 {
		if cfg.Port, err = freePort(cfg.Address); err != nil {
			return nil, err
		}
	}
	if cfg.ControllerManagerPort == 0 {
		if cfg.ControllerManagerPort, err = freePort(loopback()); err != nil {
			return nil, err
		}
	}

	cp := &ControlPlane{}
	defer func() {
		if err != nil {
			cp.Stop()
		}
	}()
	cp.etcdLog, err = os.OpenFile(filepath.Join(cfg.Dir, "etcd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start etcd for kubernetes: %w", err)
	}
	cp.etcd, err = storeserver.Start(ctx, storeserver.Config{
		Listen:  "http://" + net.JoinHostPort(loopback().String(), "0"),
		DataDir: filepath.Join(cfg.Dir, "etcd"),
		Name:    "kube",
		Logger:  slog.New(slog.NewTextHandler(cp.etcdLog, nil)),
	})
	if err != nil {
		return nil, fmt.Errorf("start etcd for kubernetes: %w", err)
	}
	cfg.EtcdServers = []string{cp.etcd.ClientURL()}

	if cp.Plan, err = Prepare(cfg); err != nil {
		return nil, err
	}

	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	api, err := cp.startChild("kube-apiserver", cp.APIServer)
	if err != nil {
		return nil, err
	}
	if err := api.whileAlive(ctx, cp.WaitAPIServer); err != nil {
		return nil, err
	}
	cm, err := cp.startChild("kube-controller-manager", cp.ControllerManager)
	if err != nil {
		return nil, err
	}
	if err := cm.whileAlive(ctx, cp.Wait); err != nil {
		return nil, err
	}
	return cp, nil
}

// Stop kills the processes, waits until they are gone and stops etcd.
// Safe to call more than once.
func (cp *ControlPlane) Stop() {
	cp.stopOnce.Do(func() {
		// SIGKILL: a test's cluster is thrown away, so a graceful shutdown
		// (seconds of draining in the apiserver) buys nothing.
		for i := len(cp.procs) - 1; i >= 0; i-- {
			_ = cp.procs[i].cmd.Process.Kill()
		}
		for _, c := range cp.procs {
			<-c.done
		}
		if cp.etcd != nil {
			cp.etcd.Close()
		}
		if cp.etcdLog != nil {
			cp.etcdLog.Close()
		}
	})
}

// PIDs returns the process IDs of the apiserver and the controller manager
// (as far as started).
func (cp *ControlPlane) PIDs() []int {
	var pids []int
	for _, c := range cp.procs {
		pids = append(pids, c.cmd.Process.Pid)
	}
	return pids
}

// EtcdURL is the client URL of the embedded etcd.
func (cp *ControlPlane) EtcdURL() string { return cp.etcd.ClientURL() }

// LogFile returns the path of the log of name: "kube-apiserver",
// "kube-controller-manager" or "etcd".
func (cp *ControlPlane) LogFile(name string) string {
	return filepath.Join(cp.Config.Dir, name+".log")
}

// child is a process started by Start.
type child struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited and was reaped
	err     error         // how it exited; read after done
}

// startChild starts c as a child that the kernel kills when this process
// dies. Pdeathsig fires when the thread that forked the child exits, not the
// process, so the goroutine that starts the child keeps its thread locked
// until it has reaped the child: the Go runtime never ends a locked thread
// whose goroutine is still running.
func (cp *ControlPlane) startChild(name string, c Command) (*child, error) {
	logPath := cp.LogFile(name)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	ch := &child{name: name, logPath: logPath, done: make(chan struct{})}
	ch.cmd = exec.Command(c.Bin, c.Args...)
	ch.cmd.Stdout, ch.cmd.Stderr = logf, logf
	ch.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(ch.done)
		defer logf.Close()
		if err := ch.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		ch.err = ch.cmd.Wait()
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	cp.procs = append(cp.procs, ch)
	return ch, nil
}

// whileAlive runs wait (a readiness wait) and fails early, with the last
// lines of the log, if the process exits first.
func (c *child) whileAlive(ctx context.Context, wait func(context.Context) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	res := make(chan error, 1)
	go func() { res <- wait(ctx) }()
	select {
	case err := <-res:
		if err != nil {
			return fmt.Errorf("%w\n%s log %s ends:\n%s", err, c.name, c.logPath, tail(c.logPath, 20))
		}
		return nil
	case <-c.done:
		cancel()
		<-res
		return fmt.Errorf("%s exited during start (%v); log %s ends:\n%s", c.name, c.err, c.logPath, tail(c.logPath, 20))
	}
}

// tail returns the last n lines of the file at path.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "  " + strings.Join(strings.Split(string(bytes.Join(lines, []byte("\n"))), "\n"), "\n  ")
}

// freePort returns a TCP port on addr that was free a moment ago.
func freePort(addr netip.Addr) (int, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(addr.String(), "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free port on %s: %w", addr, err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
