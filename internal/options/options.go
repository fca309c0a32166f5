// Package options reads the agent's command line: flanneld's flags, with
// flanneld's defaults and FLANNELD_* environment variables, plus loom's own.
// A node can switch from flanneld to loom without touching its unit file or
// DaemonSet.
//
// Values are read in two steps: the flag package (and the environment) only
// collect strings, then one conversion pass turns them into typed fields.
// That way every bad value, whether it came from a flag or a variable, gets
// an error naming where it came from, the value and the fix, instead of the
// flag package's "invalid value ... parse error".
package options

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Options is the agent's parsed and validated configuration.
type Options struct {
	// Store: etcd.
	EtcdEndpoints      []string // -etcd-endpoints, split at commas
	EtcdPrefix         string   // -etcd-prefix, cleaned as flannel's path.Join does
	EtcdKeyFile        string
	EtcdCertFile       string
	EtcdCAFile         string
	EtcdUsername       string
	EtcdPassword       string
	EtcdDialTimeout    time.Duration // loom: flannel sets none (DESIGN §4.10)
	EtcdRequestTimeout time.Duration // loom

	// Store: Kubernetes.
	KubeSubnetMgr  bool
	KubeconfigFile string
	KubeAPIURL     string
	// KubeAnnotationPrefix is -kube-annotation-prefix normalised as
	// flanneld does: "DOMAIN/" when given without a "/", "DOMAIN/NAME-"
	// when given as "DOMAIN/NAME", so the keys are the prefix followed by
	// "backend-type", "public-ip", ...
	KubeAnnotationPrefix string
	// SetNodeNetworkUnavailable is flanneld's -set-node-network-unavailable
	// (default true): the agent turns its Node's NetworkUnavailable
	// condition False once it holds the subnet. False leaves the condition
	// to someone else (a cloud route controller, another plugin).
	SetNodeNetworkUnavailable bool

	// Which interface and address carry the overlay.
	Iface         []string         // -iface, in order of preference
	IfaceRegex    []*regexp.Regexp // -iface-regex, tried after Iface
	IfaceCanReach netip.Addr       // -iface-can-reach: the interface routing to this address
	PublicIP      netip.Addr       // IPv4
	PublicIPv6    netip.Addr

	SubnetFile             string
	SubnetLeaseRenewMargin time.Duration // -subnet-lease-renew-margin, given in minutes
	IPMasq                 bool
	IPTablesResync         time.Duration // -iptables-resync, given in seconds
	IPTablesForwardRules   bool

	// NetConfigPath is read in kube mode, or when NetConfigPathSet (the flag
	// or its variable was given) says the user asked for a file over etcd.
	NetConfigPath    string
	NetConfigPathSet bool

	// HealthzIP is 127.0.0.1 by default, where flanneld listens on
	// 0.0.0.0: /metrics tells anyone who can reach it the node's subnets,
	// addresses and peers. Give -healthz-ip to expose it (to a Prometheus
	// that scrapes over the network, a kubelet probing the pod IP).
	HealthzIP   netip.Addr
	HealthzPort int // 0: no health server, as in flanneld

	Version bool // print the version and exit; Parse skips validation

	// Ignored says, one line each, which flanneld flags were given that
	// have no effect on a loom node (klog's -v, -vmodule,
	// -log_backtrace_at): the agent logs them at start. flanneld flags
	// whose absence would change behaviour are refused by Parse instead.
	Ignored []string

	// loom's own.
	NodeName string // -node-name, else NODE_NAME, else the lower-cased hostname
	// NodeNameFromHostname says NodeName is only the hostname: in kube
	// mode the agent then asks the API for the node of PodNamespace/PodName
	// (what kube-flannel.yml gives flanneld) when both are set.
	NodeNameFromHostname bool
	PodName              string // POD_NAME
	PodNamespace         string // POD_NAMESPACE

	StateDir string        // -state-dir
	Resync   time.Duration // -resync: period of the full data-path reconcile
	LogLevel slog.Level
	Firewall string // -firewall: "", auto, nftables or iptables ("" = decided by the network config)
	Cleanup  bool   // -cleanup: remove loom's firewall rules and exit
	// Profiling serves /debug/pprof/ on the health server: heap and CPU
	// profiles of a running agent are how its memory and start-up costs
	// are explained (issue #8).
	Profiling bool
	// SubnetLeaseTTL is the etcd TTL of the node's subnet lease (-subnet-
	// lease-ttl, default 24 h as in flannel). Keep-alive renews it at a
	// third of the TTL; a node cut off from the store for longer loses it.
	// Shorter values are for tests of exactly that.
	SubnetLeaseTTL time.Duration
}

