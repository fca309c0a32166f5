package main

import (
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// binary is the node binary: every node runs it, so its size and RSS are
// what issue #8 measures.
const binary = "github.com/loomnet/loom/cmd/loom"

// allowedAPIGroups are the k8s.io/api packages the binary may link: the
// types loom decodes. Each one costs megabytes of binary and of the
// agent's RSS (its types' generated code and init); add one only with a
// resource that needs it (discovery/v1 for EndpointSlices, say).
var allowedAPIGroups = []string{"k8s.io/api/core/v1"}

// heavyPackages must never be linked: the first ones drag every API group
// (or the OpenAPI models) in with them; the others are the single-machine
// tools, which live in loom-lab (cmd/loom-lab says why).
var heavyPackages = map[string]string{
	"k8s.io/client-go/kubernetes":                  "the typed clientset of every API group",
	"k8s.io/client-go/informers":                   "informers of every API group",
	"k8s.io/client-go/applyconfigurations":         "apply configurations of every API group",
	"k8s.io/client-go/discovery":                   "discovery, with the OpenAPI models",
	"github.com/google/gnostic-models":             "the OpenAPI models",
	"go.etcd.io/etcd/server":                       "the etcd server of loom store (loom-lab)",
	"go.etcd.io/raft":                              "etcd's raft, for loom store (loom-lab)",
	"github.com/loomnet/loom/internal/storeserver": "loom store (loom-lab)",
	"github.com/loomnet/loom/internal/lab":         "the lab harness (loom-lab)",
	"github.com/loomnet/loom/internal/labcmd":      "loom lab (loom-lab)",
	"github.com/loomnet/loom/internal/bench":       "loom bench (loom-lab)",
}

// TestNodeBinaryIsLean keeps the loom binary lean: with client-go's
// clientset and informer factory it was 106 MB and the idle agent's RSS 55
// MiB, most of it pages of the binary touched by package init (issue #8;
// the target is 40 MB); the etcd server and the lab in it cost another
// 6.5 MiB. Loom talks to the API through internal/kubeclient, which links
// only the groups in allowedAPIGroups, and the tools are in loom-lab.
func TestNodeBinaryIsLean(t *testing.T) {
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command lists the binary's packages: %v", err)
	}
	out, err := exec.Command(goCmd, "list", "-deps", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, binary).Output()
	if err != nil {
		var stderr string
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v\n%s", binary, err, stderr)
	}
	imports := map[string][]string{}
	var pkgs []string
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		pkgs = append(pkgs, f[0])
		imports[f[0]] = f[1:]
	}
	if !slices.Contains(pkgs, "k8s.io/client-go/rest") {
		t.Fatalf("go list -deps %s does not list k8s.io/client-go/rest: the listing is not what this test expects:\n%s", binary, out)
	}
	var bad []string
	for _, p := range pkgs {
		why := ""
		for heavy, what := range heavyPackages {
			if p == heavy || strings.HasPrefix(p, heavy+"/") {
				why = heavy + " is " + what
			}
		}
		if group, ok := strings.CutPrefix(p, "k8s.io/api/"); ok && !slices.Contains(allowedAPIGroups, p) {
			why = "API group " + group + " is not one loom decodes"
		}
		if why != "" {
			bad = append(bad, fmt.Sprintf("%s (%s), imported through %s", p, why, strings.Join(importChain(imports, binary, p), " -> ")))
		}
	}
	if len(bad) > 0 {
		t.Errorf("%s links %d packages it must not:\n\t%s\n"+
			"Every package linked costs binary and the agent's RSS on every node (issue #8: 106 MB and 55 MiB with client-go's clientset, target 40 MB): "+
			"talk to the API through internal/kubeclient, and add a group to its scheme and to allowedAPIGroups (now %s) only for a resource loom reads; "+
			"put single-machine tools in cmd/loom-lab",
			binary, len(bad), strings.Join(bad, "\n\t"), strings.Join(allowedAPIGroups, ", "))
	}
}

// importChain is one shortest chain of imports from root to pkg.
func importChain(imports map[string][]string, root, pkg string) []string {
	parent := map[string]string{root: ""}
	queue := []string{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if p == pkg {
			var chain []string
			for ; p != ""; p = parent[p] {
				chain = append(chain, p)
			}
			slices.Reverse(chain)
			return chain
		}
		for _, q := range imports[p] {
			if _, seen := parent[q]; !seen {
				parent[q] = p
				queue = append(queue, q)
			}
		}
	}
	return []string{root, "?", pkg}
}
