// Command loom is the loom node agent, the embedded store, the lab and the
// tools around them, as subcommands of one binary.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/loomnet/loom/internal/agent"
	"github.com/loomnet/loom/internal/version"
)

const usage = `usage: loom COMMAND [flags]

commands:
  agent     run the node agent (flanneld's flags are accepted)
  doctor    diagnose this node: every misconfiguration with evidence and fix (read-only)
  version   print the version

single-machine tools, run from loom-lab beside this binary:
  store     run an embedded etcd server for loom
  lab       build and drive a multi-node cluster on this machine
  bench     measure the data paths and the control plane in a lab, next to baselines
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if ee, ok := errors.AsType[exitError](err); ok {
		os.Exit(ee.ExitCode()) // doctor: 1 warnings, 2 failures; its report says why
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loom:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "agent":
		return agent.Main(ctx, rest, stdout, stderr)
	case "doctor":
		return runDoctor(ctx, rest, stdout, stderr)
	case "store", "lab", "bench":
		return execTool(args)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, version.String())
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

// toolBinary is the binary holding the single-machine tools (cmd/loom-lab).
const toolBinary = "loom-lab"

// execTool replaces this process with loom-lab beside this binary, running
// args: the store, the lab and the bench are not linked into the node
// binary (see cmd/loom-lab), but keep their `loom COMMAND` command line.
func execTool(args []string) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("%s: find the %s binary: %w", args[0], toolBinary, err)
	}
	bin := filepath.Join(filepath.Dir(exe), toolBinary)
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("loom %s is in %s, which is not beside %s: install it there (make build puts both in bin/)", args[0], bin, exe)
	}
	err = syscall.Exec(bin, append([]string{bin}, args...), os.Environ())
	return fmt.Errorf("loom %s: exec %s: %w", args[0], bin, err)
}
