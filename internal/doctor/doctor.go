// Package doctor is `loom doctor`: it reads a node (a host, or a lab node's
// namespace) and reports every misconfiguration it finds, each with the
// evidence it read and the fix.
//
// Design notes.
//
// Two halves, as in CoreDNS's plugins: Gather reads the node once into
// Facts (sysctls, links, routes, neighbours, firewall dumps, subnet.env, the
// CNI configuration and IPAM store, the agent's /readyz, the registry), and
// every check is a plain function from Facts to a Result. All judgement
// lives in the checks, so each is unit-tested with a table of hand-made
// Facts and needs no root; Gather is tested end to end in the lab.
//
// Read-only: Gather never writes. Kernel state is read with netlink dumps
// and /proc/sys, the firewall with `nft -j list ruleset` and `iptables-save`,
// files with open(O_RDONLY) (the IPAM store through ipam.Store.List, which
// takes the lock shared and creates nothing), the registry with two range
// requests (in Kubernetes mode: GET and LIST of Nodes and the server's
// version, nothing else), the agent with one GET, peers with one TCP
// connect each (an RST is an answer too). A lab test compares route, link,
// address, neighbour and rule dumps and the etcd revision before and after
// a run; a test against a real kube-apiserver runs doctor as a user allowed
// only to get and list Nodes and compares the Nodes' resourceVersions.
//
// Bounded: every network read has a deadline (--timeout, 2 s by default), and
// reads run in parallel, so a dead store or peer costs one timeout, not one
// per key or peer. A healthy node takes well under a second.
//
// Severity: FAIL is a fault that breaks pod traffic or pod creation now; WARN
// is something that will bite later or that doctor cannot tell for sure (a
// leaked address, a dead peer); SKIP says a check could not run because a
// fact it needs is missing (the store is unreachable), and names that fact.
package doctor

import (
	"fmt"
)

// Status is the outcome of one check.
type Status int

// Statuses, in increasing severity. SKIP sorts below OK: it says nothing
// about the node.
const (
	Skip Status = iota
	OK
	Warn
	Fail
)

func (s Status) String() string {
	switch s {
	case Skip:
		return "SKIP"
	case OK:
		return "OK"
	case Warn:
		return "WARN"
	case Fail:
		return "FAIL"
	}
	return fmt.Sprintf("Status(%d)", int(s))
}

// MarshalText writes the status as OK, WARN, FAIL or SKIP.
func (s Status) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads what MarshalText writes.
func (s *Status) UnmarshalText(b []byte) error {
	for _, v := range []Status{Skip, OK, Warn, Fail} {
		if v.String() == string(b) {
			*s = v
			return nil
		}
	}
	return fmt.Errorf("unknown status %q", b)
}

// Result is what one check found.
type Result struct {
	Check    string   `json:"check"`
	Status   Status   `json:"status"`
	Summary  string   `json:"summary"`
	Evidence []string `json:"evidence,omitempty"` // what was read: a rule, route, sysctl, key or file line
	Fix      string   `json:"fix,omitempty"`      // a command or config change; empty when OK
}

// check is one named diagnosis.
type check struct {
	name string
	fn   func(*Facts) Result
}

// Check names, as printed and as --json carries them.
const (
	CheckStore                  = "store"
	CheckNetworkLease           = "network-vs-lease"
	CheckKubeAnnotations        = "kube-annotations"
	CheckKubeNetworkUnavailable = "kube-network-unavailable"
	CheckSubnetEnv              = "subnet-env"
	CheckCNIConfig              = "cni-config"
	CheckCNI0Address            = "cni0-address"
	CheckIPForward              = "ip-forward"
	CheckBridgeNF               = "bridge-nf"
	CheckPublicIP               = "public-ip"
	CheckPeerLiveness           = "peer-liveness"
	CheckDatapath               = "datapath"
	CheckMTU                    = "mtu"
	CheckMasquerade             = "masquerade"
	CheckForward                = "forward"
	CheckIPAMUsage              = "ipam-usage"
	CheckIPAMLeak               = "ipam-leak"
	CheckAgentReady             = "agent-ready"
	maxEvidencePerCheck         = 12
)

// checks lists every check in the order the report prints them: the store
// and the configuration first (everything else depends on them; the kube-
// checks say SKIP outside Kubernetes mode), then the kernel, then pods,
// then the agent.
func checks() []check {
	return []check{
		{CheckStore, checkStore},
		{CheckNetworkLease, checkNetworkVsLease},
		{CheckKubeAnnotations, checkKubeAnnotations},
		{CheckKubeNetworkUnavailable, checkKubeNetworkUnavailable},
		{CheckSubnetEnv, checkSubnetEnv},
		{CheckCNIConfig, checkCNIConfig},
		{CheckCNI0Address, checkCNI0Address},
		{CheckIPForward, checkIPForward},
		{CheckBridgeNF, checkBridgeNF},
		{CheckPublicIP, checkPublicIP},
		{CheckPeerLiveness, checkPeerLiveness},
		{CheckDatapath, checkDatapath},
		{CheckMTU, checkMTU},
		{CheckMasquerade, checkMasquerade},
		{CheckForward, checkForward},
		{CheckIPAMUsage, checkIPAMUsage},
		{CheckIPAMLeak, checkIPAMLeak},
		{CheckAgentReady, checkAgentReady},
	}
}

// KubeOnlyChecks names the checks that apply in Kubernetes mode only
// (-kube-subnet-mgr); elsewhere they say SKIP "not in Kubernetes mode".
func KubeOnlyChecks() []string {
	return []string{CheckKubeAnnotations, CheckKubeNetworkUnavailable}
}

// Names returns the names of every check, in report order.
func Names() []string {
	var out []string
	for _, c := range checks() {
		out = append(out, c.name)
	}
	return out
}

// Run runs every check over f.
func Run(f *Facts) []Result {
	var out []Result
	for _, c := range checks() {
		r := c.fn(f)
		r.Check = c.name
		if len(r.Evidence) > maxEvidencePerCheck {
			more := len(r.Evidence) - maxEvidencePerCheck
			r.Evidence = append(r.Evidence[:maxEvidencePerCheck:maxEvidencePerCheck], fmt.Sprintf("... and %d more", more))
		}
		out = append(out, r)
	}
	return out
}

// ExitCode is the process exit status for results: 0 when nothing is
// wrong, 1 with warnings, 2 with failures.
func ExitCode(results []Result) int {
	worst := OK
	for _, r := range results {
		worst = max(worst, r.Status)
	}
	switch worst {
	case Fail:
		return 2
	case Warn:
		return 1
	}
	return 0
}

// Helpers for building results.

func ok(summary string, evidence ...string) Result {
	return Result{Status: OK, Summary: summary, Evidence: evidence}
}

func skip(format string, args ...any) Result {
	return Result{Status: Skip, Summary: fmt.Sprintf(format, args...)}
}

func fail(summary, fix string, evidence ...string) Result {
	return Result{Status: Fail, Summary: summary, Fix: fix, Evidence: evidence}
}

func warn(summary, fix string, evidence ...string) Result {
	return Result{Status: Warn, Summary: summary, Fix: fix, Evidence: evidence}
}

// plural renders "1 peer", "2 peers".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// verbS is the -s of a verb whose subject counts n: "1 peer answers".
func verbS(n int) string {
	if n == 1 {
		return "s"
	}
	return ""
}

// isAre is " is" or " are" for n things.
func isAre(n int) string {
	if n == 1 {
		return " is"
	}
	return " are"
}
