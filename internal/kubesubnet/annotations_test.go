package kubesubnet

// Address plan: node underlay 198.18.0.0/24 (n1 .11, n2 .12, n3 .13) and
// 2001:db8::/64 for IPv6; pods 10.244.0.0/16 (node /24s) and
// fd00:10:244::/56 (node /64s).

import (
	"encoding/json"
	"errors"
	"maps"
	"net/netip"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/loomnet/loom/internal/lease"
	"github.com/loomnet/loom/internal/netconf"
	"github.com/loomnet/loom/internal/registry"
)

const (
	vtepMAC   = "5e:1f:0a:9c:33:01"
	vxlanData = `{"VNI":1,"VtepMAC":"` + vtepMAC + `"}`
	pfx       = DefaultAnnotationPrefix
)

func addrPtr(s string) *netip.Addr {
	a := netip.MustParseAddr(s)
	return &a
}

func mustConfig(t *testing.T, s string) netconf.Config {
	t.Helper()
	cfg, err := netconf.Parse([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestDesiredAnnotationsAreFlannels pins the annotations byte for byte to
// what flanneld v0.28 writes for the same lease attributes: a flanneld
// peer decodes exactly these.
func TestDesiredAnnotationsAreFlannels(t *testing.T) {
	for _, tc := range []struct {
		name      string
		attrs     lease.Attrs
		cur       map[string]string
		want      map[string]string
		badOverOK bool // an unusable override is reported
	}{
		{
			name:  "vxlan",
			attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "vxlan", BackendData: json.RawMessage(vxlanData)},
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "vxlan",
				pfx + "backend-data":        vxlanData,
				pfx + "public-ip":           "198.18.0.11",
			},
		},
		{
			name:  "host-gw has no backend data: null, as flannel marshals a nil RawMessage",
			attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "host-gw"},
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "host-gw",
				pfx + "backend-data":        "null",
				pfx + "public-ip":           "198.18.0.11",
			},
		},
		{
			name:  "udp",
			attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "udp"},
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "udp",
				pfx + "backend-data":        "null",
				pfx + "public-ip":           "198.18.0.11",
			},
		},
		{
			name: "vxlan dual stack",
			attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), PublicIPv6: addrPtr("2001:db8::11"), BackendType: "vxlan",
				BackendData: json.RawMessage(vxlanData), BackendV6Data: json.RawMessage(`{"VNI":1,"VtepMAC":"5e:1f:0a:9c:33:02"}`)},
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "vxlan",
				pfx + "backend-data":        vxlanData,
				pfx + "public-ip":           "198.18.0.11",
				pfx + "backend-v6-data":     `{"VNI":1,"VtepMAC":"5e:1f:0a:9c:33:02"}`,
				pfx + "public-ipv6":         "2001:db8::11",
			},
		},
		{
			name:  "vxlan IPv6 only writes no IPv4 leg",
			attrs: lease.Attrs{PublicIPv6: addrPtr("2001:db8::11"), BackendType: "vxlan", BackendV6Data: json.RawMessage(vxlanData)},
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "vxlan",
				pfx + "backend-v6-data":     vxlanData,
				pfx + "public-ipv6":         "2001:db8::11",
			},
		},
		{
			name:  "host-gw IPv6 only: flannel writes public-ip 0.0.0.0",
			attrs: lease.Attrs{PublicIPv6: addrPtr("2001:db8::11"), BackendType: "host-gw"},
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "host-gw",
				pfx + "backend-data":        "null",
				pfx + "public-ip":           "0.0.0.0",
				pfx + "backend-v6-data":     "null",
				pfx + "public-ipv6":         "2001:db8::11",
			},
		},
		{
			name:  "the operator's public-ip-overwrite is what peers get",
			attrs: lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "vxlan", BackendData: json.RawMessage(vxlanData)},
			cur:   map[string]string{pfx + "public-ip-overwrite": "198.18.1.11"},
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "vxlan",
				pfx + "backend-data":        vxlanData,
				pfx + "public-ip":           "198.18.1.11",
			},
		},
		{
			name:      "an override that is no address is not published",
			attrs:     lease.Attrs{PublicIP: netip.MustParseAddr("198.18.0.11"), BackendType: "vxlan", BackendData: json.RawMessage(vxlanData)},
			cur:       map[string]string{pfx + "public-ip-overwrite": "node-1.example"},
			badOverOK: true,
			want: map[string]string{
				pfx + "kube-subnet-manager": "true",
				pfx + "backend-type":        "vxlan",
				pfx + "backend-data":        vxlanData,
				pfx + "public-ip":           "198.18.0.11",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := NewAnnotations(pfx)
			if err != nil {
				t.Fatal(err)
			}
			got, bad := a.desired(tc.attrs, tc.cur)
			if !maps.Equal(got, tc.want) {
				t.Errorf("annotations:\n got  %v\n want %v", got, tc.want)
			}
			if (len(bad) > 0) != tc.badOverOK {
				t.Errorf("unusable overrides %v, want reported: %v", bad, tc.badOverOK)
			}
		})
	}
}

