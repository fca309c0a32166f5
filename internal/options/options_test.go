package options

import (
	"bytes"
	"errors"
	"flag"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

// Address plan: node underlay 198.18.0.0/24 (this node .11, etcd on .1),
// IPv6 underlay 2001:db8::/64.

// env turns a map into a getenv function.
func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestDefaults(t *testing.T) {
	want := Options{
		EtcdEndpoints:             []string{"http://127.0.0.1:2379"},
		EtcdPrefix:                "/coreos.com/network",
		EtcdDialTimeout:           5 * time.Second,
		EtcdRequestTimeout:        5 * time.Second,
		SubnetFile:                "/run/flannel/subnet.env",
		SubnetLeaseRenewMargin:    60 * time.Minute,
		IPTablesResync:            5 * time.Second,
		IPTablesForwardRules:      true,
		NetConfigPath:             "/etc/kube-flannel/net-conf.json",
		KubeAnnotationPrefix:      "flannel.alpha.coreos.com/",
		SetNodeNetworkUnavailable: true,
		HealthzIP:                 netip.MustParseAddr("127.0.0.1"), // flanneld: 0.0.0.0
		SubnetLeaseTTL:            24 * time.Hour,
		NodeName:                  "n1",
		StateDir:                  "/var/lib/loom",
		Resync:                    5 * time.Second,
		LogLevel:                  slog.LevelInfo,
	}
	got, err := Parse(nil, env(map[string]string{"NODE_NAME": "n1"}))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("defaults:\n got  %+v\n want %+v", got, want)
	}
}

