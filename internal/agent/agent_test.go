package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/loomnet/loom/internal/iface"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/options"
)

// Address plan: pods 10.244.0.0/16 and fc00::/48. Servers (the health
// server, an embedded etcd) listen on free ports of 127.0.0.1 only; nothing
// here touches a network namespace's addresses, routes or rules: the
// agents under test never get as far as the kernel.

func TestGatewayIsSubnetEnvForm(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{in: "10.244.1.0/24", want: "10.244.1.1/24"},
		{in: "10.244.0.128/25", want: "10.244.0.129/25"},
		{in: "fc00:0:0:1::/64", want: "fc00:0:0:1::1/64"},
	} {
		if got := gateway(netip.MustParsePrefix(tc.in)); got.String() != tc.want {
			t.Errorf("gateway(%s) = %s, want %s", tc.in, got, tc.want)
		}
	}
	if got := gateway(netip.Prefix{}); got.IsValid() {
		t.Errorf("gateway of no subnet = %s, want none", got)
	}
}

func TestNetworkConfigFromFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "net-conf.json")
	if err := os.WriteFile(good, []byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := networkConfig(context.Background(), options.Options{NetConfigPath: good, NetConfigPathSet: true}, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Network != netip.MustParsePrefix("10.244.0.0/16") || cfg.Backend.Type != netconf.BackendHostGW || cfg.SubnetLen != 24 {
		t.Fatalf("parsed %+v", cfg)
	}

	bad := filepath.Join(dir, "bad.json")
	if err := os.WriteFile(bad, []byte(`{"Network":"10.244.0.0/16","SubnetLen":16}`), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = networkConfig(context.Background(), options.Options{NetConfigPath: bad, NetConfigPathSet: true}, nil, nil, nil)
	if err == nil || !strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), "SubnetLen 16") {
		t.Fatalf("error %v, want one naming the file and the field", err)
	}
}

func TestBackendNotYetAvailable(t *testing.T) {
	cfg, err := netconf.Parse([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}`))
	if err != nil {
		t.Fatal(err)
	}
	_, err = newBackend(cfg, iface.Iface{Name: "eth0", Index: 1, MTU: 1500}, options.Options{}, nil, nil)
	if err == nil || !strings.Contains(err.Error(), `"wireguard"`) || !strings.Contains(err.Error(), `"vxlan"`) {
		t.Fatalf("error %v, want one naming wireguard and the vxlan fix", err)
	}
}

// In Kubernetes mode the network config is always the file (the DaemonSet
// mounts net-conf.json), by default flannel's path, even when
// -net-config-path was not given.
func TestKubeModeReadsNetConfFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "net-conf.json")
	if err := os.WriteFile(path, []byte(`{"Network":"10.244.0.0/16"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := networkConfig(context.Background(), options.Options{KubeSubnetMgr: true, NetConfigPath: path}, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Network != netip.MustParsePrefix("10.244.0.0/16") || cfg.Backend.Type != netconf.BackendVXLAN {
		t.Fatalf("parsed %+v", cfg)
	}
}

// Kubernetes mode is no longer refused: a missing net-conf.json is the
// first thing it meets, and the error says where the file comes from.
func TestKubeModeMissingNetConf(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "net-conf.json")
	opts, err := options.Parse([]string{"-kube-subnet-mgr", "-net-config-path", missing, "-node-name", "n1"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	err = Run(context.Background(), opts, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "ConfigMap") {
		t.Fatalf("Run: %v, want an error naming %s and the ConfigMap", err, missing)
	}
}
