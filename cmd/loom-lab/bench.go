package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/loomnet/loom/internal/bench"
)

const benchUsage = `usage: loom bench [--backend all|vxlan|udp|host-gw] [--json FILE] [--quick] [--runs N]
                  [--only GROUP,...] [--scale-peers N,...] [--name bench] [--bin-dir DIR]

Builds a lab per backend, measures throughput, latency, convergence,
control-plane scale, pod set-up and agent cost next to baselines measured in
the same run, prints a table (and JSON with --json; FILE "-" is stdout), and
tears the lab down. Needs root, iperf3 and containernetworking-plugins.
`

// runBench is `loom bench`.
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, benchUsage)
		fs.PrintDefaults()
	}
	backend := fs.String("backend", "all", "backend to measure: all, vxlan, udp or host-gw (a comma-separated list works too)")
	jsonPath := fs.String("json", "", "also write the report as JSON to this file (- for stdout)")
	quick := fs.Bool("quick", false, "short single runs (CI: checks that the bench works, not how fast anything is)")
	runs := fs.Int("runs", 0, "repeat each measurement this many times (default 3, with --quick 1)")
	name := fs.String("name", bench.DefaultLabName, "name of the lab the bench builds (and tears down)")
	binDir := fs.String("bin-dir", "", "directory holding loom and loom-cni (default: this binary's)")
	only := fs.String("only", "", "run only these groups of measurements, comma-separated: "+strings.Join(bench.Groups(), ", ")+" (default all)")
	scalePeers := fs.String("scale-peers", "", "synthetic peer counts of the scale group, comma-separated (default 100,1000,5000; with --quick 100)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var groups []string
	if *only != "" {
		groups = strings.Split(*only, ",")
		for _, g := range groups {
			if !slices.Contains(bench.Groups(), g) {
				return fmt.Errorf("--only %q: %q is not a group; use some of %s", *only, g, strings.Join(bench.Groups(), ","))
			}
		}
	}
	var peers []int
	if *scalePeers != "" {
		for _, f := range strings.Split(*scalePeers, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				return fmt.Errorf("--scale-peers %q: %q is not a positive number of peers; use e.g. --scale-peers 100,1000,5000", *scalePeers, f)
			}
			peers = append(peers, n)
		}
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("bench: unexpected argument %q", fs.Arg(0))
	}
	if *runs < 0 {
		return fmt.Errorf("--runs %d: use 1 or more", *runs)
	}
	var backends []string
	if *backend != "all" {
		backends = strings.Split(*backend, ",")
	}
	if os.Geteuid() != 0 {
		return errors.New("bench: needs root (it builds network namespaces); run it with sudo")
	}
	cmd := "loom bench"
	if len(args) > 0 {
		cmd += " " + strings.Join(args, " ")
	}
	rep, err := bench.Run(ctx, bench.Config{
		Backends:   backends,
		Quick:      *quick,
		Runs:       *runs,
		Groups:     groups,
		ScalePeers: peers,
		LabName:    *name,
		BinDir:     *binDir,
		Command:    cmd,
		Logger:     slog.New(slog.NewTextHandler(stderr, nil)),
	})
	if rep == nil {
		return err
	}
	if werr := rep.WriteTable(stdout); werr != nil {
		err = errors.Join(err, werr)
	}
	if *jsonPath != "" {
		err = errors.Join(err, writeReport(rep, *jsonPath, stdout))
	}
	return err
}

func writeReport(rep *bench.Report, path string, stdout io.Writer) error {
	if path == "-" {
		return rep.WriteJSON(stdout)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("write the JSON report: %w", err)
	}
	if err := rep.WriteJSON(f); err != nil {
		f.Close()
		return fmt.Errorf("write the JSON report to %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write the JSON report to %s: %w", path, err)
	}
	return nil
}
