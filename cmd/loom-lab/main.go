// Command loom-lab holds loom's single-machine tools: the embedded etcd
// store, the lab and the bench. They live apart from the node binary (loom:
// agent and doctor) because every linked package is initialised, and its
// code paged in, by every process started from a binary: the etcd server,
// the lab harness and libcni cost the agent 6.5 MiB of RSS on every node
// while no node runs them (#8). `loom store|lab|bench` execs this binary,
// found beside loom, so the command line stays as DESIGN.md gives it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/loomnet/loom/internal/labcmd"
	"github.com/loomnet/loom/internal/version"
)

const usage = `usage: loom-lab COMMAND [flags]   (normally run as loom COMMAND)

commands:
  store     run an embedded etcd server for loom
  lab       build and drive a multi-node cluster on this machine
  bench     measure the data paths and the control plane in a lab, next to baselines
  version   print the version
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
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
	case "store":
		return runStore(ctx, rest, stderr)
	case "lab":
		return labcmd.Main(ctx, rest, stdout, stderr)
	case "bench":
		return runBench(ctx, rest, stdout, stderr)
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
