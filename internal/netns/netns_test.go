package netns

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/testnet"
)

// Address plan: loopback inside throwaway namespaces only.

func TestCreateListenDialDelete(t *testing.T) {
	testnet.RequireRoot(t)
	name := testnet.Prefix + "netns-self"
	_ = Delete(name)
	if err := Create(name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Delete(name) })
	if err := Create(name); err == nil {
		t.Fatal("creating an existing namespace succeeded")
	}
	if !Exists(name) {
		t.Fatal("Exists is false right after Create")
	}
	names, err := List(testnet.Prefix + "netns-")
	if err != nil || len(names) != 1 || names[0] != name {
		t.Fatalf("List = %v, %v; want [%s]", names, err, name)
	}

	// A listener opened inside the namespace answers a dialer inside it.
	ln, err := Listen(name, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	addr := ln.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dialer{NS: name}.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s inside %s: %v", addr, name, err)
	}
	c.Close()
	if err := WriteSysctl(name, "net/ipv4/ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	var inside []byte
	if err := Do(name, func() error {
		var err error
		inside, err = os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if string(inside) != "1\n" {
		t.Fatalf("ip_forward inside = %q, want 1", inside)
	}
	ino, err := Inode(Path(name))
	if err != nil || ino == 0 {
		t.Fatalf("Inode: %d, %v", ino, err)
	}

	if err := Delete(name); err != nil {
		t.Fatal(err)
	}
	if Exists(name) {
		t.Fatal("namespace still exists after Delete")
	}
	if err := Delete(name); err != nil {
		t.Fatalf("deleting a missing namespace: %v", err)
	}
}