// Flag names, spelled once: they are also the environment variable names.
const (
	flagEtcdEndpoints          = "etcd-endpoints"
	flagEtcdPrefix             = "etcd-prefix"
	flagEtcdKeyFile            = "etcd-keyfile"
	flagEtcdCertFile           = "etcd-certfile"
	flagEtcdCAFile             = "etcd-cafile"
	flagEtcdUsername           = "etcd-username"
	flagEtcdPassword           = "etcd-password"
	flagKubeSubnetMgr          = "kube-subnet-mgr"
	flagKubeconfigFile         = "kubeconfig-file"
	flagKubeAPIURL             = "kube-api-url"
	flagKubeAnnotationPrefix   = "kube-annotation-prefix"
	flagIface                  = "iface"
	flagIfaceRegex             = "iface-regex"
	flagIfaceCanReach          = "iface-can-reach"
	flagPublicIP               = "public-ip"
	flagPublicIPv6             = "public-ipv6"
	flagSubnetFile             = "subnet-file"
	flagSubnetLeaseRenewMargin = "subnet-lease-renew-margin"
	flagIPMasq                 = "ip-masq"
	flagIPTablesResync         = "iptables-resync"
	flagIPTablesForwardRules   = "iptables-forward-rules"
	flagNetConfigPath          = "net-config-path"
	flagHealthzIP              = "healthz-ip"
	flagHealthzPort            = "healthz-port"
	flagVersion                = "version"

	flagSetNodeNetworkUnavailable = "set-node-network-unavailable"
	// flanneld flags loom takes only at their defaults: with another value
	// flanneld would do something loom does not (yet).
	flagIPMasqFullyRandomDisable = "ip-masq-fully-random-disable"
	flagIPBlackholeRoute         = "ip-blackhole-route"
	flagUseMultiClusterCIDR      = "use-multi-cluster-cidr" // flanneld v0.21-v0.23 only
	// klog's flags, which flanneld copies onto its command line: loom logs
	// with log/slog (-log-level), so they are accepted and ignored.
	flagKlogV           = "v"
	flagKlogVModule     = "vmodule"
	flagKlogBacktraceAt = "log_backtrace_at"

	flagNodeName           = "node-name"
	flagStateDir           = "state-dir"
	flagResync             = "resync"
	flagEtcdDialTimeout    = "etcd-dial-timeout"
	flagEtcdRequestTimeout = "etcd-request-timeout"
	flagLogLevel           = "log-level"
	flagFirewall           = "firewall"
	flagCleanup            = "cleanup"
	flagProfiling          = "profiling"
	flagSubnetLeaseTTL     = "subnet-lease-ttl"
)

// Environment variable prefixes. flanneld reads FLANNELD_<FLAG>; loom's own
// flags also answer to LOOM_<FLAG>, which wins over FLANNELD_<FLAG>.
const (
	envFlannel = "FLANNELD_"
	envLoom    = "LOOM_"
	// envNodeName is what flannel's kube mode reads (set from the downward
	// API in kube-flannel.yml), so existing DaemonSets name the node for us.
	envNodeName = "NODE_NAME"
	// envPodName and envPodNamespace are what kube-flannel.yml sets (from
	// the downward API) instead of NODE_NAME.
	envPodName      = "POD_NAME"
	envPodNamespace = "POD_NAMESPACE"
)

// leaseTTL is the lifetime of a subnet lease in etcd (flannel's, 24 h): a
// renew margin must be shorter, or the lease would be renewed constantly.
const leaseTTL = 24 * time.Hour

// minLeaseTTL is etcd's shortest lease TTL with its default election
// timeout; it grants at least that whatever is asked.
const minLeaseTTL = 2 * time.Second

// def describes one flag.
type def struct {
	name   string
	value  string // default, as typed on a command line; "" is false for a bool flag
	usage  string
	bool   bool // takes no value: -ip-masq means -ip-masq=true
	repeat bool // may be given several times; its variable holds a comma-separated list
	loom   bool // loom's own flag: also read from LOOM_<FLAG>
}

