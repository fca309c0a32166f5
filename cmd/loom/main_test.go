package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loomnet/loom/internal/testnet"
)

// build compiles cmd/<pkg> into dir as `make build` does.
func build(t *testing.T, dir, pkg string) {
	t.Helper()
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, pkg), "github.com/loomnet/loom/cmd/"+pkg)
	cmd.Env = append(cmd.Environ(), testnet.Static)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", pkg, err, out)
	}
}

// `loom store|lab|bench` keep their command line although they live in
// loom-lab: loom runs the loom-lab beside it, and says where it looked when
// there is none.
func TestToolsRunFromLoomLab(t *testing.T) {
	both, alone := t.TempDir(), t.TempDir()
	build(t, both, "loom")
	build(t, both, "loom-lab")
	build(t, alone, "loom")

	for _, cmd := range []string{"store", "lab", "bench"} {
		out, err := exec.Command(filepath.Join(both, "loom"), cmd, "--help").CombinedOutput()
		if err != nil {
			t.Errorf("loom %s --help: %v\n%s", cmd, err, out)
		}
		if !strings.Contains(string(out), cmd) || strings.Contains(string(out), "unknown command") {
			t.Errorf("loom %s --help did not reach loom-lab's %s:\n%s", cmd, cmd, out)
		}
	}
	out, err := exec.Command(filepath.Join(both, "loom"), "bench", "--runs", "-1").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--runs -1: use 1 or more") {
		t.Errorf("loom bench --runs -1 = %v, want loom-lab's error for the flag:\n%s", err, out)
	}

	out, err = exec.Command(filepath.Join(alone, "loom"), "lab", "status").CombinedOutput()
	want := filepath.Join(alone, "loom-lab")
	if err == nil || !strings.Contains(string(out), want) || !strings.Contains(string(out), "make build") {
		t.Errorf("loom lab status without loom-lab = %v, want an error naming %s and the fix:\n%s", err, want, out)
	}
	if out, err := exec.Command(filepath.Join(alone, "loom"), "version").CombinedOutput(); err != nil {
		t.Errorf("loom version without loom-lab: %v\n%s", err, out)
	}
}
