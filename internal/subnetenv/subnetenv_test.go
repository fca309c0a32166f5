package subnetenv

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Address plan: pods 10.244.0.0/16, node subnet 10.244.1.0/24, IPv6 fc00::/48.

func TestWriteReadRoundTrip(t *testing.T) {
	want := Env{
		Network:     netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:      netip.MustParsePrefix("10.244.1.1/24"),
		IPv6Network: netip.MustParsePrefix("fc00::/48"),
		IPv6Subnet:  netip.MustParsePrefix("fc00:0:0:1::1/64"),
		MTU:         1450,
		IPMasq:      true,
	}
	path := filepath.Join(t.TempDir(), "flannel", "subnet.env")
	if err := Write(path, want); err != nil {
		t.Fatal(err)
	}
	got, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("round trip: got %+v, want %+v", got, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o644 {
		t.Errorf("mode %v, want 0644", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only subnet.env (temp file left behind?)", len(entries))
	}
}

// flanneld's own output must parse, byte for byte in flannel's key order.
func TestFlannelFormat(t *testing.T) {
	flannel := "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
	e, err := Parse([]byte(flannel))
	if err != nil {
		t.Fatal(err)
	}
	if got := string(e.Marshal()); got != flannel {
		t.Errorf("marshal:\n%s\nwant flannel's:\n%s", got, flannel)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{name: "bad subnet", in: "FLANNEL_SUBNET=10.244.1/24\nFLANNEL_MTU=1450\n", want: `FLANNEL_SUBNET="10.244.1/24" is not an address/prefix`},
		{name: "bad mtu", in: "FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=9\n", want: `FLANNEL_MTU="9" is not an MTU`},
		{name: "no subnet", in: "FLANNEL_MTU=1450\n", want: "neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET is set"},
		{name: "no mtu", in: "FLANNEL_SUBNET=10.244.1.1/24\n", want: "FLANNEL_MTU is not set"},
		{name: "v6 in v4 key", in: "FLANNEL_SUBNET=fc00::1/64\nFLANNEL_MTU=1450\n", want: "is not IPv4"},
		{name: "bad masq", in: "FLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n", want: `FLANNEL_IPMASQ="yes" is not true or false`},
		{name: "no equals", in: "FLANNEL_SUBNET\n", want: "want KEY=VALUE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestReadMissing(t *testing.T) {
	_, err := Read(filepath.Join(t.TempDir(), "nope.env"))
	if !errors.Is(err, ErrNotExist) {
		t.Fatalf("error %v, want ErrNotExist", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"))
	f.Add([]byte("FLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1430\n# comment\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := Parse(data)
		if err != nil {
			return
		}
		// Whatever parses must survive a round trip unchanged.
		again, err := Parse(e.Marshal())
		if err != nil {
			t.Fatalf("re-parse of %q: %v", e.Marshal(), err)
		}
		if again != e {
			t.Fatalf("round trip changed %+v into %+v", e, again)
		}
	})
}