// With nothing else set, the node is named after the host, as the kubelet
// names it (lower case), so kube mode finds its own Node object.
func TestNodeNameFromHostname(t *testing.T) {
	h, err := os.Hostname()
	if err != nil || !isDNSSubdomain(strings.ToLower(h)) {
		// A host whose name cannot be a node name must be told so.
		_, perr := Parse(nil, env(nil))
		if perr == nil || !strings.Contains(perr.Error(), "-node-name") {
			t.Fatalf("hostname %q (%v): Parse error %v, want one pointing to -node-name", h, err, perr)
		}
		return
	}
	o, err := Parse(nil, env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if o.NodeName != strings.ToLower(h) || !o.NodeNameFromHostname {
		t.Errorf("NodeName = %q (from hostname %v), want %q from the hostname", o.NodeName, o.NodeNameFromHostname, strings.ToLower(h))
	}
}

// In kube-flannel.yml the agent learns its pod, not its node: the node
// name then comes from the API, which needs to know the hostname was only
// a guess.
func TestPodIdentity(t *testing.T) {
	o, err := Parse([]string{"-kube-subnet-mgr"}, env(map[string]string{"POD_NAME": "kube-flannel-ds-x7k2p", "POD_NAMESPACE": "kube-flannel", "NODE_NAME": "n1"}))
	if err != nil {
		t.Fatal(err)
	}
	if o.PodName != "kube-flannel-ds-x7k2p" || o.PodNamespace != "kube-flannel" || o.NodeName != "n1" || o.NodeNameFromHostname {
		t.Errorf("got pod %s/%s, node %q (from hostname %v)", o.PodNamespace, o.PodName, o.NodeName, o.NodeNameFromHostname)
	}
}

func TestSources(t *testing.T) {
	for _, tc := range []struct {
		name  string
		args  []string
		env   map[string]string
		field func(Options) any
		want  any
	}{
		{
			name:  "environment when no flag",
			env:   map[string]string{"FLANNELD_ETCD_ENDPOINTS": "https://198.18.0.1:2379, https://198.18.0.2:2379"},
			field: func(o Options) any { return o.EtcdEndpoints },
			want:  []string{"https://198.18.0.1:2379", "https://198.18.0.2:2379"},
		},
		{
			name:  "flag wins over environment",
			args:  []string{"-etcd-endpoints=http://198.18.0.1:2379"},
			env:   map[string]string{"FLANNELD_ETCD_ENDPOINTS": "http://198.18.0.9:2379"},
			field: func(o Options) any { return o.EtcdEndpoints },
			want:  []string{"http://198.18.0.1:2379"},
		},
		{
			name:  "short lease TTL for tests, from loom's variable",
			env:   map[string]string{"LOOM_SUBNET_LEASE_TTL": "6s"},
			field: func(o Options) any { return o.SubnetLeaseTTL },
			want:  6 * time.Second,
		},
		{
			name:  "health server exposed on request",
			args:  []string{"-healthz-ip=0.0.0.0"},
			field: func(o Options) any { return o.HealthzIP },
			want:  netip.MustParseAddr("0.0.0.0"),
		},
		{
			name:  "one dash",
			args:  []string{"-public-ip=198.18.0.11"},
			field: func(o Options) any { return o.PublicIP },
			want:  netip.MustParseAddr("198.18.0.11"),
		},
		{
			name:  "two dashes, value as the next argument",
			args:  []string{"--public-ip", "198.18.0.11"},
			field: func(o Options) any { return o.PublicIP },
			want:  netip.MustParseAddr("198.18.0.11"),
		},
		{
			name:  "bool flag alone means true",
			args:  []string{"--ip-masq", "--kube-subnet-mgr"},
			field: func(o Options) any { return [2]bool{o.IPMasq, o.KubeSubnetMgr} },
			want:  [2]bool{true, true},
		},
		{
			name:  "annotation prefix: a bare domain gets a slash, as in flanneld",
			args:  []string{"-kube-annotation-prefix=net.example.com"},
			field: func(o Options) any { return o.KubeAnnotationPrefix },
			want:  "net.example.com/",
		},
		{
			name:  "annotation prefix: a name stem gets a dash",
			args:  []string{"-kube-annotation-prefix=example.com/net"},
			field: func(o Options) any { return o.KubeAnnotationPrefix },
			want:  "example.com/net-",
		},
		{
			name:  "annotation prefix: a trailing slash or dash is kept",
			args:  []string{"-kube-annotation-prefix=example.com/net-"},
			field: func(o Options) any { return o.KubeAnnotationPrefix },
			want:  "example.com/net-",
		},
		{
			name:  "annotation prefix from flanneld's variable",
			env:   map[string]string{"FLANNELD_KUBE_ANNOTATION_PREFIX": "example.com/"},
			field: func(o Options) any { return o.KubeAnnotationPrefix },
			want:  "example.com/",
		},
		{
			name:  "bool default true turned off",
			args:  []string{"--iptables-forward-rules=false"},
			field: func(o Options) any { return o.IPTablesForwardRules },
			want:  false,
		},
		{
			name:  "bool from environment",
			env:   map[string]string{"FLANNELD_IP_MASQ": "true"},
			field: func(o Options) any { return o.IPMasq },
			want:  true,
		},
		{
			name:  "repeated -iface keeps the order",
			args:  []string{"-iface", "eth1", "--iface=198.18.0.11"},
			field: func(o Options) any { return o.Iface },
			want:  []string{"eth1", "198.18.0.11"},
		},
		{
			name:  "FLANNELD_IFACE is a comma-separated list",
			env:   map[string]string{"FLANNELD_IFACE": "eth1,eth0"},
			field: func(o Options) any { return o.Iface },
			want:  []string{"eth1", "eth0"},
		},
		{
			name:  "-iface replaces FLANNELD_IFACE, not appends to it",
			args:  []string{"-iface=eth2"},
			env:   map[string]string{"FLANNELD_IFACE": "eth1,eth0"},
			field: func(o Options) any { return o.Iface },
			want:  []string{"eth2"},
		},
		{
			name: "FLANNELD_IFACE_REGEX keeps commas inside a regexp",
			env:  map[string]string{"FLANNELD_IFACE_REGEX": `eth{1,2},^ens\d+$`},
			field: func(o Options) any {
				var s []string
				for _, re := range o.IfaceRegex {
					s = append(s, re.String())
				}
				return s
			},
			want: []string{"eth{1,2}", `^ens\d+$`},
		},
		{
			name:  "minutes and seconds become durations",
			args:  []string{"-subnet-lease-renew-margin=30", "-iptables-resync=10"},
			field: func(o Options) any { return [2]time.Duration{o.SubnetLeaseRenewMargin, o.IPTablesResync} },
			want:  [2]time.Duration{30 * time.Minute, 10 * time.Second},
		},
		{
			name:  "net-config-path given on the command line is recorded",
			args:  []string{"-net-config-path=/etc/loom/net-conf.json"},
			field: func(o Options) any { return [2]any{o.NetConfigPath, o.NetConfigPathSet} },
			want:  [2]any{"/etc/loom/net-conf.json", true},
		},
		{
			name:  "net-config-path from the environment is recorded",
			env:   map[string]string{"FLANNELD_NET_CONFIG_PATH": "/etc/loom/net-conf.json"},
			field: func(o Options) any { return [2]any{o.NetConfigPath, o.NetConfigPathSet} },
			want:  [2]any{"/etc/loom/net-conf.json", true},
		},
		{
			name:  "net-config-path default is not set explicitly",
			field: func(o Options) any { return [2]any{o.NetConfigPath, o.NetConfigPathSet} },
			want:  [2]any{"/etc/kube-flannel/net-conf.json", false},
		},
		{
			name:  "etcd prefix cleaned like flannel's path.Join",
			args:  []string{"-etcd-prefix=/coreos.com/network/"},
			field: func(o Options) any { return o.EtcdPrefix },
			want:  "/coreos.com/network",
		},
		{
			name:  "LOOM_ wins over FLANNELD_ for loom's flags",
			env:   map[string]string{"LOOM_RESYNC": "2s", "FLANNELD_RESYNC": "9s"},
			field: func(o Options) any { return o.Resync },
			want:  2 * time.Second,
		},
		{
			name:  "FLANNELD_ also sets loom's flags",
			env:   map[string]string{"FLANNELD_LOG_LEVEL": "debug"},
			field: func(o Options) any { return o.LogLevel },
			want:  slog.LevelDebug,
		},
		{
			name:  "LOOM_ does not set flanneld's flags",
			env:   map[string]string{"LOOM_IP_MASQ": "true"},
			field: func(o Options) any { return o.IPMasq },
			want:  false,
		},
		{
			name:  "node name: NODE_NAME",
			env:   map[string]string{"NODE_NAME": "n2"},
			field: func(o Options) any { return o.NodeName },
			want:  "n2",
		},
		{
			name:  "node name: LOOM_NODE_NAME wins over NODE_NAME",
			env:   map[string]string{"NODE_NAME": "n2", "LOOM_NODE_NAME": "n3"},
			field: func(o Options) any { return o.NodeName },
			want:  "n3",
		},
		{
			name:  "node name: the flag wins over everything",
			args:  []string{"--node-name=n4"},
			env:   map[string]string{"NODE_NAME": "n2", "LOOM_NODE_NAME": "n3"},
			field: func(o Options) any { return o.NodeName },
			want:  "n4",
		},
		{
			name:  "ipv4-mapped public ip is taken as ipv4",
			args:  []string{"-public-ip=::ffff:198.18.0.11"},
			field: func(o Options) any { return o.PublicIP },
			want:  netip.MustParseAddr("198.18.0.11"),
		},
		{
			name: "tls and auth",
			args: []string{"-etcd-certfile=/etc/loom/c.pem", "-etcd-keyfile=/etc/loom/k.pem", "-etcd-cafile=/etc/loom/ca.pem", "-etcd-username=loom", "-etcd-password=s3cret"},
			field: func(o Options) any {
				return []string{o.EtcdCertFile, o.EtcdKeyFile, o.EtcdCAFile, o.EtcdUsername, o.EtcdPassword}
			},
			want: []string{"/etc/loom/c.pem", "/etc/loom/k.pem", "/etc/loom/ca.pem", "loom", "s3cret"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := map[string]string{"NODE_NAME": "n1"}
			for k, v := range tc.env {
				e[k] = v
			}
			o, err := Parse(tc.args, env(e))
			if err != nil {
				t.Fatalf("Parse(%q, %v): %v", tc.args, tc.env, err)
			}
			if got := tc.field(o); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Parse(%q, %v): got %v, want %v", tc.args, tc.env, got, tc.want)
			}
		})
	}
}

