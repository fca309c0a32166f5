package lease

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
)

// Address plan: pods 10.244.0.0/16 and fc00::/48, underlay 198.18.0.0/15.

func TestKeyRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name   string
		v4, v6 string
		key    string
	}{
		{name: "v4", v4: "10.244.1.0/24", key: "10.244.1.0-24"},
		{name: "dual", v4: "10.244.1.0/24", v6: "fc00:0:0:1::/64", key: "10.244.1.0-24&fc00:0:0:1::-64"},
		{name: "v6 only", v6: "fc00:0:0:2::/64", key: "fc00:0:0:2::-64"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var v4, v6 netip.Prefix
			if tc.v4 != "" {
				v4 = netip.MustParsePrefix(tc.v4)
			}
			if tc.v6 != "" {
				v6 = netip.MustParsePrefix(tc.v6)
			}
			if got := MakeKey(v4, v6); got != tc.key {
				t.Fatalf("MakeKey = %q, want %q", got, tc.key)
			}
			g4, g6, err := ParseKey("/coreos.com/network/subnets/" + tc.key)
			if err != nil {
				t.Fatal(err)
			}
			if g4 != v4 || g6 != v6 {
				t.Fatalf("ParseKey = %v %v, want %v %v", g4, g6, v4, v6)
			}
		})
	}
}

func TestParseKeyErrors(t *testing.T) {
	for _, key := range []string{"10.244.1.0", "10.244.1.1-24", "10.244.1.0-33", "10.244.1.0-x", "fc00::-64&10.244.1.0-24", "10.244.1.0-24&10.244.2.0-24", "10.244.1.0-024", "a.b.c.d-24"} {
		if _, _, err := ParseKey(key); err == nil {
			t.Errorf("ParseKey(%q) succeeded, want an error", key)
		}
	}
}

// Values written by flanneld v0.28 must decode, and ours must encode the way
// flanneld writes them (PublicIPv6 null, not omitted).
func TestAttrsFlannelJSON(t *testing.T) {
	flannel := `{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}}`
	a, err := UnmarshalAttrs([]byte(flannel))
	if err != nil {
		t.Fatal(err)
	}
	if a.PublicIP != netip.MustParseAddr("198.18.0.11") || a.PublicIPv6 != nil || a.BackendType != "vxlan" {
		t.Fatalf("decoded %+v", a)
	}
	out, err := MarshalAttrs(a)
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != flannel {
		t.Fatalf("encoded\n%s\nwant flannel's\n%s", out, flannel)
	}

	v6 := netip.MustParseAddr("2001:db8::11")
	a.PublicIPv6 = &v6
	a.NodeName = "n1"
	out, err = MarshalAttrs(a)
	if err != nil {
		t.Fatal(err)
	}
	back, err := UnmarshalAttrs(out)
	if err != nil {
		t.Fatal(err)
	}
	if *back.PublicIPv6 != v6 || back.NodeName != "n1" || !bytes.Equal(back.BackendData, a.BackendData) {
		t.Fatalf("round trip: %+v", back)
	}
}

func TestAttrsErrors(t *testing.T) {
	for _, in := range []string{`{"PublicIP":"fc00::1"}`, `{"PublicIPv6":"198.18.0.1"}`, `{"PublicIP":"nope"}`, `[]`} {
		if _, err := UnmarshalAttrs([]byte(in)); err == nil {
			t.Errorf("UnmarshalAttrs(%s) succeeded, want an error", in)
		}
	}
	if _, err := MarshalAttrs(Attrs{}); err == nil || !strings.Contains(err.Error(), "neither PublicIP") {
		t.Errorf("MarshalAttrs of empty attrs: %v", err)
	}
}

func FuzzUnmarshalAttrs(f *testing.F) {
	f.Add([]byte(`{"PublicIP":"198.18.0.11","PublicIPv6":null,"BackendType":"host-gw"}`))
	f.Add([]byte(`{"PublicIP":"198.18.0.12","PublicIPv6":"2001:db8::12","BackendType":"vxlan","BackendData":{"VNI":1},"NodeName":"n2"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := UnmarshalAttrs(data)
		if err != nil {
			return
		}
		out, err := MarshalAttrs(a)
		if err != nil {
			return // no public address at all: refused on write, fine on read
		}
		b, err := UnmarshalAttrs(out)
		if err != nil {
			t.Fatalf("re-decode of %s: %v", out, err)
		}
		out2, _ := MarshalAttrs(b)
		if !bytes.Equal(out, out2) {
			t.Fatalf("not stable: %s then %s", out, out2)
		}
	})
}

func FuzzParseKey(f *testing.F) {
	f.Add("10.244.1.0-24")
	f.Add("10.244.1.0-24&fc00:0:0:1::-64")
	f.Fuzz(func(t *testing.T, key string) {
		v4, v6, err := ParseKey(key)
		if err != nil {
			return
		}
		k := MakeKey(v4, v6)
		a, b, err := ParseKey(k)
		if err != nil || a != v4 || b != v6 {
			t.Fatalf("%q -> %q -> %v %v %v", key, k, a, b, err)
		}
	})
}