func TestAnnotationPrefixes(t *testing.T) {
	a, err := NewAnnotations("example.com/net-")
	if err != nil {
		t.Fatal(err)
	}
	if got := a.Key(AnnPublicIPOverwrite); got != "example.com/net-public-ip-overwrite" {
		t.Errorf("key = %q", got)
	}
	if a, err := NewAnnotations(""); err != nil || a.Key(AnnBackendType) != "flannel.alpha.coreos.com/backend-type" {
		t.Errorf("default prefix: %v %q", err, a.Key(AnnBackendType))
	}
	if _, err := NewAnnotations("example.com"); err == nil {
		t.Error("a prefix not in normalised form was accepted")
	}
}

func node(name string, podCIDRs []string, ann map[string]string) *v1.Node {
	n := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
	if len(podCIDRs) > 0 {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = podCIDRs[0], podCIDRs
	}
	return n
}

// flannelNode returns a Node as a flanneld (or loom) vxlan node annotates it.
func flannelNode(name, podCIDR, publicIP string) *v1.Node {
	return node(name, []string{podCIDR}, map[string]string{
		pfx + "kube-subnet-manager": "true",
		pfx + "backend-type":        "vxlan",
		pfx + "backend-data":        vxlanData,
		pfx + "public-ip":           publicIP,
	})
}

