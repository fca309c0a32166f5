package kubecp

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// Kubectl runs kubectl as AdminUser with args, inside the named network
// namespace (through `ip netns exec`) when netnsName is not "", and returns
// its standard output. The error carries kubectl's standard error. A
// --kubeconfig in args wins over the admin one (the last flag counts), e.g.
// to act as one of Config.Users.
func (p *Plan) Kubectl(ctx context.Context, netnsName string, args ...string) ([]byte, error) {
	return p.kubectl(ctx, netnsName, nil, args)
}

// Apply runs `kubectl apply -f -` with manifest (YAML or JSON, one or more
// objects) as AdminUser, inside netnsName when not "".
func (p *Plan) Apply(ctx context.Context, netnsName, manifest string) ([]byte, error) {
	return p.kubectl(ctx, netnsName, strings.NewReader(manifest), []string{"apply", "-f", "-"})
}

func (p *Plan) kubectl(ctx context.Context, netnsName string, stdin *strings.Reader, args []string) ([]byte, error) {
	if p.Config.Bins.Kubectl == "" {
		return nil, errors.New("kubectl: no binary in the plan (Config.Bins.Kubectl)")
	}
	full := append([]string{
		"--kubeconfig=" + p.AdminKubeconfig,
		// Discovery is cached under $HOME by default; a test's cache
		// belongs with its cluster.
		"--cache-dir=" + filepath.Join(p.Config.Dir, "kubectl-cache"),
	}, args...)
	var cmd *exec.Cmd
	if netnsName != "" {
		cmd = exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", netnsName, p.Config.Bins.Kubectl}, full...)...)
	} else {
		cmd = exec.CommandContext(ctx, p.Config.Bins.Kubectl, full...)
	}
	if stdin != nil {
		cmd.Stdin = stdin
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
