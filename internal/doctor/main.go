package doctor

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/loomnet/loom/internal/netns"
	"github.com/loomnet/loom/internal/options"
)

const usage = `Usage: loom doctor [--node NAME] [--json] [--cni-conf-dir DIR] [--cni-cache-dir DIR]
                   [--timeout 2s] [agent flags...]

Reads this node and reports every misconfiguration found, each check as
OK, WARN, FAIL or SKIP with the evidence read and the fix. Read-only.

The agent's flags (and FLANNELD_*/LOOM_* variables) are read exactly as
the agent reads them. With no agent flag given, doctor takes the command
line and environment of the agent running in this network namespace, if any.
With -kube-subnet-mgr the registry is the Kubernetes API, reached with the
agent's -kubeconfig-file or -kube-api-url (else the in-cluster config), and
read with GET and LIST of Nodes only.

Exit status: 0 all OK, 1 warnings, 2 failures.

Doctor flags:
`

// doctorFlags are doctor's own flags, taken out of the command line before
// the rest is parsed as the agent's.
type doctorFlags struct {
	node        string
	json        bool
	cniConfDir  string
	cniCacheDir string
	timeout     time.Duration
}

func newDoctorFlagSet(d *doctorFlags, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("loom doctor", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&d.node, "node", "", "node `name` whose lease to check (default: the agent's -node-name)")
	fs.BoolVar(&d.json, "json", false, "write the report as JSON")
	fs.StringVar(&d.cniConfDir, "cni-conf-dir", DefaultCNIConfDir, "CNI network configuration `directory`")
	fs.StringVar(&d.cniCacheDir, "cni-cache-dir", DefaultCNICacheDir, "the runtime's CNI cache `directory` (results/ inside)")
	fs.DurationVar(&d.timeout, "timeout", DefaultTimeout, "bound on each network read (store, agent, peers)")
	return fs
}

// splitFlags separates doctor's flags from the agent's. Doctor's flags are
// recognised by name in any of the forms the flag package accepts
// (-json, --json, --json=true, --node n1, --node=n1); everything else is
// the agent's, in order.
func splitFlags(fs *flag.FlagSet, args []string) (mine, agent []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f := fs.Lookup(name)
		if !strings.HasPrefix(a, "-") || a == "-" || a == "--" || f == nil || name == "" {
			agent = append(agent, a)
			continue
		}
		mine = append(mine, a)
		if bf, isBool := f.Value.(interface{ IsBoolFlag() bool }); (isBool && bf.IsBoolFlag()) || hasValue {
			continue
		}
		if i+1 < len(args) {
			i++
			mine = append(mine, args[i])
		}
	}
	return mine, agent
}

// Main runs `loom doctor ARGS` and returns the exit status: 0 all OK, 1
// warnings, 2 failures. An error (bad flags) comes with status 2 as well.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) (int, error) {
	var d doctorFlags
	fs := newDoctorFlagSet(&d, stderr)
	for _, a := range args {
		if a == "-h" || a == "-help" || a == "--help" {
			fmt.Fprint(stdout, usage)
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			fmt.Fprint(stdout, "\nAgent flags: see loom agent -h\n")
			return 0, flag.ErrHelp
		}
	}
	mine, agentArgs := splitFlags(fs, args)
	if err := fs.Parse(mine); err != nil {
		return 2, err
	}
	getenv, source := os.Getenv, "command line"
	if len(agentArgs) == 0 {
		if pid, a, env, found := runningAgent(); found {
			agentArgs, getenv = a, env
			source = fmt.Sprintf("running agent, pid %d", pid)
		} else {
			source = "defaults and environment (no agent flag given, no agent running here)"
		}
	}
	opts, err := options.Parse(agentArgs, getenv)
	if err != nil {
		return 2, fmt.Errorf("doctor: agent flags (%s): %w", source, err)
	}
	start := time.Now()
	facts := Gather(ctx, Config{
		Opts: opts, ArgsSource: source, Node: d.node,
		CNIConfDir: d.cniConfDir, CNICacheDir: d.cniCacheDir, Timeout: d.timeout,
	})
	report := NewReport(facts, Run(facts), time.Since(start))
	if d.json {
		err = report.WriteJSON(stdout)
	} else {
		err = report.WriteText(stdout)
	}
	return report.ExitCode, err
}

// runningAgent finds a `loom agent` or flanneld process in this network
// namespace and returns its flags and an environment lookup over its
// environment, so doctor reads the configuration the agent really runs with.
func runningAgent() (pid int, args []string, getenv func(string) string, found bool) {
	self, err := netns.Inode("/proc/self/ns/net")
	if err != nil {
		return 0, nil, nil, false
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, nil, nil, false
	}
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil || p == os.Getpid() {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		if ino, err := netns.Inode(filepath.Join(dir, "ns/net")); err != nil || ino != self {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, "cmdline"))
		if err != nil {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(data), "\x00"), "\x00")
		var flags []string
		switch base := filepath.Base(argv[0]); {
		case base == "flanneld":
			flags = argv[1:]
		case base == "loom" && len(argv) > 1 && argv[1] == "agent":
			flags = argv[2:]
		default:
			continue
		}
		env := map[string]string{}
		if data, err := os.ReadFile(filepath.Join(dir, "environ")); err == nil {
			for kv := range strings.SplitSeq(string(data), "\x00") {
				if k, v, ok := strings.Cut(kv, "="); ok {
					env[k] = v
				}
			}
		}
		return p, flags, func(k string) string { return env[k] }, true
	}
	return 0, nil, nil, false
}
