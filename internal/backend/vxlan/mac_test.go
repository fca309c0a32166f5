package vxlan

// Unit tests without root: VTEP MAC derivation and persistence, the lease
// data's wire shape, and the MTU rules. Files live in t.TempDir().

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
)

func TestVtepMAC(t *testing.T) {
	// A fixed value: the formula is a compatibility promise (a node keeps
	// its MAC across loom upgrades), so a change must fail this test. The
	// value was computed independently: python3 -c 'import hashlib;
	// print(hashlib.sha256(b"loom vxlan vtep mac\0n1\0flannel.1").hexdigest())'
	// gives 1f6c5442665d...: 0x1f with bit 0 cleared and bit 1 set is 0x1e.
	if got, want := VtepMAC("n1", "flannel.1").String(), "1e:6c:54:42:66:5d"; got != want {
		t.Errorf("VtepMAC(n1, flannel.1) = %s, want %s", got, want)
	}
	seen := make(map[string]string)
	for _, node := range []string{"n1", "n2", "n3", "node-a.example.com", "", "n1\x00flannel.1"} {
		for _, dev := range []string{"flannel.1", "flannel-v6.1", "flannel.2"} {
			mac := VtepMAC(node, dev)
			what := fmt.Sprintf("VtepMAC(%q, %q) = %s", node, dev, mac)
			if !bytes.Equal(mac, VtepMAC(node, dev)) {
				t.Errorf("%s: not stable", what)
			}
			if len(mac) != 6 || mac[0]&0x02 == 0 || mac[0]&0x01 != 0 {
				t.Errorf("%s: want a locally administered unicast MAC", what)
			}
			if prev, dup := seen[mac.String()]; dup {
				t.Errorf("%s: same as %s", what, prev)
			}
			seen[mac.String()] = what
		}
	}
}

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestVtepMACPersisted(t *testing.T) {
	derived := VtepMAC("n1", "flannel.1")
	pinned := net.HardwareAddr{0x02, 0, 0, 0, 0, 0x42}
	tests := []struct {
		name     string
		file     string // content before; "" : no file
		want     net.HardwareAddr
		wantFile string
	}{
		{name: "no file: derived, and persisted", want: derived, wantFile: derived.String() + "\n"},
		{name: "valid file: used as is", file: "02:00:00:00:00:42\n", want: pinned, wantFile: "02:00:00:00:00:42\n"},
		{name: "garbage: derived, file repaired", file: "not a mac", want: derived, wantFile: derived.String() + "\n"},
		{name: "multicast: derived, file repaired", file: "01:00:5e:00:00:01", want: derived, wantFile: derived.String() + "\n"},
		{name: "zero: derived, file repaired", file: "00:00:00:00:00:00", want: derived, wantFile: derived.String() + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := macFile(dir, "flannel.1")
			if tt.file != "" {
				if err := os.WriteFile(path, []byte(tt.file), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if got := vtepMAC(dir, "n1", "flannel.1", discard()); !bytes.Equal(got, tt.want) {
				t.Errorf("vtepMAC = %s, want %s", got, tt.want)
			}
			data, err := os.ReadFile(path)
			if err != nil || string(data) != tt.wantFile {
				t.Errorf("file %s holds %q (%v), want %q", path, data, err, tt.wantFile)
			}
			// What was persisted is what the next start uses.
			if got := vtepMAC(dir, "n1", "flannel.1", discard()); !bytes.Equal(got, tt.want) {
				t.Errorf("second vtepMAC = %s, want %s", got, tt.want)
			}
		})
	}
	t.Run("unwritable state dir: derived anyway", func(t *testing.T) {
		file := t.TempDir() + "/file"
		if err := os.WriteFile(file, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if got := vtepMAC(file+"/sub", "n1", "flannel.1", discard()); !bytes.Equal(got, derived) {
			t.Errorf("vtepMAC = %s, want %s", got, derived)
		}
	})
}

// flannelHardwareAddr and flannelLeaseAttrs decode BackendData the way
// flanneld's vxlan backend does (its vxlanLeaseAttrs): a uint32 VNI and a
// MAC in a JSON string, keys matched case-insensitively.
type flannelHardwareAddr net.HardwareAddr

func (hw *flannelHardwareAddr) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	m, err := net.ParseMAC(s)
	*hw = flannelHardwareAddr(m)
	return err
}

type flannelLeaseAttrs struct {
	VNI     uint32
	VtepMAC flannelHardwareAddr
}

func TestBackendData(t *testing.T) {
	cfg := Config{ExtLinkIndex: 2, ExtMTU: 1500, NodeName: "n1",
		PublicIP: netip.MustParseAddr("198.18.0.11"), PublicIPv6: netip.MustParseAddr("2001:db8::11")}
	opts := Options{VNI: 1, Port: DefaultPort}
	fams, err := families(cfg, opts, discard())
	if err != nil {
		t.Fatal(err)
	}
	n := &Network{opts: opts, fams: fams}
	for _, tc := range []struct {
		name string
		data json.RawMessage
		mac  net.HardwareAddr
	}{
		{name: "BackendData", data: n.BackendData(), mac: VtepMAC("n1", "flannel.1")},
		{name: "BackendV6Data", data: n.BackendV6Data(), mac: VtepMAC("n1", "flannel-v6.1")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := `{"VNI":1,"VtepMAC":"` + tc.mac.String() + `"}`
			if string(tc.data) != want {
				t.Fatalf("%s = %s, want %s", tc.name, tc.data, want)
			}
			var fl flannelLeaseAttrs
			if err := json.Unmarshal(tc.data, &fl); err != nil {
				t.Fatalf("flannel's decoder: %v", err)
			}
			if fl.VNI != 1 || !bytes.Equal(fl.VtepMAC, tc.mac) {
				t.Errorf("flannel decodes %+v, want VNI 1 and VtepMAC %s", fl, tc.mac)
			}
			// And back: what we write, we read.
			pd, err := decodeData(tc.data)
			if err != nil || pd.vni != 1 || !pd.hasVNI || !bytes.Equal(pd.mac, tc.mac) {
				t.Errorf("decodeData = %+v, %v", pd, err)
			}
		})
	}

	// What flanneld writes, spelled its way, decodes.
	pd, err := decodeData(json.RawMessage(`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f0"}`))
	if err != nil || pd.mac.String() != "aa:bb:cc:dd:ee:f0" || pd.vni != 1 {
		t.Errorf("decodeData of flannel's data = %+v, %v", pd, err)
	}
	for raw, want := range map[string]string{
		``:                                 "it is missing",
		`{"VNI":1}`:                        `{"VNI":1} has no VtepMAC`,
		`{"VtepMAC":"zz"}`:                 `VtepMAC "zz": address zz: invalid MAC address`,
		`{"VtepMAC":"01:00:5e:00:00:01"}`:  `VtepMAC "01:00:5e:00:00:01": 01:00:5e:00:00:01 is a multicast address`,
		`{"VNI":"1","VtepMAC":"02:00:00"}`: `{"VNI":"1","VtepMAC":"02:00:00"} is not vxlan backend data`,
	} {
		if _, err := decodeData(json.RawMessage(raw)); err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("decodeData(%s) error %v, want it to start with %q", raw, err, want)
		}
	}

	v4only := &Network{opts: opts, fams: fams[:1]}
	if v4only.BackendV6Data() != nil {
		t.Errorf("BackendV6Data with IPv6 off = %s, want nil", v4only.BackendV6Data())
	}
}

