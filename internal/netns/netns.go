// Package netns creates, enters, lists and deletes named network namespaces
// (/run/netns/NAME, the same place `ip netns` uses), and runs code or opens
// sockets inside them.
//
// A network namespace belongs to an OS thread, not to a goroutine, so every
// function that switches namespace does it on a locked thread and switches
// back before unlocking. Sockets keep the namespace they were created in, so
// a listener or connection opened inside Do can be used from any goroutine
// afterwards.
package netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/containernetworking/plugins/pkg/ns"
	vnetns "github.com/vishvananda/netns"
)

// Dir is where named namespaces are bind-mounted.
const Dir = "/run/netns"

// Path returns the bind-mount path of the named namespace.
func Path(name string) string { return filepath.Join(Dir, name) }

// Create makes a new named namespace with its loopback up. It fails if the
// name is taken.
func Create(name string) error {
	if _, err := os.Stat(Path(name)); err == nil {
		return fmt.Errorf("create namespace %s: already exists", name)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := vnetns.Get()
	if err != nil {
		return fmt.Errorf("create namespace %s: %w", name, err)
	}
	defer orig.Close()
	h, err := vnetns.NewNamed(name)
	if err != nil {
		return fmt.Errorf("create namespace %s: %w", name, err)
	}
	h.Close()
	if err := vnetns.Set(orig); err != nil {
		// The thread is stranded in the new namespace; let it die with the
		// goroutine instead of handing it back to the scheduler.
		runtime.LockOSThread()
		return fmt.Errorf("return from namespace %s: %w", name, err)
	}
	return Do(name, func() error { return setLoopbackUp() })
}

// Delete removes the named namespace. A missing namespace is not an error.
// The namespace itself (and every link in it) goes away once no process and
// no open file holds it any more.
func Delete(name string) error {
	err := vnetns.DeleteNamed(name)
	if err == nil || errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if _, statErr := os.Stat(Path(name)); errors.Is(statErr, os.ErrNotExist) {
		return nil
	}
	// A mount point left behind by a crash (not mounted any more) still has
	// to go.
	if rmErr := os.Remove(Path(name)); rmErr == nil {
		return nil
	}
	return fmt.Errorf("delete namespace %s: %w", name, err)
}

// Exists reports whether the named namespace exists.
func Exists(name string) bool {
	_, err := os.Stat(Path(name))
	return err == nil
}

// List returns the names of the namespaces that start with prefix.
func List(prefix string) ([]string, error) {
	entries, err := os.ReadDir(Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Do runs fn on a thread inside the named namespace.
func Do(name string, fn func() error) error {
	n, err := ns.GetNS(Path(name))
	if err != nil {
		return fmt.Errorf("open namespace %s: %w", name, err)
	}
	defer n.Close()
	return n.Do(func(ns.NetNS) error { return fn() })
}

// Inode identifies a namespace; /proc/PID/ns/net of a process inside it
// has the same inode.
func Inode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// Dialer opens connections from inside the named namespace.
type Dialer struct {
	NS string
	D  net.Dialer
}

// DialContext creates the socket inside d.NS, then connects.
func (d Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var c net.Conn
	err := Do(d.NS, func() error {
		var err error
		c, err = d.D.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Listen opens a stream listener inside the named namespace.
func Listen(name, network, address string) (net.Listener, error) {
	var ln net.Listener
	err := Do(name, func() error {
		var err error
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// ListenPacket opens a packet socket inside the named namespace.
func ListenPacket(name, network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := Do(name, func() error {
		var err error
		pc, err = net.ListenPacket(network, address)
		return err
	})
	return pc, err
}

// WriteSysctl sets a /proc/sys value inside the named namespace, e.g.
// WriteSysctl("n1", "net/ipv4/ip_forward", "1").
func WriteSysctl(name, key, value string) error {
	return Do(name, func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644)
	})
}
