package doctor

import (
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/loomnet/loom/internal/cni"
)

func TestCheckCNIConfig(t *testing.T) {
	runCases(t, checkCNIConfig, []checkCase{
		{name: "healthy", want: OK, in: "10-loom.conflist"},
		{name: "missing (SELinux denied the installer)", change: func(f *Facts) { f.CNI.Files = nil },
			want: Fail, in: "no CNI network configuration in /etc/cni/net.d", fix: `"subnetFile": "/run/flannel/subnet.env"`},
		{name: "dir unreadable", change: func(f *Facts) { f.CNI.DirErr = fs.ErrPermission },
			want: Fail, in: "permission denied", fix: "restorecon"},
		{name: "only an invalid file", change: func(f *Facts) {
			f.CNI.Files = []CNIFile{{Path: "/etc/cni/net.d/10-loom.conflist", Err: errors.New("unexpected end of JSON input")}}
		}, want: Fail, in: "unexpected end of JSON input"},
		{name: "invalid file sorts first", change: func(f *Facts) {
			f.CNI.Files = append([]CNIFile{{Path: "/etc/cni/net.d/05-old.conf", Err: errors.New("permission denied")}}, f.CNI.Files...)
		}, want: Warn, in: "05-old.conf sorts first but is invalid"},
		{name: "another CNI first", change: func(f *Facts) {
			f.CNI.Files = append([]CNIFile{{Path: "/etc/cni/net.d/05-calico.conflist", Name: "k8s-pod-network", Plugins: []string{"calico"}}}, f.CNI.Files...)
		}, want: Warn, in: "neither loom-cni nor flannel", fix: "sorts first"},
		{name: "subnetFile differs from -subnet-file", change: func(f *Facts) {
			f.CNI.Files[0].Loom = &cni.Config{Name: "loom", SubnetFile: "/run/flannel/other.env", DataDir: "/var/lib/cni/networks", Bridge: "cni0"}
		}, want: Fail, in: "reads /run/flannel/other.env but the agent writes /run/flannel/subnet.env", fix: `"subnetFile": "/run/flannel/subnet.env"`},
	})
}

func TestCheckCNI0Address(t *testing.T) {
	setCNI0 := func(addrs ...string) func(*Facts) {
		return func(f *Facts) {
			var ps []netip.Prefix
			for _, a := range addrs {
				ps = append(ps, pfx(a))
			}
			f.Kernel.Links[2].Addrs = ps
		}
	}
	runCases(t, checkCNI0Address, []checkCase{
		{name: "healthy", want: OK, in: "cni0 holds gateway 10.244.1.1/24"},
		{name: "node moved, cni0 kept the old gateway", change: func(f *Facts) {
			f.Store.Leases[0].Subnet = pfx("10.244.7.0/24")
			f.SubnetEnv.Env.Subnet = pfx("10.244.7.1/24")
		}, want: Fail, in: "cni0 holds 10.244.1.1/24, not in this node's subnet 10.244.7.0/24", fix: "ip addr del 10.244.1.1/24 dev cni0"},
		{name: "old and new side by side", change: setCNI0("10.244.1.1/24", "10.244.9.1/24"),
			want: Fail, in: "10.244.9.1/24"},
		{name: "foreign address kept", change: setCNI0("10.244.1.1/24", "192.168.5.1/24"), want: OK},
		{name: "gateway missing", change: setCNI0(), want: Warn, in: "lacks the gateway 10.244.1.1/24"},
		{name: "no bridge yet", change: func(f *Facts) { f.Kernel.Links = f.Kernel.Links[:2] }, want: OK, in: "no cni0 yet"},
		{name: "bridge named in the CNI config", change: func(f *Facts) {
			f.CNI.Files[0].Loom.Bridge = "loom0"
		}, want: OK, in: "no loom0 yet"},
		{name: "subnet unknown", change: func(f *Facts) { f.SubnetEnv.Env = nil; f.Store.Leases = nil }, want: Skip},
	})
}

// readCNIFile parses what libcni parses, and loom-cni's entry with
// loom-cni's rules.
func TestReadCNIFile(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, file, content string
		wantErr             bool
		wantSubnet          string
		wantPlugins         int
	}{
		{name: "loom conflist", file: "10-loom.conflist",
			content:    `{"cniVersion":"1.1.0","name":"loom","plugins":[{"type":"loom-cni","subnetFile":"/run/x/subnet.env"},{"type":"portmap"}]}`,
			wantSubnet: "/run/x/subnet.env", wantPlugins: 2},
		{name: "flannel conflist", file: "10-flannel.conflist",
			content:    `{"cniVersion":"0.3.1","name":"cbr0","plugins":[{"type":"flannel","delegate":{"isDefaultGateway":true}}]}`,
			wantSubnet: "/run/flannel/subnet.env", wantPlugins: 1},
		{name: "single conf", file: "10-loom.conf", content: `{"cniVersion":"1.1.0","name":"loom","type":"loom-cni"}`,
			wantSubnet: "/run/flannel/subnet.env", wantPlugins: 1},
		{name: "not JSON", file: "10-bad.conflist", content: `{"name":`, wantErr: true},
		{name: "bad loom field", file: "10-loom.conflist",
			content: `{"cniVersion":"1.1.0","name":"loom","plugins":[{"type":"loom-cni","subnetFile":"relative"}]}`, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.file)
			if err := os.WriteFile(path, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			f := readCNIFile(path)
			if (f.Err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", f.Err, tc.wantErr)
			}
			if tc.wantErr {
				return
			}
			if f.Loom == nil || f.Loom.SubnetFile != tc.wantSubnet || len(f.Plugins) != tc.wantPlugins {
				t.Fatalf("got %+v (loom %+v)", f, f.Loom)
			}
		})
	}
}
