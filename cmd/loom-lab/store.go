package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/loomnet/loom/internal/storeserver"
)

// runStore is `loom store`: an embedded single-member etcd.
func runStore(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("store", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", storeserver.DefaultListen, "client URL to serve, e.g. http://127.0.0.1:2379")
	peer := fs.String("peer-listen", "", "raft peer URL (default: a free loopback port)")
	dataDir := fs.String("data-dir", "/var/lib/loom/store", "directory for the WAL and the database")
	name := fs.String("name", storeserver.DefaultName, "member name")
	prefix := fs.String("etcd-prefix", storeserver.DefaultPrefix, "registry prefix")
	netConf := fs.String("network-config", "", "net-conf.json to write to <prefix>/config when that key is absent")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("store: unexpected argument %q", fs.Arg(0))
	}
	cfg := storeserver.Config{
		Listen:     *listen,
		PeerListen: *peer,
		DataDir:    *dataDir,
		Name:       *name,
		Prefix:     *prefix,
		Logger:     slog.New(slog.NewTextHandler(stderr, nil)),
	}
	if *netConf != "" {
		data, err := os.ReadFile(*netConf)
		if err != nil {
			return fmt.Errorf("store: --network-config: %w", err)
		}
		cfg.NetworkConfig = data
	}
	return storeserver.Run(ctx, cfg)
}
