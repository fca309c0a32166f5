package kubesubnet

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"

	"github.com/loomnet/loom/internal/lease"
)

// DefaultAnnotationPrefix is flannel's annotation prefix (its
// -kube-annotation-prefix default), with the "/" flannel appends.
const DefaultAnnotationPrefix = "flannel.alpha.coreos.com/"

// Annotation names after the prefix. They are flannel's (v0.28): a flanneld
// node reads what loom writes and the other way round, so one cluster can
// run both while it migrates. Doctor reads them through these names too.
const (
	AnnKubeSubnetManager   = "kube-subnet-manager"   // "true" on every node whose agent runs in kube mode
	AnnBackendType         = "backend-type"          // "vxlan", "host-gw", "udp"
	AnnBackendData         = "backend-data"          // the backend's JSON, e.g. {"VNI":1,"VtepMAC":"..."}; "null" when it has none
	AnnBackendV6Data       = "backend-v6-data"       // the same for the IPv6 leg
	AnnPublicIP            = "public-ip"             // the IPv4 address peers send to
	AnnPublicIPv6          = "public-ipv6"           // the IPv6 address peers send to
	AnnPublicIPOverwrite   = "public-ip-overwrite"   // the operator's override of public-ip
	AnnPublicIPv6Overwrite = "public-ipv6-overwrite" // the operator's override of public-ipv6
	AnnNodePublicIP        = "node-public-ip"        // the operator's choice of -public-ip, read at start
	AnnNodePublicIPv6      = "node-public-ipv6"      // the same for -public-ipv6
)

const (
	annotationTrue     = "true"
	jsonNull           = "null"
	unspecifiedIPv4Str = "0.0.0.0"
)

// Annotations are the full annotation keys under one prefix, and how the
// agent reads their values. The zero value uses DefaultAnnotationPrefix.
type Annotations struct {
	// Prefix in the normalised form options gives, e.g.
	// "flannel.alpha.coreos.com/" or "example.com/net-".
	Prefix string
}

// NewAnnotations checks a prefix as options.Options gives it: already in
// flannel's normalised form, ending in "/" (a domain) or "-" (a domain and
// a name stem, as in "example.com/net-"). "" is the default prefix.
func NewAnnotations(prefix string) (Annotations, error) {
	if prefix == "" {
		prefix = DefaultAnnotationPrefix
	}
	if strings.Count(prefix, "/") != 1 || !(strings.HasSuffix(prefix, "/") || strings.HasSuffix(prefix, "-")) {
		return Annotations{}, fmt.Errorf("annotation prefix %q is not in normalised form (DOMAIN/ or DOMAIN/NAME-)", prefix)
	}
	return Annotations{Prefix: prefix}, nil
}

// Key is the full key of an annotation name (one of the Ann constants).
func (a Annotations) Key(name string) string {
	if a.Prefix == "" {
		return DefaultAnnotationPrefix + name
	}
	return a.Prefix + name
}

// Managed reports whether annotations carry kube-subnet-manager "true":
// an agent in Kubernetes mode (loom's or flanneld's) announces the node.
func (a Annotations) Managed(ann map[string]string) bool {
	return ann[a.Key(AnnKubeSubnetManager)] == annotationTrue
}

// desired returns the annotations this node must carry for attrs, as
// flanneld writes them, byte for byte:
//
//   - kube-subnet-manager is "true" and backend-type the backend's name;
//   - backend-data is the backend's JSON, and "null" for a backend without
//     any (host-gw, udp); a vxlan node without an IPv4 leg writes neither
//     it nor public-ip;
//   - public-ip is public-ip-overwrite when the operator set one, else the
//     node's address ("0.0.0.0" when it has no IPv4 address);
//   - backend-v6-data and public-ipv6 likewise when the node has an IPv6
//     leg (vxlan: IPv6 backend data; host-gw: an IPv6 public address).
//
// cur is the node's current annotations, for the overrides. badOverride
// names an override that is not an address of its family: it is ignored
// (peers could not use it) and the node's own address written instead.
func (a Annotations) desired(attrs lease.Attrs, cur map[string]string) (want map[string]string, badOverride []string) {
	want = map[string]string{
		a.Key(AnnKubeSubnetManager): annotationTrue,
		a.Key(AnnBackendType):       attrs.BackendType,
	}
	data, v6data := rawOrNull(attrs.BackendData), rawOrNull(attrs.BackendV6Data)
	typ := attrs.BackendType
	if typ != "vxlan" || data != jsonNull {
		want[a.Key(AnnBackendData)] = data
		ip := unspecifiedIPv4Str
		if attrs.PublicIP.IsValid() {
			ip = attrs.PublicIP.String()
		}
		if over, ok := a.override(cur, AnnPublicIPOverwrite, false); ok {
			ip = over
		} else if over != "" {
			badOverride = append(badOverride, a.Key(AnnPublicIPOverwrite)+"="+over)
		}
		want[a.Key(AnnPublicIP)] = ip
	}
	hasV6 := attrs.PublicIPv6 != nil && attrs.PublicIPv6.IsValid()
	if (typ == "vxlan" && v6data != jsonNull) || (typ != "vxlan" && hasV6) {
		want[a.Key(AnnBackendV6Data)] = v6data
		ip := ""
		if hasV6 {
			ip = attrs.PublicIPv6.String()
		}
		if over, ok := a.override(cur, AnnPublicIPv6Overwrite, true); ok {
			ip = over
		} else if over != "" {
			badOverride = append(badOverride, a.Key(AnnPublicIPv6Overwrite)+"="+over)
		}
		want[a.Key(AnnPublicIPv6)] = ip
	}
	return want, badOverride
}

// override returns the operator's override annotation and whether it is a
// usable address of the family.
func (a Annotations) override(cur map[string]string, name string, v6 bool) (string, bool) {
	s := cur[a.Key(name)]
	if s == "" {
		return "", false
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" || ip.Is6() != v6 || (!v6 && ip.Is4In6()) {
		return s, false
	}
	return ip.String(), true
}

// NodePublicIPs reads node-public-ip and node-public-ipv6: the addresses an
// operator chose for the node, which flanneld takes over its -public-ip and
// -public-ipv6 flags.
func (a Annotations) NodePublicIPs(cur map[string]string) (v4, v6 netip.Addr, err error) {
	for _, f := range []struct {
		name  string
		dst   *netip.Addr
		want6 bool
	}{{AnnNodePublicIP, &v4, false}, {AnnNodePublicIPv6, &v6, true}} {
		s := cur[a.Key(f.name)]
		if s == "" {
			continue
		}
		ip, perr := netip.ParseAddr(s)
		if perr != nil || ip.Zone() != "" || ip.Is6() != f.want6 || ip.Is4In6() {
			fam := "IPv4"
			if f.want6 {
				fam = "IPv6"
			}
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("annotation %s=%q is not an %s address: fix it (kubectl annotate node NODE %s=ADDRESS --overwrite) or remove it (kubectl annotate node NODE %s-)",
				a.Key(f.name), s, fam, a.Key(f.name), a.Key(f.name))
		}
		*f.dst = ip
	}
	return v4, v6, nil
}

// rawOrNull renders backend data as flannel marshals a json.RawMessage:
// "null" when there is none.
func rawOrNull(m json.RawMessage) string {
	if len(m) == 0 {
		return jsonNull
	}
	return string(m)
}
