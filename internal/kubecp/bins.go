package kubecp

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
)

// KubeVersion is the Kubernetes release `make kube-bins` builds, the one
// pinned in tools/kube/go.mod (a test checks that the two agree).
const KubeVersion = "v1.37.1"

// BinDirEnv names the environment variable that points FindBins at a
// directory holding the three binaries, instead of the default cache.
const BinDirEnv = "LOOM_KUBE_BIN_DIR"

// cacheRoot holds one directory per Kubernetes and Go version.
const cacheRoot = "/var/cache/loom/kube"

// Bins are the paths of the Kubernetes binaries loom's tests and lab run.
type Bins struct {
	APIServer         string // kube-apiserver
	ControllerManager string // kube-controller-manager
	Kubectl           string // kubectl
}

// DefaultBinDir is where `make kube-bins` puts the binaries when
// LOOM_KUBE_BIN_DIR is unset: /var/cache/loom/kube/<KubeVersion>-<Go version>,
// e.g. /var/cache/loom/kube/v1.37.1-go1.26.8. The Go version is part of the
// key because the binaries are built with the Go that runs the tests, and a
// new Go must not silently reuse binaries built by an old one.
//
// scripts/kube-bins.sh (run by `make kube-bins`) computes the same path;
// change both together.
func DefaultBinDir() string {
	// runtime.Version can carry experiment suffixes ("go1.26.8 X:foo");
	// `go env GOVERSION`, which the script uses, starts the same way.
	goVersion, _, _ := strings.Cut(runtime.Version(), " ")
	return filepath.Join(cacheRoot, KubeVersion+"-"+goVersion)
}

// BinDir is the directory FindBins looks in: $LOOM_KUBE_BIN_DIR, else
// DefaultBinDir.
func BinDir() string {
	if d := os.Getenv(BinDirEnv); d != "" {
		return d
	}
	return DefaultBinDir()
}

// FindBins returns the paths of kube-apiserver, kube-controller-manager and
// kubectl in BinDir, or an error naming the directory and the fix when one
// of them is missing.
func FindBins() (Bins, error) {
	dir := BinDir()
	b := Bins{
		APIServer:         filepath.Join(dir, "kube-apiserver"),
		ControllerManager: filepath.Join(dir, "kube-controller-manager"),
		Kubectl:           filepath.Join(dir, "kubectl"),
	}
	var missing []string
	for _, p := range []string{b.APIServer, b.ControllerManager, b.Kubectl} {
		if err := executable(p); err != nil {
			missing = append(missing, filepath.Base(p))
		}
	}
	if len(missing) > 0 {
		return Bins{}, fmt.Errorf("kubernetes %s binaries %s missing in %s: run `make kube-bins` (as root for the default cache; or set %s to a directory holding them)",
			KubeVersion, strings.Join(missing, ", "), dir, BinDirEnv)
	}
	return b, nil
}

func executable(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
		return errors.New("not an executable file")
	}
	return nil
}
