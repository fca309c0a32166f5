package testnet

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Static is the build environment of loom's binaries (as the Makefile and
// the Dockerfile build them): a static binary skips the dynamic loader and
// cgo's thread start, about 1 ms of every pod ADD and 3 ms of every DEL, and
// keeps libc out of the agent's RSS (#8).
const Static = "CGO_ENABLED=0"

// Binaries are loom's commands, as `make build` puts them in bin/.
func Binaries() []string { return []string{"loom", "loom-lab", "loom-cni"} }

// MainWithBinaries is a TestMain for packages whose tests run the real loom,
// loom-lab and loom-cni binaries (the lab, the bench): as root it builds them
// into a temporary directory, passes it to setDir, runs the tests and
// removes it.
func MainWithBinaries(m *testing.M, setDir func(string)) int {
	if os.Geteuid() != 0 {
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "loom-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	for _, pkg := range Binaries() {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, pkg), "github.com/loomnet/loom/cmd/"+pkg)
		cmd.Env = append(os.Environ(), Static)
		out, err := cmd.CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, out)
			return 1
		}
	}
	setDir(dir)
	return m.Run()
}