// defs returns every flag, in the order Usage lists them and errors are reported.
func defs() []def {
	return []def{
		{name: flagEtcdEndpoints, value: "http://127.0.0.1:2379", usage: "comma-separated etcd `URLs`"},
		{name: flagEtcdPrefix, value: "/coreos.com/network", usage: "etcd key `prefix` of the network config and subnet leases"},
		{name: flagEtcdKeyFile, usage: "TLS client key `file` for etcd"},
		{name: flagEtcdCertFile, usage: "TLS client certificate `file` for etcd"},
		{name: flagEtcdCAFile, usage: "TLS CA certificate `file` to verify etcd with"},
		{name: flagEtcdUsername, usage: "etcd user `name`"},
		{name: flagEtcdPassword, usage: "etcd `password`"},
		{name: flagKubeSubnetMgr, bool: true, usage: "take the subnet from the Kubernetes node's podCIDR instead of etcd"},
		{name: flagKubeconfigFile, usage: "kubeconfig `file` (default: in-cluster config)"},
		{name: flagKubeAPIURL, usage: "Kubernetes API server `URL` (overrides the kubeconfig's)"},
		{name: flagKubeAnnotationPrefix, value: defaultAnnotationPrefix, usage: "`prefix` of the Node annotations in kube mode (flanneld's): a domain, optionally with \"/\" and a name stem"},
		{name: flagIface, repeat: true, usage: "`interface` (name or IP address) for inter-node traffic; repeat to list choices in order"},
		{name: flagIfaceRegex, repeat: true, usage: "`regexp` matching the interface (name or IP address) for inter-node traffic; repeatable, tried after -iface"},
		{name: flagIfaceCanReach, usage: "use the interface that routes to this `address`"},
		{name: flagPublicIP, usage: "IPv4 `address` other nodes reach this one at (default: the interface's)"},
		{name: flagPublicIPv6, usage: "IPv6 `address` other nodes reach this one at (default: the interface's)"},
		{name: flagSubnetFile, value: "/run/flannel/subnet.env", usage: "`file` the node's subnet is written to, for the CNI plugin"},
		{name: flagSubnetLeaseRenewMargin, value: "60", usage: "renew the subnet lease this many `minutes` before it expires"},
		{name: flagIPMasq, bool: true, usage: "masquerade traffic from pods to outside the pod network"},
		{name: flagIPTablesResync, value: "5", usage: "re-check the firewall rules every this many `seconds`"},
		{name: flagIPTablesForwardRules, value: "true", bool: true, usage: "accept forwarded pod traffic in the FORWARD chain"},
		{name: flagNetConfigPath, value: "/etc/kube-flannel/net-conf.json", usage: "network config `file`, read in kube mode or when this flag is given"},
		{name: flagHealthzIP, value: "127.0.0.1", usage: "`address` the health server (/healthz, /readyz, /metrics) listens on; flanneld's default is 0.0.0.0, loom's keeps it on the node"},
		{name: flagHealthzPort, value: "0", usage: "`port` of the health server; 0 disables it"},
		{name: flagVersion, bool: true, usage: "print the version and exit"},
		{name: flagSetNodeNetworkUnavailable, value: "true", bool: true, usage: "in kube mode, set the Node's NetworkUnavailable condition to False once the node holds its subnet; false leaves the condition alone"},
		{name: flagIPMasqFullyRandomDisable, bool: true, usage: "flanneld's: masquerade without fully random ports; loom accepts only false"},
		{name: flagIPBlackholeRoute, bool: true, usage: "flanneld's: a blackhole route for the node's pod subnet; loom accepts only false"},
		{name: flagUseMultiClusterCIDR, bool: true, usage: "flanneld v0.21-v0.23's: read ClusterCIDR objects (removed from Kubernetes in 1.29); loom accepts only false"},
		{name: flagKlogV, usage: "flanneld's klog verbosity `level`: accepted and ignored (loom's is -log-level)"},
		{name: flagKlogVModule, usage: "flanneld's klog per-file verbosity (`pattern=N,...`): accepted and ignored"},
		{name: flagKlogBacktraceAt, usage: "flanneld's klog `file:line` to log a stack trace at: accepted and ignored"},

		{name: flagNodeName, loom: true, usage: "this node's `name` (default: $NODE_NAME, else the hostname)"},
		{name: flagStateDir, loom: true, value: "/var/lib/loom", usage: "`directory` for state kept across restarts"},
		{name: flagResync, loom: true, value: "5s", usage: "reconcile the whole data path every `duration`"},
		{name: flagEtcdDialTimeout, loom: true, value: "5s", usage: "give up connecting to etcd after this `duration`"},
		{name: flagEtcdRequestTimeout, loom: true, value: "5s", usage: "give up on an etcd request after this `duration`"},
		{name: flagLogLevel, loom: true, value: "info", usage: "log `level`: debug, info, warn or error"},
		{name: flagFirewall, loom: true, usage: "firewall `mode`: auto, nftables or iptables (default: nftables when the network config sets EnableNFTables, else auto)"},
		{name: flagCleanup, loom: true, bool: true, usage: "remove the masquerade and forward rules loom installed, then exit"},
		{name: flagProfiling, loom: true, bool: true, usage: "serve Go's profiles (/debug/pprof/) on the health server, as kube-proxy's --profiling"},
		{name: flagSubnetLeaseTTL, loom: true, value: "24h", usage: "etcd TTL of the subnet lease (`duration`, at least 2s); keep-alive renews it, a node cut off from the store for longer loses its subnet"},
	}
}

