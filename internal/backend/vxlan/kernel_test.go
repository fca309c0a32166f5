package vxlan

import (
	"encoding/json"
	"testing"
)

func TestHasChecksumBug(t *testing.T) {
	for _, tc := range []struct {
		release string
		bug     bool
	}{
		{release: "6.18.44-fc-v669", bug: false},
		{release: "5.7.0", bug: false},
		{release: "5.10.0-21-amd64", bug: false},
		{release: "5.6.12", bug: true},
		{release: "5.6.13", bug: false},
		{release: "5.4.40-generic", bug: true},
		{release: "5.4.41-generic", bug: false},
		{release: "4.19.122", bug: true},
		{release: "4.19.123", bug: false},
		{release: "4.14.181", bug: false},
		{release: "3.10.0-1160.el7.x86_64", bug: true}, // RHEL 7: the kernel of flannel#1279
		{release: "5.5.19", bug: true},
		{release: "garbage", bug: true},
		{release: "", bug: true},
	} {
		if got := hasChecksumBug(tc.release); got != tc.bug {
			t.Errorf("hasChecksumBug(%q) = %v, want %v", tc.release, got, tc.bug)
		}
	}
}

func TestTxChecksumChoice(t *testing.T) {
	for _, tc := range []struct {
		name    string
		backend string
		kernel  string
		want    bool
	}{
		{name: "fixed kernel keeps offload", backend: `{"Type":"vxlan"}`, kernel: "6.1.0", want: true},
		{name: "buggy kernel turns it off", backend: `{"Type":"vxlan"}`, kernel: "5.4.0", want: false},
		{name: "forced off (behind a NAT)", backend: `{"Type":"vxlan","ChecksumOffload":false}`, kernel: "6.1.0", want: false},
		{name: "forced on", backend: `{"Type":"vxlan","checksumoffload":true}`, kernel: "5.4.0", want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts, err := ParseOptions(json.RawMessage(tc.backend))
			if err != nil {
				t.Fatal(err)
			}
			n := &Network{opts: opts, cfg: Config{KernelRelease: tc.kernel}}
			if got := n.txChecksum(); got != tc.want {
				t.Fatalf("txChecksum() = %v, want %v", got, tc.want)
			}
		})
	}
}
