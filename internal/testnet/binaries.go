package testnet

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// MainWithBinaries is a TestMain for packages whose tests run the real loom
// and loom-cni binaries (the lab, the bench): as root it builds both into a
// temporary directory, passes it to setDir, runs the tests and removes it.
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
	for _, pkg := range []string{"loom", "loom-cni"} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, pkg), "github.com/loomnet/loom/cmd/"+pkg).CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, out)
			return 1
		}
	}
	setDir(dir)
	return m.Run()
}
