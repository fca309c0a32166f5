package lab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/loomnet/loom/internal/doctor"
	"github.com/loomnet/loom/internal/netns"
)

// DoctorArgv is the command line that runs `loom doctor` inside node's
// namespace exactly as on a host: with the flags the node's agent runs with
// (the lab's, or the overrides a break put in force) and the node's CNI
// directories. extra goes after them (e.g. --json).
func (l *Lab) DoctorArgv(node string, extra ...string) ([]string, error) {
	n, err := l.Node(node)
	if err != nil {
		return nil, err
	}
	if !netns.Exists(n.NS) {
		return nil, fmt.Errorf("namespace %s is gone (run `loom lab up --name %s`)", n.NS, l.Opts.Name)
	}
	agent := l.AgentArgs(node)
	if st, err := l.loadBreak(); err == nil {
		agent = append(overrideFlags(agent, st.Overrides[node]), st.Extra[node]...)
	}
	argv := []string{"ip", "netns", "exec", n.NS, l.loomBin(), "doctor",
		"--cni-conf-dir", filepath.Join(l.nodeDir(node), "net.d"),
		"--cni-cache-dir", filepath.Join(l.nodeDir(node), "cni-cache"),
	}
	argv = append(argv, agent[1:]...) // without the "agent" subcommand
	return append(argv, extra...), nil
}

// ExecDoctor replaces this process with `loom doctor` in node's namespace
// (`loom lab doctor NODE`), so the exit status is the doctor's.
func (l *Lab) ExecDoctor(node string, extra ...string) error {
	argv, err := l.DoctorArgv(node, extra...)
	if err != nil {
		return err
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		return fmt.Errorf("lab doctor needs iproute2's ip: %w", err)
	}
	return syscall.Exec(ip, argv, os.Environ())
}

// Doctor runs `loom doctor --json` in node's namespace and returns its
// report. A report with warnings or failures is not an error.
func (l *Lab) Doctor(ctx context.Context, node string, extra ...string) (doctor.Report, error) {
	argv, err := l.DoctorArgv(node, append([]string{"--json"}, extra...)...)
	if err != nil {
		return doctor.Report{}, err
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	if ee, ok := errors.AsType[*exec.ExitError](err); ok && (ee.ExitCode() == 1 || ee.ExitCode() == 2) && stdout.Len() > 0 {
		err = nil
	}
	if err != nil {
		return doctor.Report{}, fmt.Errorf("doctor on %s: %w: %s", node, err, stderr.String())
	}
	var r doctor.Report
	if err := json.Unmarshal(stdout.Bytes(), &r); err != nil {
		return doctor.Report{}, fmt.Errorf("doctor on %s: decode report: %w", node, err)
	}
	return r, nil
}
