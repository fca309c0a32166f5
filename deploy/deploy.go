// Package deploy holds what an operator installs loom with: the Kubernetes
// manifest (kubernetes/loom.yaml, in place of kube-flannel.yml) and the
// systemd unit for hosts without Kubernetes (systemd/). They are embedded so
// tests can check them against loom's own parsers and a real kube-apiserver,
// and the lab can apply the manifest's RBAC to give its agents exactly the
// permissions a real cluster would.
package deploy

import (
	"bytes"
	_ "embed"
	"fmt"

	"sigs.k8s.io/yaml"
)

// Manifest is deploy/kubernetes/loom.yaml.
//
//go:embed kubernetes/loom.yaml
var Manifest []byte

// AgentEnv is deploy/systemd/loom-agent.env, the example environment file.
//
//go:embed systemd/loom-agent.env
var AgentEnv []byte

// Object is one document of the manifest, as JSON, with the fields that
// identify it.
type Object struct {
	Kind, APIVersion, Namespace, Name string
	JSON                              []byte
}

// Objects splits the manifest into its documents, in order.
func Objects() ([]Object, error) {
	var out []Object
	for i, doc := range bytes.Split(Manifest, []byte("\n---\n")) {
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		var meta struct {
			Kind       string `json:"kind"`
			APIVersion string `json:"apiVersion"`
			Metadata   struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(js, &meta); err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		if meta.Kind == "" || meta.Metadata.Name == "" {
			return nil, fmt.Errorf("manifest document %d has no kind or name", i)
		}
		out = append(out, Object{Kind: meta.Kind, APIVersion: meta.APIVersion, Namespace: meta.Metadata.Namespace, Name: meta.Metadata.Name, JSON: js})
	}
	return out, nil
}

func stripComments(doc []byte) []byte {
	var b bytes.Buffer
	for line := range bytes.Lines(doc) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			b.Write(line)
		}
	}
	return b.Bytes()
}