// envNames returns the variables d may be set from, strongest first.
func (d def) envNames() []string {
	suffix := strings.ToUpper(strings.ReplaceAll(d.name, "-", "_"))
	if d.loom {
		return []string{envLoom + suffix, envFlannel + suffix}
	}
	return []string{envFlannel + suffix}
}

// value is a flag.Value that only records what it was given.
type value struct {
	def  def
	vals []string // one element, or several for a repeat flag
	from string   // where vals came from, for error messages: "-iface", "FLANNELD_IFACE"
}

func (v *value) String() string {
	if v == nil {
		return ""
	}
	return strings.Join(v.vals, ",")
}

func (v *value) Set(s string) error {
	if v.def.repeat && v.from != "" {
		v.vals = append(v.vals, s)
	} else {
		v.vals = []string{s}
	}
	v.from = "-" + v.def.name
	return nil
}

func (v *value) IsBoolFlag() bool { return v.def.bool }

// newFlagSet registers every flag on a fresh FlagSet that reports errors
// instead of printing them or exiting.
func newFlagSet(out io.Writer) (*flag.FlagSet, []*value) {
	fs := flag.NewFlagSet("loom agent", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {} // Parse returns flag.ErrHelp; the caller calls Usage
	var vals []*value
	for _, d := range defs() {
		v := &value{def: d}
		if d.value != "" {
			v.vals = []string{d.value}
		}
		fs.Var(v, d.name, d.usage)
		vals = append(vals, v)
	}
	return fs, vals
}

// Usage writes every flag, its default and the environment rules to w.
func Usage(w io.Writer) {
	fs, _ := newFlagSet(w)
	fmt.Fprintf(w, "Usage: loom agent [flags]\n\n")
	fmt.Fprintf(w, "Flags take one or two dashes. Each can also be set in the environment as\n")
	fmt.Fprintf(w, "%s<FLAG> (e.g. %sETCD_ENDPOINTS), loom's own also as %s<FLAG>;\n", envFlannel, envFlannel, envLoom)
	fmt.Fprintf(w, "the command line wins. Repeatable flags take a comma-separated list there.\n\n")
	fs.PrintDefaults()
}

// Parse reads args (without the program or subcommand name) and the
// environment through getenv. It returns flag.ErrHelp for -h or -help.
// All bad values are reported together, each naming the flag or variable it
// came from, the value and the fix.
func Parse(args []string, getenv func(string) string) (Options, error) {
	fs, vals := newFlagSet(io.Discard)
	if err := fs.Parse(args); err != nil {
		return Options{}, err // flag.ErrHelp, or the flag package's message naming the flag
	}
	if fs.NArg() > 0 {
		return Options{}, fmt.Errorf("unexpected argument %q: the agent takes only flags, e.g. -iface=eth0", fs.Arg(0))
	}
	for _, v := range vals {
		if v.from == "" {
			fromEnv(v, getenv)
		}
	}
	c := converter{vals: map[string]*value{}}
	for _, v := range vals {
		c.vals[v.def.name] = v
	}
	o := c.options(getenv)
	if o.Version {
		// -version must work on a host where the rest would not validate.
		return o, nil
	}
	if err := errors.Join(c.errs...); err != nil {
		return Options{}, err
	}
	return o, nil
}

// fromEnv fills an unset flag from its environment variable, if any.
func fromEnv(v *value, getenv func(string) string) {
	for _, name := range v.def.envNames() {
		s := getenv(name)
		if s == "" {
			continue
		}
		if v.def.repeat {
			v.vals = splitList(s, v.def.name == flagIfaceRegex)
		} else {
			v.vals = []string{s}
		}
		v.from = name
		return
	}
}

// splitList splits a comma-separated variable, dropping empty items. For
// regexps a comma inside (), [] or {} or after a backslash is part of the
// expression (eth{1,2}), not a separator.
func splitList(s string, regexps bool) []string {
	var items []string
	depth, start := 0, 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case regexps && c == '\\':
			i++ // the escaped byte is never a separator
		case regexps && (c == '(' || c == '[' || c == '{'):
			depth++
		case regexps && (c == ')' || c == ']' || c == '}') && depth > 0:
			depth--
		case c == ',' && depth == 0:
			items = append(items, s[start:i])
			start = i + 1
		}
	}
	items = append(items, s[start:])
	out := items[:0]
	for _, it := range items {
		if it = strings.TrimSpace(it); it != "" {
			out = append(out, it)
		}
	}
	return out
}

