// Package labcmd is the `loom lab` command line: it parses flags and calls
// package lab. The command line is a contract (DESIGN.md §5): scripts and
// tests rely on the subcommands, flags and exit codes.
package labcmd

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"syscall"

	"github.com/loomnet/loom/internal/lab"
	"github.com/loomnet/loom/internal/netns"
)

const usage = `usage: loom lab COMMAND [flags]

  up      [--name a] [--nodes 3] [--pods 2] [--backend vxlan|udp|host-gw] [--underlay flat|routed]
          [--firewall auto|nftables|iptables] [--store embedded|cluster] [--datastore etcd|kube]
          [--cluster-cidr CIDR] [--bin-dir DIR]
  status  [--name a]
  check   [--name a]      print the connectivity matrix; exit 0 only when all is as expected
  exec    [--name a] rt|ext|n1|n1-p1|s1 -- CMD ARGS...
  doctor  [--name a] NODE [doctor flags]   loom doctor inside NODE, with its agent's flags
  break   [--name a] SCENARIO   inject a fault for doctor (without SCENARIO: list them)
  heal    [--name a]            undo the fault and restart what it touched
  down    [--name a] [--all]
`

// Main runs `loom lab ARGS`.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("lab: no command given")
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	cmd, rest := args[0], args[1:]
	fs := flag.NewFlagSet("lab "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	name := fs.String("name", lab.DefaultName, "lab name")
	switch cmd {
	case "up":
		var o lab.Options
		fs.IntVar(&o.Nodes, "nodes", 3, "number of nodes")
		fs.IntVar(&o.Pods, "pods", 2, "pods per node")
		fs.StringVar(&o.Backend, "backend", "vxlan", "backend: vxlan, udp or host-gw")
		fs.StringVar(&o.Underlay, "underlay", "flat", "underlay: flat (one subnet) or routed (two subnets behind the router)")
		fs.StringVar(&o.Firewall, "firewall", "auto", "firewall mode of the agents: auto, nftables or iptables")
		fs.StringVar(&o.Store, "store", "embedded", "store: embedded (loom store) or cluster (3-member etcd cluster with TLS and client certificates; needs etcd-server)")
		fs.StringVar(&o.Datastore, "datastore", "etcd", "datastore: etcd (subnet leases in the store) or kube (kube-apiserver and kube-controller-manager assign podCIDRs)")
		fs.TextVar(&o.ClusterCIDR, "cluster-cidr", netip.Prefix{}, "with --datastore kube: the `CIDR` kube-controller-manager assigns podCIDRs from (its --cluster-cidr; default: the lab's Network, 10.244.0.0/16)")
		fs.StringVar(&o.BinDir, "bin-dir", "", "directory holding loom and loom-cni (default: this binary's)")
		if err := parse(fs, rest); err != nil {
			return err
		}
		o.Name = *name
		l, err := lab.Up(ctx, o, log)
		if err != nil {
			return fmt.Errorf("lab up: %w", err)
		}
		if err := l.Status(ctx, stdout); err != nil {
			return err
		}
		return check(ctx, l, stdout)
	case "status":
		if err := parse(fs, rest); err != nil {
			return err
		}
		l, err := lab.Load(*name)
		if err != nil {
			return err
		}
		return l.Status(ctx, stdout)
	case "check":
		if err := parse(fs, rest); err != nil {
			return err
		}
		l, err := lab.Load(*name)
		if err != nil {
			return err
		}
		return check(ctx, l, stdout)
	case "exec":
		if err := fs.Parse(rest); err != nil {
			return err
		}
		return execIn(*name, fs.Args())
	case "doctor":
		if err := fs.Parse(rest); err != nil {
			return err
		}
		if fs.NArg() < 1 {
			return errors.New("lab doctor: want NODE (e.g. loom lab doctor n1), then doctor flags")
		}
		l, err := lab.Load(*name)
		if err != nil {
			return err
		}
		return l.ExecDoctor(fs.Arg(0), fs.Args()[1:]...)
	case "break":
		if err := fs.Parse(rest); err != nil {
			return err
		}
		if fs.NArg() != 1 {
			return fmt.Errorf("lab break: want one SCENARIO:\n%s", lab.ScenarioHelp())
		}
		l, err := lab.Load(*name)
		if err != nil {
			return err
		}
		return l.Break(ctx, fs.Arg(0))
	case "heal":
		if err := parse(fs, rest); err != nil {
			return err
		}
		l, err := lab.Load(*name)
		if err != nil {
			return err
		}
		return l.Heal(ctx)
	case "down":
		all := fs.Bool("all", false, "remove every lab and every leftover test namespace")
		if err := parse(fs, rest); err != nil {
			return err
		}
		if *all {
			return lab.DownAll()
		}
		return lab.Down(*name)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("lab: unknown command %q", cmd)
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("lab %s: unexpected argument %q", fs.Name(), fs.Arg(0))
	}
	return nil
}

func check(ctx context.Context, l *lab.Lab, w io.Writer) error {
	rows, err := l.Check(ctx, l.Matrix())
	if err != nil {
		return err
	}
	fmt.Fprintln(w)
	if !lab.PrintMatrix(w, rows) {
		return errors.New("lab check: some rows are not as expected")
	}
	fmt.Fprintf(w, "\nall %d rows as expected\n", len(rows))
	return nil
}

// execIn replaces this process with CMD running inside a lab member's
// namespace, so its exit code is the command's.
func execIn(name string, args []string) error {
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) < 2 {
		return errors.New("lab exec: want MEMBER -- CMD ARGS... (member: rt, ext, n1, n1-p1)")
	}
	member, cmd := args[0], args[1:]
	if cmd[0] == "--" {
		cmd = cmd[1:]
	}
	if len(cmd) == 0 {
		return errors.New("lab exec: no command given after --")
	}
	l, err := lab.Load(name)
	if err != nil {
		return err
	}
	ns, err := l.NSOf(member)
	if err != nil {
		return err
	}
	if !netns.Exists(ns) {
		return fmt.Errorf("lab exec: namespace %s is gone (run `loom lab up --name %s`)", ns, name)
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		return fmt.Errorf("lab exec needs iproute2's ip: %w", err)
	}
	return syscall.Exec(ip, append([]string{"ip", "netns", "exec", ns}, cmd...), os.Environ())
}
