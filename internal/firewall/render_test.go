package firewall

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// TestRenderGolden pins the exact rules for a table of configs. Run
// `go test ./internal/firewall -run TestRenderGolden -update` after an
// intended change and review the diff.
func TestRenderGolden(t *testing.T) {
	tests := []struct {
		name          string
		addrs         Addrs
		ipMasq, fwdOn bool
	}{
		{name: "ipv4", addrs: v4Only(), ipMasq: true, fwdOn: true},
		{name: "dual-stack", addrs: dualStack(), ipMasq: true, fwdOn: true},
		{name: "ipv4-ip-masq-off", addrs: v4Only(), fwdOn: true},
		{name: "ipv4-forward-off", addrs: v4Only(), ipMasq: true},
		{name: "ipv4-both-off", addrs: v4Only()},
		{name: "ipv6-only", addrs: Addrs{
			IPv6Network: netip.MustParsePrefix("fd00:244::/56"),
			IPv6Subnet:  netip.MustParsePrefix("fd00:244:0:1::/64"),
		}, ipMasq: true, fwdOn: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nft, nftFwd := Render(ModeNFTables, tt.addrs, tt.ipMasq, tt.fwdOn)
			autoNFT, autoFwd := Render(ModeAuto, tt.addrs, tt.ipMasq, tt.fwdOn)
			noNFT, ipt := Render(ModeIPTables, tt.addrs, tt.ipMasq, tt.fwdOn)
			if autoNFT != nft || rulesText(autoFwd) != rulesText(nftFwd) {
				t.Error("auto mode renders differently from nftables mode")
			}
			if noNFT != "" {
				t.Errorf("iptables mode renders nftables text:\n%s", noNFT)
			}
			var b strings.Builder
			b.WriteString("# nftables (modes nftables and auto)\n")
			b.WriteString(nft)
			b.WriteString("\n# iptables in modes nftables and auto: only while iptables' FORWARD policy is DROP\n")
			b.WriteString(rulesText(nftFwd))
			b.WriteString("\n# iptables (mode iptables)\n")
			b.WriteString(rulesText(ipt))
			checkGolden(t, filepath.Join("testdata", tt.name+".golden"), b.String())

			// Shape checks that do not depend on the golden file.
			if !tt.ipMasq && (strings.Contains(nft, NFTNATChain) || strings.Contains(rulesText(ipt), IPTNATChain)) {
				t.Error("ip-masq off renders NAT rules")
			}
			if !tt.fwdOn && (strings.Contains(nft, NFTForwardChain) || strings.Contains(rulesText(ipt), IPTForwardChain) || len(nftFwd) > 0) {
				t.Error("forward rules off renders forward rules")
			}
			if !tt.ipMasq && !tt.fwdOn && (nft != "" || len(ipt) > 0) {
				t.Errorf("nothing enabled but rendered:\n%s%s", nft, rulesText(ipt))
			}
			for _, r := range append(ipt, nftFwd...) {
				if !strings.Contains(strings.Join(r.Spec, " "), "-m comment --comment ") {
					t.Errorf("iptables rule without a comment: %s", r)
				}
			}
		})
	}
}

func rulesText(rs []Rule) string {
	var b strings.Builder
	for _, r := range rs {
		b.WriteString(r.String())
		b.WriteString("\n")
	}
	return b.String()
}

func checkGolden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file (run with -update to create it): %v", err)
	}
	if string(want) != got {
		t.Errorf("%s differs (run with -update after an intended change)\n--- got:\n%s\n--- want:\n%s", path, got, want)
	}
}

func TestAddrsValidate(t *testing.T) {
	p := netip.MustParsePrefix
	tests := []struct {
		name    string
		addrs   Addrs
		wantErr string // substring; "" means valid
	}{
		{name: "ipv4", addrs: v4Only()},
		{name: "dual stack", addrs: dualStack()},
		{name: "ipv6 only", addrs: Addrs{IPv6Network: p("fd00:244::/56"), IPv6Subnet: p("fd00:244:0:1::/64")}},
		{name: "empty", addrs: Addrs{}, wantErr: "neither Network nor IPv6Network"},
		{name: "subnet outside network (seed 000: kubeadm 10.224 vs flannel 10.244)",
			addrs: Addrs{Network: p("10.244.0.0/16"), Subnet: p("10.224.0.0/24")}, wantErr: "Subnet 10.224.0.0/24 is not inside Network 10.244.0.0/16"},
		{name: "subnet wider than network", addrs: Addrs{Network: p("10.244.0.0/16"), Subnet: p("10.0.0.0/8")}, wantErr: "not inside"},
		{name: "missing subnet", addrs: Addrs{Network: p("10.244.0.0/16")}, wantErr: "Subnet is not set"},
		{name: "subnet without network", addrs: Addrs{Network: p("10.244.0.0/16"), Subnet: p("10.244.1.0/24"), IPv6Subnet: p("fd00:244:0:1::/64")}, wantErr: "IPv6Subnet fd00:244:0:1::/64 is set but IPv6Network is not"},
		{name: "ipv6 in the ipv4 field", addrs: Addrs{Network: p("fd00:244::/56"), Subnet: p("fd00:244:0:1::/64")}, wantErr: "Network fd00:244::/56 is not an IPv4 prefix"},
		{name: "ipv4 in the ipv6 field", addrs: Addrs{IPv6Network: p("10.244.0.0/16"), IPv6Subnet: p("10.244.1.0/24")}, wantErr: "not an IPv6 prefix"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.addrs.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tt.wantErr != "" && err == nil:
				t.Fatalf("Validate accepted %+v, want an error containing %q", tt.addrs, tt.wantErr)
			case tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("Validate: %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}