// converter turns the collected strings into typed values, collecting one
// error per bad value.
type converter struct {
	vals map[string]*value
	errs []error
}

// get returns a flag's value and the name of its source for messages.
func (c *converter) get(name string) (string, string) {
	v := c.vals[name]
	from := v.from
	if from == "" {
		from = "-" + name
	}
	if len(v.vals) == 0 {
		return "", from
	}
	return v.vals[len(v.vals)-1], from
}

func (c *converter) set(name string) bool { return c.vals[name].from != "" }

func (c *converter) fail(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf(format, args...))
}

func (c *converter) options(getenv func(string) string) Options {
	o := Options{
		EtcdEndpoints:      c.endpoints(flagEtcdEndpoints),
		EtcdPrefix:         c.etcdPrefix(flagEtcdPrefix),
		EtcdKeyFile:        c.str(flagEtcdKeyFile),
		EtcdCertFile:       c.str(flagEtcdCertFile),
		EtcdCAFile:         c.str(flagEtcdCAFile),
		EtcdUsername:       c.str(flagEtcdUsername),
		EtcdPassword:       c.str(flagEtcdPassword),
		EtcdDialTimeout:    c.duration(flagEtcdDialTimeout),
		EtcdRequestTimeout: c.duration(flagEtcdRequestTimeout),

		KubeSubnetMgr:  c.boolean(flagKubeSubnetMgr),
		KubeconfigFile: c.str(flagKubeconfigFile),
		KubeAPIURL:     c.url(flagKubeAPIURL),

		KubeAnnotationPrefix:      c.annotationPrefix(flagKubeAnnotationPrefix),
		SetNodeNetworkUnavailable: c.boolean(flagSetNodeNetworkUnavailable),

		Iface:         c.list(flagIface),
		IfaceRegex:    c.regexps(flagIfaceRegex),
		IfaceCanReach: c.addr(flagIfaceCanReach, anyFamily),
		PublicIP:      c.addr(flagPublicIP, onlyIPv4),
		PublicIPv6:    c.addr(flagPublicIPv6, onlyIPv6),

		SubnetFile:             c.str(flagSubnetFile),
		SubnetLeaseRenewMargin: c.count(flagSubnetLeaseRenewMargin, time.Minute, int(leaseTTL/time.Minute)-1, "minutes (the lease lasts 24 h)"),
		IPMasq:                 c.boolean(flagIPMasq),
		IPTablesResync:         c.count(flagIPTablesResync, time.Second, 24*60*60, "seconds"),
		IPTablesForwardRules:   c.boolean(flagIPTablesForwardRules),

		NetConfigPath:    c.str(flagNetConfigPath),
		NetConfigPathSet: c.set(flagNetConfigPath),

		HealthzIP:   c.addr(flagHealthzIP, anyFamily),
		HealthzPort: c.port(flagHealthzPort),

		Version: c.boolean(flagVersion),

		PodName:      getenv(envPodName),
		PodNamespace: getenv(envPodNamespace),

		StateDir:  c.absPath(flagStateDir),
		Resync:    c.duration(flagResync),
		LogLevel:  c.logLevel(flagLogLevel),
		Firewall:  c.oneOf(flagFirewall, "", "auto", "nftables", "iptables"),
		Cleanup:   c.boolean(flagCleanup),
		Profiling: c.boolean(flagProfiling),

		SubnetLeaseTTL: c.duration(flagSubnetLeaseTTL),
	}
	o.NodeName, o.NodeNameFromHostname = c.nodeName(flagNodeName, getenv)
	o.Ignored = c.flanneldOnly()
	if o.SubnetLeaseTTL > 0 && o.SubnetLeaseTTL < minLeaseTTL {
		_, from := c.get(flagSubnetLeaseTTL)
		c.fail("%s %v is shorter than etcd's minimum lease TTL: use %v or more", from, o.SubnetLeaseTTL, minLeaseTTL)
	}
	if o.EtcdCertFile != "" && o.EtcdKeyFile == "" {
		c.fail("-%s set without -%s: give the client key that goes with the certificate", flagEtcdCertFile, flagEtcdKeyFile)
	}
	if o.EtcdKeyFile != "" && o.EtcdCertFile == "" {
		c.fail("-%s set without -%s: give the client certificate that goes with the key", flagEtcdKeyFile, flagEtcdCertFile)
	}
	if o.EtcdPassword != "" && o.EtcdUsername == "" {
		c.fail("-%s set without -%s: give the user name the password belongs to", flagEtcdPassword, flagEtcdUsername)
	}
	return o
}

