package main

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// The plugin runs once per pod start, so it must stay a small binary: none
// of the agent's heavy dependencies may leak into it.
func TestNoHeavyDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, heavy := range []string{"go.etcd.io/", "k8s.io/", "sigs.k8s.io/", "google.golang.org/grpc", "github.com/prometheus/", "github.com/coreos/go-iptables"} {
			if strings.HasPrefix(dep, heavy) {
				t.Errorf("loom-cni depends on %s", dep)
			}
		}
	}
}

// VERSION and the bare invocation work without root and without config.
func TestVersionAndAbout(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "loom-cni")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}

	cmd := exec.Command(bin)
	cmd.Env = []string{"CNI_COMMAND=VERSION"}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("VERSION: %v", err)
	}
	var info struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("VERSION printed %q: %v", out, err)
	}
	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} {
		if !slices.Contains(info.SupportedVersions, v) {
			t.Errorf("VERSION lists %v, want %s among them", info.SupportedVersions, v)
		}
	}

	cmd = exec.Command(bin)
	cmd.Env = []string{}
	about, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(about), "loom-cni") || !strings.Contains(string(about), "1.1.0") {
		t.Errorf("bare run printed %q, %v: want the about line and the versions", about, err)
	}
}
