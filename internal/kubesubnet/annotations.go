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
// run both while it migrates.
const (
	annKubeManaged     = "kube-subnet-manager"   // "true" on every node whose agent runs in kube mode
	annBackendType     = "backend-type"          // "vxlan", "host-gw", "udp"
	annBackendData     = "backend-data"          // the backend's JSON, e.g. {"VNI":1,"VtepMAC":"..."}; "null" when it has none
	annBackendV6Data   = "backend-v6-data"       // the same for the IPv6 leg
	annPublicIP        = "public-ip"             // the IPv4 address peers send to
	annPublicIPv6      = "public-ipv6"           // the IPv6 address peers send to
	annPublicIPOver    = "public-ip-overwrite"   // the operator's override of public-ip
	annPublicIPv6Over  = "public-ipv6-overwrite" // the operator's override of public-ipv6
	annNodePublicIP    = "node-public-ip"        // the operator's choice of -public-ip, read at start
	annNodePublicIPv6  = "node-public-ipv6"      // the same for -public-ipv6
	annotationTrue     = "true"
	jsonNull           = "null"
	unspecifiedIPv4Str = "0.0.0.0"
)

// annotations are the full annotation keys under one prefix.
type annotations struct {
	prefix string // e.g. "flannel.alpha.coreos.com/"
}

// newAnnotations checks a prefix as options.Options gives it: already in
// flannel's normalised form, ending in "/" (a domain) or "-" (a domain and
// a name stem, as in "example.com/net-").
func newAnnotations(prefix string) (annotations, error) {
	if prefix == "" {
		prefix = DefaultAnnotationPrefix
	}
	if strings.Count(prefix, "/") != 1 || !(strings.HasSuffix(prefix, "/") || strings.HasSuffix(prefix, "-")) {
		return annotations{}, fmt.Errorf("annotation prefix %q is not in normalised form (DOMAIN/ or DOMAIN/NAME-)", prefix)
	}
	return annotations{prefix: prefix}, nil
}

func (a annotations) key(name string) string { return a.prefix + name }

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
func (a annotations) desired(attrs lease.Attrs, cur map[string]string) (want map[string]string, badOverride []string) {
	want = map[string]string{
		a.key(annKubeManaged): annotationTrue,
		a.key(annBackendType): attrs.BackendType,
	}
	data, v6data := rawOrNull(attrs.BackendData), rawOrNull(attrs.BackendV6Data)
	typ := attrs.BackendType
	if typ != "vxlan" || data != jsonNull {
		want[a.key(annBackendData)] = data
		ip := unspecifiedIPv4Str
		if attrs.PublicIP.IsValid() {
			ip = attrs.PublicIP.String()
		}
		if over, ok := a.override(cur, annPublicIPOver, false); ok {
			ip = over
		} else if over != "" {
			badOverride = append(badOverride, a.key(annPublicIPOver)+"="+over)
		}
		want[a.key(annPublicIP)] = ip
	}
	hasV6 := attrs.PublicIPv6 != nil && attrs.PublicIPv6.IsValid()
	if (typ == "vxlan" && v6data != jsonNull) || (typ != "vxlan" && hasV6) {
		want[a.key(annBackendV6Data)] = v6data
		ip := ""
		if hasV6 {
			ip = attrs.PublicIPv6.String()
		}
		if over, ok := a.override(cur, annPublicIPv6Over, true); ok {
			ip = over
		} else if over != "" {
			badOverride = append(badOverride, a.key(annPublicIPv6Over)+"="+over)
		}
		want[a.key(annPublicIPv6)] = ip
	}
	return want, badOverride
}

// override returns the operator's override annotation and whether it is a
// usable address of the family.
func (a annotations) override(cur map[string]string, name string, v6 bool) (string, bool) {
	s := cur[a.key(name)]
	if s == "" {
		return "", false
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" || ip.Is6() != v6 || (!v6 && ip.Is4In6()) {
		return s, false
	}
	return ip.String(), true
}

// nodePublicIPs reads node-public-ip and node-public-ipv6: the addresses an
// operator chose for the node, which flanneld takes over its -public-ip and
// -public-ipv6 flags.
func (a annotations) nodePublicIPs(cur map[string]string) (v4, v6 netip.Addr, err error) {
	for _, f := range []struct {
		name  string
		dst   *netip.Addr
		want6 bool
	}{{annNodePublicIP, &v4, false}, {annNodePublicIPv6, &v6, true}} {
		s := cur[a.key(f.name)]
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
				a.key(f.name), s, fam, a.key(f.name), a.key(f.name))
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