// flanneldArgs is a flanneld (v0.28) command line with every flag it has,
// each at a value loom accepts: the list in flannel's main.go, compared by
// hand. The three klog flags are flanneld's too (it copies them from klog).
var flanneldArgs = []string{
	"--etcd-endpoints=http://198.18.0.1:2379", "--etcd-prefix=/coreos.com/network",
	"--etcd-keyfile=/etc/flannel/key.pem", "--etcd-certfile=/etc/flannel/cert.pem", "--etcd-cafile=/etc/flannel/ca.pem",
	"--etcd-username=flannel", "--etcd-password=secret",
	"--iface=eth0", "--iface-regex=^eth[0-9]+$", "--iface-can-reach=198.18.0.1",
	"--subnet-file=/run/flannel/subnet.env", "--public-ip=198.18.0.11", "--public-ipv6=2001:db8::11",
	"--subnet-lease-renew-margin=60", "--ip-masq", "--ip-masq-fully-random-disable=false",
	"--kube-subnet-mgr", "--kube-api-url=https://198.18.0.1:6443", "--kube-annotation-prefix=flannel.alpha.coreos.com",
	"--kubeconfig-file=/etc/kubernetes/flannel.conf",
	"--healthz-ip=0.0.0.0", "--healthz-port=8471", "--iptables-resync=5", "--iptables-forward-rules=true",
	"--ip-blackhole-route=false", "--net-config-path=/etc/kube-flannel/net-conf.json", "--set-node-network-unavailable=true",
	"--v=2", "--vmodule=kube=4", "--log_backtrace_at=main.go:120",
}