// flanneldOnly checks the flanneld flags loom does not implement. The
// ones that only tune klog are returned, as lines for the agent to log;
// the others are accepted at their defaults (an unchanged DaemonSet or
// unit file often spells them out) and refused otherwise, because
// ignoring them would make the node behave unlike what was asked.
func (c *converter) flanneldOnly() []string {
	refuse := map[string]string{
		flagIPMasqFullyRandomDisable: "asks for masquerading without fully random source ports, which loom does not offer: " +
			"loom masquerades with fully random ports where iptables or nftables support it; remove the flag, or keep flanneld on this node",
		flagIPBlackholeRoute: "asks for a blackhole route to the node's pod subnet (flanneld adds it where no cni0 bridge owns the subnet, as with Canal), " +
			"which loom does not install: remove the flag, or keep flanneld on this node",
		flagUseMultiClusterCIDR: "asks for ClusterCIDR objects (networking.k8s.io/v1alpha1), which Kubernetes removed in 1.29 and flannel in v0.24: " +
			"remove the flag; loom takes the node's subnets from its spec.podCIDRs",
	}
	for _, name := range []string{flagIPMasqFullyRandomDisable, flagIPBlackholeRoute, flagUseMultiClusterCIDR} {
		if c.boolean(name) {
			_, from := c.get(name)
			c.fail("%s=true %s", from, refuse[name])
		}
	}
	var ignored []string
	if s, from := c.get(flagKlogV); c.set(flagKlogV) {
		if n, err := strconv.Atoi(s); err != nil || n < 0 {
			c.fail("%s %q is not a klog verbosity (a whole number from 0): loom ignores it anyway; set -%s (debug, info, warn or error)", from, s, flagLogLevel)
		} else {
			ignored = append(ignored, fmt.Sprintf("%s=%s: klog's verbosity; loom logs at -%s (debug, info, warn or error)", from, s, flagLogLevel))
		}
	}
	for _, name := range []string{flagKlogVModule, flagKlogBacktraceAt} {
		if s, from := c.get(name); c.set(name) {
			ignored = append(ignored, fmt.Sprintf("%s=%s: a klog option; loom logs with log/slog at -%s", from, s, flagLogLevel))
		}
	}
	return ignored
}

func (c *converter) str(name string) string {
	s, _ := c.get(name)
	return s
}

func (c *converter) list(name string) []string {
	return append([]string(nil), c.vals[name].vals...)
}

