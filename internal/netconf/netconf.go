// Package netconf holds the cluster network configuration: flannel's
// net-conf.json (etcd key <prefix>/config, or the file named by
// -net-config-path), with flannel's keys and defaults.
package netconf

import (
	"encoding/json"
	"net/netip"
)

// Backend types loom knows by name. Which of them an agent can run is the
// agent's business; the config only has to name one of these.
const (
	BackendHostGW    = "host-gw"
	BackendVXLAN     = "vxlan"
	BackendUDP       = "udp"
	BackendWireGuard = "wireguard"
)

// Config is a parsed, defaulted and validated network configuration.
type Config struct {
	EnableIPv4     bool
	EnableIPv6     bool
	EnableNFTables bool

	Network   netip.Prefix // the whole IPv4 pod network, e.g. 10.244.0.0/16
	SubnetLen int          // prefix length of each node's subnet, e.g. 24
	SubnetMin netip.Addr   // first node subnet that may be handed out
	SubnetMax netip.Addr   // last node subnet that may be handed out

	IPv6Network   netip.Prefix
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr

	Backend Backend
}

// Backend is the "Backend" object. Type is lower-cased; Raw keeps the whole
// object so each backend can decode its own options (VNI, Port, DirectRouting...).
type Backend struct {
	Type string
	Raw  json.RawMessage
}
