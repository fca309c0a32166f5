// Package testnet gives tests throwaway network namespaces. Tests that need
// root fail (not skip) when CI=true, so a CI run can never pass by skipping
// the tests that matter.
package testnet

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netns"
)

// Prefix starts the name of every namespace a test makes, so `loom lab down
// --all` can find leftovers of a crashed test run.
const Prefix = "loomt-"

// RequireRoot skips t when not root, except under CI=true where it fails.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test needs root and CI=true: run the suite as root")
	}
	t.Skip("needs root (runs in CI as root)")
}

// NewNS creates a named namespace /run/netns/loomt-<tag>-<random> and removes
// it when t ends. The calling thread's namespace is left unchanged.
func NewNS(t testing.TB, tag string) ns.NetNS {
	t.Helper()
	RequireRoot(t)
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	name := Prefix + tag + "-" + hex.EncodeToString(b)
	n, err := newNamed(name)
	if err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := netns.DeleteNamed(name); err != nil {
			t.Errorf("delete namespace %s: %v", name, err)
		}
	})
	return n
}

func newNamed(name string) (ns.NetNS, error) {
	// netns.NewNamed moves the calling thread into the new namespace, so do
	// it on a locked thread and move back before unlocking.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return nil, err
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	if err != nil {
		return nil, err
	}
	h.Close()
	if err := netns.Set(orig); err != nil {
		return nil, fmt.Errorf("return to the original namespace: %w", err)
	}
	return ns.GetNS("/run/netns/" + name)
}