func TestNodeLease(t *testing.T) {
	v4 := mustConfig(t, `{"Network":"10.244.0.0/16"}`)
	dual := mustConfig(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`)
	with := func(n *v1.Node, f func(*v1.Node)) *v1.Node { f(n); return n }
	for _, tc := range []struct {
		name   string
		node   *v1.Node
		cfg    netconf.Config
		want   lease.Lease
		reason string // skip reason, or "not-peer"
	}{
		{
			name: "vxlan peer",
			node: flannelNode("n2", "10.244.2.0/24", "198.18.0.12"),
			cfg:  v4,
			want: lease.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), Attrs: lease.Attrs{
				PublicIP: netip.MustParseAddr("198.18.0.12"), BackendType: "vxlan", BackendData: json.RawMessage(vxlanData), NodeName: "n2"}},
		},
		{
			name: "host-gw's null backend data is none, as from etcd",
			node: node("n2", []string{"10.244.2.0/24"}, map[string]string{
				pfx + "kube-subnet-manager": "true", pfx + "backend-type": "host-gw", pfx + "backend-data": "null", pfx + "public-ip": "198.18.0.12"}),
			cfg: v4,
			want: lease.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), Attrs: lease.Attrs{
				PublicIP: netip.MustParseAddr("198.18.0.12"), BackendType: "host-gw", NodeName: "n2"}},
		},
		{
			name: "only spec.podCIDR (an old controller, or by hand)",
			node: with(flannelNode("n2", "10.244.2.0/24", "198.18.0.12"), func(n *v1.Node) { n.Spec.PodCIDRs = nil }),
			cfg:  v4,
			want: lease.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), Attrs: lease.Attrs{
				PublicIP: netip.MustParseAddr("198.18.0.12"), BackendType: "vxlan", BackendData: json.RawMessage(vxlanData), NodeName: "n2"}},
		},
		{
			name: "dual stack",
			node: node("n2", []string{"10.244.2.0/24", "fd00:10:244:2::/64"}, map[string]string{
				pfx + "kube-subnet-manager": "true", pfx + "backend-type": "vxlan",
				pfx + "backend-data": vxlanData, pfx + "public-ip": "198.18.0.12",
				pfx + "backend-v6-data": vxlanData, pfx + "public-ipv6": "2001:db8::12"}),
			cfg: dual,
			want: lease.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:2::/64"), Attrs: lease.Attrs{
				PublicIP: netip.MustParseAddr("198.18.0.12"), PublicIPv6: addrPtr("2001:db8::12"), BackendType: "vxlan",
				BackendData: json.RawMessage(vxlanData), BackendV6Data: json.RawMessage(vxlanData), NodeName: "n2"}},
		},
		{
			name: "0.0.0.0 is no address (the Guard skips it)",
			node: flannelNode("n2", "10.244.2.0/24", "0.0.0.0"),
			cfg:  v4,
			want: lease.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), Attrs: lease.Attrs{
				BackendType: "vxlan", BackendData: json.RawMessage(vxlanData), NodeName: "n2"}},
		},
		{name: "no kube-subnet-manager annotation", node: node("n2", []string{"10.244.2.0/24"}, nil), cfg: v4, reason: "not-peer"},
		{name: "no podCIDR yet", node: with(flannelNode("n2", "10.244.2.0/24", "198.18.0.12"), func(n *v1.Node) { n.Spec = v1.NodeSpec{} }), cfg: v4, reason: "not-peer"},
		{
			name:   "backend-data not JSON",
			node:   with(flannelNode("n2", "10.244.2.0/24", "198.18.0.12"), func(n *v1.Node) { n.Annotations[pfx+"backend-data"] = "{VNI:1" }),
			cfg:    v4,
			reason: registry.SkipUndecodable,
		},
		{name: "public-ip not an address", node: flannelNode("n2", "10.244.2.0/24", "198.18.0.300"), cfg: v4, reason: registry.SkipUndecodable},
		{name: "public-ip of the wrong family", node: flannelNode("n2", "10.244.2.0/24", "2001:db8::12"), cfg: v4, reason: registry.SkipUndecodable},
		{name: "podCIDR not a CIDR", node: flannelNode("n2", "10.244.2.0", "198.18.0.12"), cfg: v4, reason: registry.SkipUndecodable},
		{name: "podCIDR with host bits", node: flannelNode("n2", "10.244.2.1/24", "198.18.0.12"), cfg: v4, reason: registry.SkipUndecodable},
		{
			name:   "no backend-type",
			node:   with(flannelNode("n2", "10.244.2.0/24", "198.18.0.12"), func(n *v1.Node) { delete(n.Annotations, pfx+"backend-type") }),
			cfg:    v4,
			reason: registry.SkipUndecodable,
		},
		{name: "dual stack without an IPv6 podCIDR", node: flannelNode("n2", "10.244.2.0/24", "198.18.0.12"), cfg: dual, reason: registry.SkipBadSubnet},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, _ := NewAnnotations(pfx)
			got, err := a.NodeLease(tc.node, tc.cfg)
			var skip *SkipError
			switch {
			case tc.reason == "not-peer":
				if !errors.Is(err, ErrNotPeer) {
					t.Fatalf("got %v, %v; want not a peer", got, err)
				}
			case tc.reason != "":
				if !errors.As(err, &skip) || skip.Reason != tc.reason {
					t.Fatalf("got %v, %v; want skipped as %s", got, err, tc.reason)
				}
				if !strings.Contains(skip.Detail, pfx) && tc.reason == registry.SkipUndecodable && !strings.Contains(skip.Detail, "podCIDR") {
					t.Errorf("detail %q names neither the annotation nor the podCIDR", skip.Detail)
				}
			case err != nil:
				t.Fatal(err)
			case !sameLease(got, tc.want):
				t.Errorf("lease:\n got  %+v\n want %+v", got, tc.want)
			}
		})
	}
}

func TestNodePublicIPs(t *testing.T) {
	a, _ := NewAnnotations(pfx)
	v4, v6, err := a.NodePublicIPs(map[string]string{pfx + "node-public-ip": "198.18.1.11", pfx + "node-public-ipv6": "2001:db8::11"})
	if err != nil || v4 != netip.MustParseAddr("198.18.1.11") || v6 != netip.MustParseAddr("2001:db8::11") {
		t.Fatalf("got %v %v %v", v4, v6, err)
	}
	_, _, err = a.NodePublicIPs(map[string]string{pfx + "node-public-ip": "2001:db8::11"})
	if err == nil || !strings.Contains(err.Error(), pfx+"node-public-ip") || !strings.Contains(err.Error(), "kubectl annotate") {
		t.Fatalf("error %v, want one naming the annotation and the kubectl fix", err)
	}
}