// Every flanneld flag parses, on the command line and as FLANNELD_<FLAG>;
// the klog ones are reported as ignored, for the agent to log.
func TestFlanneldFlags(t *testing.T) {
	o, err := Parse(flanneldArgs, env(map[string]string{"NODE_NAME": "n1"}))
	if err != nil {
		t.Fatalf("flanneld's flags: %v", err)
	}
	if !o.KubeSubnetMgr || !o.SetNodeNetworkUnavailable || o.HealthzPort != 8471 || o.PublicIPv6 != netip.MustParseAddr("2001:db8::11") {
		t.Errorf("parsed %+v", o)
	}
	if got := strings.Join(o.Ignored, "\n"); !strings.Contains(got, "-v=2: klog's verbosity; loom logs at -log-level") ||
		!strings.Contains(got, "-vmodule=kube=4") || !strings.Contains(got, "-log_backtrace_at=main.go:120") || len(o.Ignored) != 3 {
		t.Errorf("Ignored = %q, want the three klog flags", o.Ignored)
	}

	vars := map[string]string{"NODE_NAME": "n1"}
	for _, a := range flanneldArgs {
		name, val, found := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !found {
			val = "true"
		}
		vars["FLANNELD_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_"))] = val
	}
	oe, err := Parse(nil, env(vars))
	if err != nil {
		t.Fatalf("flanneld's variables %v: %v", vars, err)
	}
	if !oe.KubeSubnetMgr || oe.HealthzPort != 8471 || len(oe.Ignored) != 3 || !strings.HasPrefix(oe.Ignored[0], "FLANNELD_V=2") {
		t.Errorf("from the environment: %+v", oe)
	}
}

func TestSetNodeNetworkUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want bool
	}{
		{name: "default, as flanneld", want: true},
		{name: "flag", args: []string{"--set-node-network-unavailable=false"}, want: false},
		{name: "flanneld's variable", env: map[string]string{"FLANNELD_SET_NODE_NETWORK_UNAVAILABLE": "false"}, want: false},
		{name: "flag over variable", args: []string{"-set-node-network-unavailable"}, env: map[string]string{"FLANNELD_SET_NODE_NETWORK_UNAVAILABLE": "false"}, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := map[string]string{"NODE_NAME": "n1"}
			maps.Copy(e, tc.env)
			o, err := Parse(tc.args, env(e))
			if err != nil {
				t.Fatal(err)
			}
			if o.SetNodeNetworkUnavailable != tc.want {
				t.Errorf("SetNodeNetworkUnavailable = %v, want %v", o.SetNodeNetworkUnavailable, tc.want)
			}
		})
	}
}

func TestErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{
			name: "flanneld's masquerade without fully random ports",
			args: []string{"--ip-masq-fully-random-disable"},
			want: "-ip-masq-fully-random-disable=true asks for masquerading without fully random source ports, which loom does not offer: " +
				"loom masquerades with fully random ports where iptables or nftables support it; remove the flag, or keep flanneld on this node",
		},
		{
			name: "flanneld's blackhole route, from its variable",
			env:  map[string]string{"FLANNELD_IP_BLACKHOLE_ROUTE": "true"},
			want: "FLANNELD_IP_BLACKHOLE_ROUTE=true asks for a blackhole route to the node's pod subnet (flanneld adds it where no cni0 bridge owns the subnet, as with Canal), " +
				"which loom does not install: remove the flag, or keep flanneld on this node",
		},
		{
			name: "flanneld's multi-cluster-CIDR",
			args: []string{"--use-multi-cluster-cidr=true"},
			want: "-use-multi-cluster-cidr=true asks for ClusterCIDR objects (networking.k8s.io/v1alpha1), which Kubernetes removed in 1.29 and flannel in v0.24: " +
				"remove the flag; loom takes the node's subnets from its spec.podCIDRs",
		},
		{
			name: "klog verbosity that is no number",
			args: []string{"--v=debug"},
			want: `-v "debug" is not a klog verbosity (a whole number from 0): loom ignores it anyway; set -log-level (debug, info, warn or error)`,
		},
		{
			name: "unknown firewall mode",
			args: []string{"--firewall=ipfw"},
			want: `-firewall "ipfw" is not valid: use one of auto, nftables, iptables`,
		},
		{
			name: "public ip too short",
			args: []string{"-public-ip=198.18.0"},
			want: `-public-ip "198.18.0" is not an IP address`,
		},
		{
			name: "bad value from the environment names the variable",
			env:  map[string]string{"FLANNELD_PUBLIC_IP": "198.18.0"},
			want: `FLANNELD_PUBLIC_IP "198.18.0" is not an IP address`,
		},
		{
			name: "ipv6 in -public-ip",
			args: []string{"-public-ip=2001:db8::11"},
			want: `-public-ip "2001:db8::11" is not an IPv4 address: use -public-ipv6 for an IPv6 address`,
		},
		{
			name: "ipv4 in -public-ipv6",
			args: []string{"-public-ipv6=198.18.0.11"},
			want: `-public-ipv6 "198.18.0.11" is not an IPv6 address: use -public-ip for an IPv4 address`,
		},
		{
			name: "cert without key",
			args: []string{"-etcd-certfile=/etc/loom/c.pem"},
			want: "-etcd-certfile set without -etcd-keyfile: give the client key that goes with the certificate",
		},
		{
			name: "key without cert",
			env:  map[string]string{"FLANNELD_ETCD_KEYFILE": "/etc/loom/k.pem"},
			want: "-etcd-keyfile set without -etcd-certfile: give the client certificate that goes with the key",
		},
		{
			name: "password without user",
			args: []string{"-etcd-password=s3cret"},
			want: "-etcd-password set without -etcd-username: give the user name the password belongs to",
		},
		{
			name: "healthz port out of range",
			args: []string{"-healthz-port=70000"},
			want: "-healthz-port 70000 is out of range: use 1 to 65535, or 0 to disable",
		},
		{
			name: "lease TTL below etcd's minimum",
			args: []string{"-subnet-lease-ttl=1s"},
			want: "-subnet-lease-ttl 1s is shorter than etcd's minimum lease TTL: use 2s or more",
		},
		{
			name: "healthz port not a number",
			args: []string{"-healthz-port=http"},
			want: `-healthz-port "http" is not a port number: use 1 to 65535, or 0 to disable`,
		},
		{
			name: "bad iface regexp",
			args: []string{"-iface-regex=eth[0-"},
			want: "-iface-regex \"eth[0-\" is not a valid regexp: error parsing regexp: missing closing ]: `[0-`",
		},
		{
			name: "endpoint without scheme",
			args: []string{"-etcd-endpoints=198.18.0.1:2379"},
			want: `-etcd-endpoints "198.18.0.1:2379" is not an http:// or https:// URL: write it as http://198.18.0.1:2379 (or https://)`,
		},
		{
			name: "endpoint with another scheme",
			env:  map[string]string{"FLANNELD_ETCD_ENDPOINTS": "http://198.18.0.1:2379,etcd://198.18.0.2:2379"},
			want: `FLANNELD_ETCD_ENDPOINTS "etcd://198.18.0.2:2379" is not an http:// or https:// URL: use the http or https scheme with a host, e.g. https://198.18.0.1:2379`,
		},
		{
			name: "no endpoints",
			args: []string{"-etcd-endpoints=,"},
			want: "-etcd-endpoints is empty: give at least one etcd URL, e.g. http://127.0.0.1:2379",
		},
		{
			name: "bad bool from the environment",
			env:  map[string]string{"FLANNELD_IP_MASQ": "yes"},
			want: `FLANNELD_IP_MASQ "yes" is not a boolean: use true or false`,
		},
		{
			name: "renew margin longer than the lease",
			args: []string{"-subnet-lease-renew-margin=1440"},
			want: "-subnet-lease-renew-margin 1440 is out of range: use 1 to 1439 minutes (the lease lasts 24 h)",
		},
		{
			name: "iptables resync as a duration",
			args: []string{"-iptables-resync=5s"},
			want: `-iptables-resync "5s" is not a whole number of seconds`,
		},
		{
			name: "resync without a unit",
			args: []string{"-resync=5"},
			want: `-resync "5" is not a duration: write it with a unit, e.g. 5s or 1m`,
		},
		{
			name: "zero timeout",
			env:  map[string]string{"LOOM_ETCD_DIAL_TIMEOUT": "0s"},
			want: "LOOM_ETCD_DIAL_TIMEOUT 0s must be positive",
		},
		{
			name: "bad log level",
			args: []string{"-log-level=loud"},
			want: `-log-level "loud" is not a log level: use debug, info, warn or error`,
		},
		{
			name: "relative state dir",
			args: []string{"-state-dir=var/lib/loom"},
			want: `-state-dir "var/lib/loom" is not an absolute path: start it with /`,
		},
		{
			name: "node name with upper case",
			env:  map[string]string{"NODE_NAME": "Node_1"},
			want: `NODE_NAME "Node_1" is not a valid node name: use lower-case letters, digits, '-' and '.' (the Kubernetes node name), via -node-name`,
		},
		{
			name: "kube api url without scheme",
			args: []string{"-kube-api-url=198.18.0.1:6443"},
			want: `-kube-api-url "198.18.0.1:6443" is not an http:// or https:// URL: write it as http://198.18.0.1:6443 (or https://)`,
		},
		{
			name: "positional argument",
			args: []string{"-ip-masq", "eth0"},
			want: `unexpected argument "eth0": the agent takes only flags, e.g. -iface=eth0`,
		},
		{
			name: "unknown flag",
			args: []string{"-ifcae=eth0"},
			want: "flag provided but not defined: -ifcae",
		},
		{
			name: "annotation prefix without a dot",
			args: []string{"-kube-annotation-prefix=flannel"},
			want: `-kube-annotation-prefix "flannel": "flannel" is not a lower-case domain name with a dot: use a domain such as flannel.alpha.coreos.com, optionally followed by "/" and a name stem (example.com/net)`,
		},
		{
			name: "annotation prefix in upper case, from the environment",
			env:  map[string]string{"FLANNELD_KUBE_ANNOTATION_PREFIX": "Flannel.Example.com"},
			want: `FLANNELD_KUBE_ANNOTATION_PREFIX "Flannel.Example.com": "Flannel.Example.com" is not a lower-case domain name with a dot: use a domain such as flannel.alpha.coreos.com, optionally followed by "/" and a name stem (example.com/net)`,
		},
		{
			name: "annotation prefix with two slashes",
			args: []string{"-kube-annotation-prefix=example.com/a/b"},
			want: `-kube-annotation-prefix "example.com/a/b" has more than one "/": use a domain such as flannel.alpha.coreos.com, optionally followed by "/" and a name stem (example.com/net)`,
		},
		{
			name: "annotation prefix with a bad stem",
			args: []string{"-kube-annotation-prefix=example.com/Net"},
			want: `-kube-annotation-prefix "example.com/Net": the name stem "Net" must start with a lower-case letter or digit, hold only lower-case letters, digits, '-', '_' and '.', and be at most 41 characters: use a domain such as flannel.alpha.coreos.com, optionally followed by "/" and a name stem (example.com/net)`,
		},
		{
			name: "every bad value is reported at once",
			args: []string{"-public-ip=198.18.0", "-healthz-port=-1"},
			want: "-public-ip \"198.18.0\" is not an IP address\n-healthz-port -1 is out of range: use 1 to 65535, or 0 to disable",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := map[string]string{"NODE_NAME": "n1"}
			for k, v := range tc.env {
				e[k] = v
			}
			o, err := Parse(tc.args, env(e))
			if err == nil {
				t.Fatalf("Parse(%q, %v) = %+v, want error %q", tc.args, tc.env, o, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("Parse(%q, %v) error:\n got  %s\n want %s", tc.args, tc.env, err, tc.want)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, arg := range []string{"-h", "--help"} {
		if _, err := Parse([]string{arg}, env(nil)); !errors.Is(err, flag.ErrHelp) {
			t.Errorf("Parse(%s) error = %v, want flag.ErrHelp", arg, err)
		}
	}
	var b bytes.Buffer
	Usage(&b)
	for _, d := range defs() {
		if !strings.Contains(b.String(), "-"+d.name+" ") && !strings.Contains(b.String(), "-"+d.name+"\n") {
			t.Errorf("Usage does not list -%s:\n%s", d.name, b.String())
		}
	}
	for _, s := range []string{"(default http://127.0.0.1:2379)", "(default /run/flannel/subnet.env)", "FLANNELD_"} {
		if !strings.Contains(b.String(), s) {
			t.Errorf("Usage does not mention %s:\n%s", s, b.String())
		}
	}
}

// -version must print the version even where the rest would not validate
// (no usable hostname, a stale variable in a unit file).
func TestVersionSkipsValidation(t *testing.T) {
	o, err := Parse([]string{"-version"}, env(map[string]string{"FLANNELD_PUBLIC_IP": "bogus", "NODE_NAME": "Bad_Name"}))
	if err != nil {
		t.Fatalf("Parse(-version): %v", err)
	}
	if !o.Version {
		t.Error("Version = false, want true")
	}
}