func TestMTU(t *testing.T) {
	v4 := netip.MustParseAddr("198.18.0.11")
	v6 := netip.MustParseAddr("2001:db8::11")
	tests := []struct {
		name      string
		ext       int
		optMTU    int
		v4, v6    netip.Addr
		wantDevs  map[string]int // device MTUs
		wantMTU   int            // pods'
		wantError string
	}{
		{name: "IPv4 underlay: -50", ext: 1500, v4: v4, wantDevs: map[string]int{"flannel.1": 1450}, wantMTU: 1450},
		{name: "IPv6 underlay: -70", ext: 1500, v6: v6, wantDevs: map[string]int{"flannel-v6.1": 1430}, wantMTU: 1430},
		{name: "dual stack: pods get the smaller", ext: 1500, v4: v4, v6: v6,
			wantDevs: map[string]int{"flannel.1": 1450, "flannel-v6.1": 1430}, wantMTU: 1430},
		{name: "jumbo underlay", ext: 9000, v4: v4, wantDevs: map[string]int{"flannel.1": 8950}, wantMTU: 8950},
		{name: "Backend.MTU stands for the underlay's, as in flannel", ext: 1500, optMTU: 1400, v4: v4, v6: v6,
			wantDevs: map[string]int{"flannel.1": 1350, "flannel-v6.1": 1330}, wantMTU: 1330},
		{name: "Backend.MTU without ExtMTU", optMTU: 1400, v4: v4, wantDevs: map[string]int{"flannel.1": 1350}, wantMTU: 1350},
		{name: "Backend.MTU above the underlay's", ext: 1500, optMTU: 9000, v4: v4,
			wantError: "Backend.MTU 9000 is above the underlay interface's MTU 1500: encapsulated packets would not fit; lower it or leave it out"},
		{name: "no MTU at all", v4: v4,
			wantError: "Config.ExtMTU 0 is not an MTU: pass the underlay interface's MTU, or set Backend.MTU"},
		{name: "IPv6 underlay too small for IPv6", ext: 1340, v6: v6,
			wantError: "an underlay MTU of 1340 leaves 1270 for pods over an IPv6 underlay, below IPv6's minimum 1280: raise the underlay's MTU (and Backend.MTU if set) to at least 1350"},
		{name: "IPv4 underlay too small", ext: 100, v4: v4,
			wantError: "an underlay MTU of 100 leaves 50 for pods, below IPv4's minimum 68: raise the underlay's MTU (and Backend.MTU if set)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{ExtLinkIndex: 2, ExtMTU: tt.ext, NodeName: "n1", PublicIP: tt.v4, PublicIPv6: tt.v6}
			opts := Options{VNI: 1, Port: DefaultPort, MTU: tt.optMTU}
			fams, err := families(cfg, opts, discard())
			if tt.wantError != "" {
				if err == nil || err.Error() != tt.wantError {
					t.Fatalf("error\n %v\nwant\n %s", err, tt.wantError)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := make(map[string]int)
			for _, f := range fams {
				got[f.dev] = f.mtu
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.wantDevs) {
				t.Errorf("device MTUs %v, want %v", got, tt.wantDevs)
			}
			if m := (&Network{fams: fams}).MTU(); m != tt.wantMTU {
				t.Errorf("MTU() = %d, want %d", m, tt.wantMTU)
			}
		})
	}
}

func TestNewConfigErrors(t *testing.T) {
	v4 := netip.MustParseAddr("198.18.0.11")
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{ExtMTU: 1500, NodeName: "n1", PublicIP: v4}, "vxlan: Config.ExtLinkIndex is not set"},
		{Config{ExtLinkIndex: 2, ExtMTU: 1500, PublicIP: v4}, "vxlan: Config.NodeName is empty"},
		{Config{ExtLinkIndex: 2, ExtMTU: 1500, NodeName: "n1"}, "vxlan: neither Config.PublicIP nor Config.PublicIPv6 is set"},
		{Config{ExtLinkIndex: 2, ExtMTU: 1500, NodeName: "n1", PublicIP: netip.MustParseAddr("2001:db8::11")}, "vxlan: Config.PublicIP 2001:db8::11 is not an IPv4 address"},
		{Config{ExtLinkIndex: 2, ExtMTU: 1500, NodeName: "n1", PublicIPv6: v4}, "vxlan: Config.PublicIPv6 198.18.0.11 is not an IPv6 address"},
		{Config{ExtLinkIndex: 2, ExtMTU: 1500, NodeName: "n1", PublicIP: v4, Resync: -1}, "vxlan: Config.Resync -1ns is negative"},
		{Config{ExtLinkIndex: 2, ExtMTU: 1500, NodeName: "n1", PublicIP: v4, Backend: json.RawMessage(`{"VNI":-1}`)}, "vxlan: Backend.VNI -1 is out of range"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("New(%+v) error %v, want it to start with %q", tc.cfg, err, tc.want)
		}
	}
}
