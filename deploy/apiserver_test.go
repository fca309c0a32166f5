package deploy

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/loomnet/loom/internal/kubecp"
)

// A real kube-apiserver of the pinned release accepts the manifest: every
// object passes the server's validation and admission with strict field
// checking (a misspelt field fails), without anything being stored.
func TestManifestServerSideDryRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cp, err := kubecp.Start(ctx, kubecp.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)

	file := filepath.Join(t.TempDir(), "loom.yaml")
	if err := os.WriteFile(file, Manifest, 0o644); err != nil {
		t.Fatal(err)
	}
	// A dry run stores nothing, so the namespaced objects of a first
	// apply would find no namespace "loom": create it first, as a real
	// apply does with the first document.
	if out, err := cp.Kubectl(ctx, "", "create", "namespace", "loom"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	out, err := cp.Kubectl(ctx, "", "apply", "--server-side", "--dry-run=server", "--validate=strict", "--field-manager=loom-test", "-f", file)
	if err != nil {
		t.Fatalf("the apiserver refused the manifest: %v\n%s", err, out)
	}
	objs, err := Objects()
	if err != nil {
		t.Fatal(err)
	}
	got := string(out)
	for _, o := range objs {
		// kubectl prints "<kind lower>.<group>/<name> serverside-applied (server dry run)".
		want := "/" + o.Name + " serverside-applied (server dry run)"
		if !strings.Contains(strings.ToLower(got), strings.ToLower(strings.ToLower(o.Kind))) || !strings.Contains(got, want) {
			t.Errorf("dry run did not report %s %s: %s", o.Kind, o.Name, got)
		}
	}
	if len(strings.Split(strings.TrimSpace(got), "\n")) != len(objs) {
		t.Errorf("dry run reported %d objects, the manifest has %d:\n%s", len(strings.Split(strings.TrimSpace(got), "\n")), len(objs), got)
	}
	// Nothing was stored: the DaemonSet does not exist.
	if out, err := cp.Kubectl(ctx, "", "get", "daemonset", "-n", "loom", "loom"); err == nil {
		t.Errorf("a dry run stored the DaemonSet: %s", out)
	}

	// And a manifest with a misspelt field is refused, so the check above
	// can fail.
	bad := strings.Replace(string(Manifest), "hostNetwork: true", "hostNetwrok: true", 1)
	if err := os.WriteFile(file, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := cp.Kubectl(ctx, "", "apply", "--server-side", "--dry-run=server", "--validate=strict", "--field-manager=loom-test", "-f", file); err == nil || !strings.Contains(err.Error(), "hostNetwrok") {
		t.Errorf("a misspelt field was accepted (err %v): %s", err, out)
	}
}
