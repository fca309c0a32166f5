package kubeclient

import (
	"context"
	"encoding/json"
	"fmt"

	"k8s.io/apimachinery/pkg/version"
)

// ServerVersion is the apiserver's gitVersion ("v1.37.1"), from GET
// /version, which every user may read.
func (c *Client) ServerVersion(ctx context.Context) (string, error) {
	ctx, cancel := c.bounded(ctx)
	defer cancel()
	raw, err := c.core.Get().AbsPath("/version").Do(ctx).Raw()
	if err != nil {
		return "", fmt.Errorf("read the Kubernetes API server's version: %w", err)
	}
	var v version.Info
	if err := json.Unmarshal(raw, &v); err != nil {
		return "", fmt.Errorf("read the Kubernetes API server's version: %w", err)
	}
	return v.GitVersion, nil
}