func (c *converter) boolean(name string) bool {
	s, from := c.get(name)
	if s == "" {
		return false
	}
	b, err := strconv.ParseBool(s)
	if err != nil {
		c.fail("%s %q is not a boolean: use true or false", from, s)
	}
	return b
}

// count reads a whole number of units (flanneld's minutes and seconds flags)
// between 1 and most.
func (c *converter) count(name string, unit time.Duration, most int, units string) time.Duration {
	s, from := c.get(name)
	n, err := strconv.Atoi(s)
	switch {
	case err != nil:
		c.fail("%s %q is not a whole number of %s", from, s, units)
	case n < 1 || n > most:
		c.fail("%s %d is out of range: use 1 to %d %s", from, n, most, units)
	}
	return time.Duration(n) * unit
}

func (c *converter) duration(name string) time.Duration {
	s, from := c.get(name)
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		c.fail("%s %q is not a duration: write it with a unit, e.g. 5s or 1m", from, s)
	case d <= 0:
		c.fail("%s %s must be positive", from, s)
	}
	return d
}

func (c *converter) port(name string) int {
	s, from := c.get(name)
	n, err := strconv.Atoi(s)
	switch {
	case err != nil:
		c.fail("%s %q is not a port number: use 1 to 65535, or 0 to disable", from, s)
	case n < 0 || n > 65535:
		c.fail("%s %d is out of range: use 1 to 65535, or 0 to disable", from, n)
	}
	return n
}

type family int

const (
	anyFamily family = iota
	onlyIPv4
	onlyIPv6
)

func (c *converter) addr(name string, fam family) netip.Addr {
	s, from := c.get(name)
	if s == "" {
		return netip.Addr{}
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		c.fail("%s %q is not an IP address", from, s)
		return netip.Addr{}
	}
	// An IPv4-mapped address (::ffff:198.18.0.11) is an IPv4 address in
	// disguise: take it as one rather than make the user retype it.
	a = a.Unmap()
	switch {
	case fam == onlyIPv4 && !a.Is4():
		c.fail("%s %q is not an IPv4 address: use -%s for an IPv6 address", from, s, flagPublicIPv6)
	case fam == onlyIPv6 && !a.Is6():
		c.fail("%s %q is not an IPv6 address: use -%s for an IPv4 address", from, s, flagPublicIP)
	}
	return a
}

func (c *converter) endpoints(name string) []string {
	s, from := c.get(name)
	out := splitList(s, false)
	if len(out) == 0 {
		c.fail("%s is empty: give at least one etcd URL, e.g. http://127.0.0.1:2379", from)
	}
	for _, e := range out {
		if !isHTTPURL(e) {
			c.fail("%s %q is not an http:// or https:// URL: %s", from, e, urlFix(e))
		}
	}
	return out
}

func (c *converter) url(name string) string {
	s, from := c.get(name)
	if s != "" && !isHTTPURL(s) {
		c.fail("%s %q is not an http:// or https:// URL: %s", from, s, urlFix(s))
	}
	return s
}

func isHTTPURL(s string) bool {
	u, err := url.Parse(s)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != ""
}

// urlFix says how to repair s: the usual mistake is a bare host:port.
func urlFix(s string) string {
	if strings.Contains(s, "://") {
		return "use the http or https scheme with a host, e.g. https://198.18.0.1:2379"
	}
	return "write it as http://" + s + " (or https://)"
}

// etcdPrefix cleans the prefix as flannel does (it builds every key with
// path.Join), so "/coreos.com/network/" names the same keys as flannel.
func (c *converter) etcdPrefix(name string) string {
	s, from := c.get(name)
	if s == "" {
		c.fail("%s is empty: use the prefix flanneld uses, by default /coreos.com/network", from)
		return ""
	}
	return path.Clean(s)
}

func (c *converter) regexps(name string) []*regexp.Regexp {
	_, from := c.get(name)
	var out []*regexp.Regexp
	for _, s := range c.vals[name].vals {
		re, err := regexp.Compile(s)
		if err != nil {
			c.fail("%s %q is not a valid regexp: %w", from, s, err)
			continue
		}
		out = append(out, re)
	}
	return out
}

func (c *converter) absPath(name string) string {
	s, from := c.get(name)
	if !filepath.IsAbs(s) {
		c.fail("%s %q is not an absolute path: start it with /", from, s)
	}
	return filepath.Clean(s)
}

// oneOf accepts one of the given values ("" among them means unset is fine).
func (c *converter) oneOf(name string, values ...string) string {
	s, from := c.get(name)
	for _, v := range values {
		if s == v {
			return s
		}
	}
	var shown []string
	for _, v := range values {
		if v != "" {
			shown = append(shown, v)
		}
	}
	c.fail("%s %q is not valid: use one of %s", from, s, strings.Join(shown, ", "))
	return ""
}

func (c *converter) logLevel(name string) slog.Level {
	s, from := c.get(name)
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		c.fail("%s %q is not a log level: use debug, info, warn or error", from, s)
	}
	return l
}

// nodeName picks the node's name: the flag, NODE_NAME (what flannel's kube
// mode reads), else the hostname lower-cased as the kubelet does when it
// names the node, so that both agree without configuration.
func (c *converter) nodeName(name string, getenv func(string) string) (string, bool) {
	s, from := c.get(name)
	if s == "" {
		s, from = getenv(envNodeName), envNodeName
	}
	fromHost := false
	if s == "" {
		h, err := os.Hostname()
		if err != nil {
			c.fail("cannot find the node name: the hostname is unreadable (%w); set -%s", err, flagNodeName)
			return "", false
		}
		s, from, fromHost = strings.ToLower(strings.TrimSpace(h)), "the hostname", true
	}
	if !isDNSSubdomain(s) {
		c.fail("%s %q is not a valid node name: use lower-case letters, digits, '-' and '.' (the Kubernetes node name), via -%s", from, s, flagNodeName)
	}
	return s, fromHost
}

// defaultAnnotationPrefix is flanneld's -kube-annotation-prefix default.
const defaultAnnotationPrefix = "flannel.alpha.coreos.com"

// maxAnnotationStem is the longest name stem a prefix may carry: a
// Kubernetes annotation name (after the "/") has at most 63 characters,
// and the longest name flannel appends is "public-ipv6-overwrite" (21).
const maxAnnotationStem = 63 - len("public-ipv6-overwrite")

// annotationPrefix reads an annotation prefix the way flanneld normalises
// it (a bare domain gets "/", "DOMAIN/NAME" gets "-"), and accepts only
// prefixes that make annotation keys the API server takes: a lower-case
// DNS subdomain with at least one dot, as flanneld requires, then an
// optional stem of lower-case letters, digits, '-', '_' and '.'.
func (c *converter) annotationPrefix(name string) string {
	s, from := c.get(name)
	domain, stem, slash := strings.Cut(s, "/")
	fix := fmt.Sprintf("use a domain such as %s, optionally followed by \"/\" and a name stem (example.com/net)", defaultAnnotationPrefix)
	switch {
	case s == "":
		c.fail("%s is empty: %s", from, fix)
		return ""
	case strings.Contains(stem, "/"):
		c.fail("%s %q has more than one \"/\": %s", from, s, fix)
		return ""
	case !isDNSSubdomain(domain) || !strings.Contains(domain, "."):
		c.fail("%s %q: %q is not a lower-case domain name with a dot: %s", from, s, domain, fix)
		return ""
	}
	if !slash {
		return domain + "/"
	}
	// flanneld keeps a prefix that ends in "/" or "-" as it is.
	if stem != "" && !strings.HasSuffix(stem, "-") {
		stem += "-"
	}
	if len(stem) > maxAnnotationStem || (stem != "" && !validStem(stem)) {
		c.fail("%s %q: the name stem %q must start with a lower-case letter or digit, hold only lower-case letters, digits, '-', '_' and '.', and be at most %d characters: %s",
			from, s, strings.TrimSuffix(stem, "-"), maxAnnotationStem-1, fix)
		return ""
	}
	return domain + "/" + stem
}

func validStem(s string) bool {
	if c := s[0]; (c < 'a' || c > 'z') && (c < '0' || c > '9') {
		return false
	}
	for _, r := range s {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '-' && r != '_' && r != '.' {
			return false
		}
	}
	return true
}

// isDNSSubdomain reports whether s is an RFC 1123 subdomain, the form
// Kubernetes requires of node names.
func isDNSSubdomain(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	for label := range strings.SplitSeq(s, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if (r < 'a' || r > 'z') && (r < '0' || r > '9') && r != '-' {
				return false
			}
		}
	}
	return true
}
