package firewall

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/coreos/go-iptables/iptables"
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/knftables"
)

// Mode picks the firewall backend.
type Mode string

const (
	// ModeAuto uses nftables, and iptables when nft is unusable.
	ModeAuto Mode = "auto"
	// ModeNFTables uses nftables (table loom). In this mode and in auto
	// mode, LOOM-FWD is added in iptables too while iptables' FORWARD
	// policy is DROP, since both hooks must accept a forwarded packet.
	ModeNFTables Mode = "nftables"
	// ModeIPTables uses iptables (chains LOOM-POSTRTG and LOOM-FWD).
	ModeIPTables Mode = "iptables"
)

const (
	// DefaultResync is how often the rules are checked (-iptables-resync).
	DefaultResync = 5 * time.Second
	// syncTimeout bounds one sync's nft and iptables calls.
	syncTimeout = 30 * time.Second
	// iptablesLockWait is how long an iptables call waits for the xtables
	// lock, in seconds, before it fails (and the sync is retried).
	iptablesLockWait = 5
)

// Config configures a Firewall.
type Config struct {
	// Mode is auto (also when empty), nftables or iptables.
	Mode Mode
	// IPMasq turns on the masquerade rules (-ip-masq).
	IPMasq bool
	// ForwardRules turns on the forward accept for the pod network
	// (-iptables-forward-rules).
	ForwardRules bool
	// Resync is the period of the check; 0 means DefaultResync.
	Resync time.Duration
	// NetNSPath is the network namespace to program (/run/netns/NAME); ""
	// means the caller's own. Every nft and iptables call runs inside it.
	NetNSPath string
	// Logger receives the firewall's logs; nil means slog.Default().
	Logger *slog.Logger
	// Metrics, if set, receives the loom_firewall_* metrics.
	Metrics prometheus.Registerer

	// newNFT and newIPT open one family's kernel interface; nil means the
	// real ones. Tests put fakes here, so fakes and the real thing go
	// through New alike.
	newNFT func(family) (knftables.Interface, error)
	newIPT func(family) (iptablesAPI, error)
}

func (c Config) withDefaults() (Config, error) {
	switch c.Mode {
	case "":
		c.Mode = ModeAuto
	case ModeAuto, ModeNFTables, ModeIPTables:
	default:
		return c, fmt.Errorf("firewall mode %q is not valid: use auto, nftables or iptables", c.Mode)
	}
	if c.Resync < 0 {
		return c, fmt.Errorf("firewall resync %v is negative: use a positive period, or 0 for %v", c.Resync, DefaultResync)
	}
	if c.Resync == 0 {
		c.Resync = DefaultResync
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.newNFT == nil {
		c.newNFT = func(fam family) (knftables.Interface, error) {
			return knftables.New(fam.nft(), Table)
		}
	}
	if c.newIPT == nil {
		c.newIPT = func(fam family) (iptablesAPI, error) {
			ipt, err := iptables.New(iptables.IPFamily(fam.proto()), iptables.Timeout(iptablesLockWait))
			if err != nil {
				return nil, fmt.Errorf("%s: %w", fam.iptablesCmd(), err)
			}
			return ipt, nil
		}
	}
	return c, nil
}

// Firewall keeps loom's rules in one network namespace. Set, Ready and Mode
// are safe for concurrent use; Run runs once.
type Firewall struct {
	cfg     Config
	log     *slog.Logger
	mode    Mode // the backend in use: ModeNFTables or ModeIPTables
	metrics *metrics
	kick    chan struct{} // holds at most one pending wake-up for Run
	ready   atomic.Bool   // the last sync succeeded

	// Kernel interfaces per family, opened by New inside the namespace;
	// nil where the tool is unusable, with the reason beside. Read-only
	// after New.
	nft    [2]knftables.Interface
	nftErr [2]error
	ipt    [2]iptablesAPI
	iptErr [2]error

	// fullyRandom is whether the backend in use masquerades fully-random
	// in each family; randomKnown whether that has been confirmed (for
	// nftables: by a write, see syncNFTRules). Set by New, then touched
	// only by the syncing goroutine.
	fullyRandom [2]bool
	randomKnown [2]bool

	// forwardDrop is iptables' FORWARD policy per family at the last
	// sync. Only the syncing goroutine touches it.
	forwardDrop [2]bool

	mu    sync.Mutex // guards the fields below
	addrs Addrs
	set   bool // Set has been called
	sweep bool // the next sync also removes what loom no longer wants
}

// New opens nftables and iptables inside cfg.NetNSPath and picks the
// backend. It changes nothing in the kernel.
func New(cfg Config) (*Firewall, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	f := &Firewall{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "firewall"),
		metrics: newMetrics(),
		kick:    make(chan struct{}, 1),
		sweep:   true,
	}
	if err := inNS(cfg.NetNSPath, f.open); err != nil {
		return nil, err
	}
	f.metrics.mode.WithLabelValues(string(f.mode)).Set(1)
	if err := f.metrics.register(cfg.Metrics); err != nil {
		return nil, err
	}
	f.log.Info("firewall ready to sync", "mode", f.mode, "requested", cfg.Mode,
		"ipMasq", cfg.IPMasq, "forwardRules", cfg.ForwardRules, "resync", cfg.Resync)
	return f, nil
}

// open opens the kernel interfaces and picks the backend. It runs inside
// the namespace.
//
// Opening is probing: knftables.New runs `nft --version` and an
// `nft --check` (a dry-run kernel transaction, 10-20 ms on a small VM),
// go-iptables runs `iptables --version`. One after the other on purpose:
// nft transactions of one namespace take turns in the kernel anyway, and
// probes run at once only take CPU from what the agent does meanwhile
// (the lease claim, the data path): on two cores that made the agent's
// first packet ~30 ms later and the rules no sooner.
func (f *Firewall) open() error {
	for _, fam := range families() {
		f.nft[fam], f.nftErr[fam] = f.cfg.newNFT(fam)
		f.ipt[fam], f.iptErr[fam] = f.cfg.newIPT(fam)
	}
	switch f.cfg.Mode {
	case ModeNFTables:
		if err := f.nftErr[ipv4]; err != nil {
			return fmt.Errorf("firewall mode nftables: nftables is not usable: %w (install nft 1.0.1 or later, or use firewall mode iptables)", err)
		}
		f.mode = ModeNFTables
	case ModeIPTables:
		if err := f.iptErr[ipv4]; err != nil {
			return fmt.Errorf("firewall mode iptables: iptables is not usable: %w (install iptables, or use firewall mode nftables)", err)
		}
		f.mode = ModeIPTables
	default:
		switch {
		case f.nftErr[ipv4] == nil:
			f.mode = ModeNFTables
		case f.iptErr[ipv4] == nil:
			f.mode = ModeIPTables
			f.log.Warn("nftables is not usable, falling back to iptables", "reason", f.nftErr[ipv4])
		default:
			return fmt.Errorf("firewall mode auto: neither nftables (%w) nor iptables (%w) is usable", f.nftErr[ipv4], f.iptErr[ipv4])
		}
	}
	for _, fam := range families() {
		switch {
		case f.mode == ModeNFTables && f.nft[fam] != nil:
			// Learnt from the first write of a masquerade rule
			// (syncNFTRules), not from a dry-run of its own here.
			f.fullyRandom[fam] = true
		case f.mode == ModeIPTables && f.ipt[fam] != nil:
			// go-iptables knows it from the version it has read.
			f.fullyRandom[fam] = f.ipt[fam].HasRandomFully()
			f.randomKnown[fam] = true
			if !f.fullyRandom[fam] {
				f.logNoFullyRandom(fam)
			}
		}
	}
	if f.mode == ModeNFTables && f.iptErr[ipv4] != nil {
		f.log.Info("iptables is not usable, so its FORWARD policy is not checked", "reason", f.iptErr[ipv4])
	}
	return nil
}

func (f *Firewall) logNoFullyRandom(fam family) {
	f.log.Info("masquerading without fully-random port allocation: not supported here",
		"family", fam, "mode", f.mode)
}

// Mode returns the backend in use: ModeNFTables or ModeIPTables.
func (f *Firewall) Mode() Mode { return f.mode }

// Set gives the addresses to program. When they change, the next sync (at
// once) replaces the old rules with the new ones.
func (f *Firewall) Set(a Addrs) {
	f.mu.Lock()
	changed := !f.set || f.addrs != a
	if changed {
		f.addrs, f.set, f.sweep = a, true, true
	}
	f.mu.Unlock()
	if changed {
		select {
		case f.kick <- struct{}{}:
		default: // a wake-up is already pending
		}
	}
}

// Ready reports whether the last sync succeeded: the kernel held every rule
// for the addresses of the last Set. It is false before the first Set.
func (f *Firewall) Ready() bool { return f.ready.Load() }

// Run syncs at once, after every Set, and every Resync, until ctx ends. A
// rule deleted by hand comes back within one Resync. Nothing happens before
// the first Set (the rules of a previous agent stay as they are). When ctx
// ends Run returns nil and leaves the rules in place, so pods keep working
// while the agent restarts.
func (f *Firewall) Run(ctx context.Context) error {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-f.kick:
		}
		if ctx.Err() != nil {
			return nil
		}
		_, _ = f.syncAndRecord(ctx) // logged and counted; retried at the next resync
		timer.Reset(f.cfg.Resync)
	}
}

// syncAndRecord runs one sync and records its outcome in Ready, the
// metrics and the log.
func (f *Firewall) syncAndRecord(ctx context.Context) (ran bool, err error) {
	start := time.Now()
	ran, err = f.syncOnce(ctx)
	if !ran {
		return false, nil
	}
	f.metrics.lastDuration.Set(time.Since(start).Seconds())
	if err != nil {
		f.ready.Store(false)
		f.metrics.syncs.WithLabelValues("error").Inc()
		f.log.Warn("firewall sync failed; retrying at the next resync", "err", err, "resync", f.cfg.Resync)
		return true, err
	}
	if !f.ready.Swap(true) {
		f.log.Info("firewall rules in place", "mode", f.mode)
	}
	f.metrics.syncs.WithLabelValues("ok").Inc()
	f.metrics.lastSuccess.Set(float64(time.Now().UnixNano()) / 1e9)
	return true, nil
}

// syncOnce reads the kernel and writes what differs from the desired state
// for the current addresses. ran is false (and nothing is done) before the
// first Set.
func (f *Firewall) syncOnce(ctx context.Context) (ran bool, err error) {
	f.mu.Lock()
	a, set, sweep := f.addrs, f.set, f.sweep
	f.sweep = false
	f.mu.Unlock()
	if !set {
		return false, nil
	}
	err = f.sync(ctx, a, sweep)
	if err != nil && sweep {
		f.mu.Lock()
		f.sweep = true
		f.mu.Unlock()
	}
	return true, err
}

func (f *Firewall) sync(ctx context.Context, a Addrs, sweep bool) error {
	if err := a.Validate(); err != nil {
		return err
	}
	// A sync under way finishes even when Run is told to stop: an nft
	// killed half-way changes nothing, but an iptables swap interrupted
	// between two steps would be repaired only by the next agent.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), syncTimeout)
	defer cancel()
	return inNS(f.cfg.NetNSPath, func() error {
		var errs []error
		for _, fam := range families() {
			if err := f.syncFamily(ctx, fam, a, sweep); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", fam, err))
			}
		}
		return errors.Join(errs...)
	})
}

// syncFamily makes fam's rules what the rule table says. Wanted objects are
// checked every time; unwanted ones are removed only when sweep is set, so a
// steady-state sync of a single-stack node does not poll the other family.
func (f *Firewall) syncFamily(ctx context.Context, fam family, a Addrs, sweep bool) error {
	network, subnet := a.of(fam)
	rules := ruleTable(fam, network, subnet, f.cfg.IPMasq, f.cfg.ForwardRules)
	if f.mode == ModeIPTables {
		return f.syncIPTablesMode(ctx, fam, rules, sweep)
	}
	return f.syncNFTablesMode(ctx, fam, rules, sweep)
}

// syncIPTablesMode keeps LOOM-POSTRTG and LOOM-FWD (each when it has
// rules) and sweeps the nftables table an earlier nftables-mode agent left.
func (f *Firewall) syncIPTablesMode(ctx context.Context, fam family, rules []rule, sweep bool) error {
	nft, ipt := f.nft[fam], f.ipt[fam]
	if ipt == nil {
		if len(rules) > 0 {
			return fmt.Errorf("iptables is not usable: %w", f.iptErr[fam])
		}
		return nil
	}
	for _, c := range iptChains() {
		if rs := onHook(rules, c.hook); len(rs) > 0 {
			changed, err := ensureIPTChain(ipt, c, iptSpecs(rs, f.fullyRandom[fam]))
			f.wrote("iptables", fam, c.String(), changed)
			if err != nil {
				return err
			}
		} else if sweep {
			changed, err := removeIPT(ipt, c)
			f.removed("iptables", fam, c.String(), changed)
			if err != nil {
				return err
			}
		}
	}
	if sweep && nft != nil {
		changed, err := syncNFT(ctx, nft, fam, nil, false)
		f.removed("nftables", fam, string(fam.nft())+" "+Table, changed)
		if err != nil {
			return err
		}
	}
	return nil
}

// syncNFTablesMode keeps table loom, adds LOOM-FWD to iptables while its
// FORWARD policy is DROP, and sweeps the iptables chains an earlier
// iptables-mode agent left.
func (f *Firewall) syncNFTablesMode(ctx context.Context, fam family, rules []rule, sweep bool) error {
	nft, ipt := f.nft[fam], f.ipt[fam]
	table := string(fam.nft()) + " " + Table
	switch {
	case nft != nil && len(rules) > 0:
		changed, err := f.syncNFTRules(ctx, fam, rules)
		f.wrote("nftables", fam, table, changed)
		if err != nil {
			return err
		}
	case nft != nil && sweep:
		changed, err := syncNFT(ctx, nft, fam, nil, false)
		f.removed("nftables", fam, table, changed)
		if err != nil {
			return err
		}
	case nft == nil && len(rules) > 0:
		return fmt.Errorf("nftables is not usable: %w", f.nftErr[fam])
	}
	if ipt == nil {
		return nil
	}

	// An accept in table loom does not override a DROP policy in iptables'
	// FORWARD: both hooks must accept, so while the policy is DROP the
	// accept goes to iptables too.
	natChain, fwdChain := iptChains()[0], iptChains()[1]
	fwd := onHook(rules, hookForward)
	drop := false
	if len(fwd) > 0 {
		var err error
		if drop, err = forwardPolicyDrop(ipt); err != nil {
			return err
		}
	}
	flipped := drop != f.forwardDrop[fam]
	if drop {
		changed, err := ensureIPTChain(ipt, fwdChain, iptSpecs(fwd, false))
		f.wrote("iptables", fam, fwdChain.String(), changed)
		if err != nil {
			return err
		}
	} else if sweep || flipped {
		changed, err := removeIPT(ipt, fwdChain)
		f.removed("iptables", fam, fwdChain.String(), changed)
		if err != nil {
			return err
		}
	}
	if flipped {
		f.forwardDrop[fam] = drop
		f.log.Info("iptables FORWARD policy changed: the pod network accept follows it into iptables",
			"family", fam, "policyDrop", drop, "chain", fwdChain.String(), "installed", drop)
	}
	if sweep {
		changed, err := removeIPT(ipt, natChain)
		f.removed("iptables", fam, natChain.String(), changed)
		if err != nil {
			return err
		}
	}
	return nil
}

// syncNFTRules is syncNFT for fam's table holding rules, masquerading
// fully-random where nft and the kernel can. Whether they can is learnt
// from the first write rather than from a dry-run at start (each dry-run is
// a kernel transaction of its own, 10-20 ms): the table is written with
// fully-random, and only when that fails does `nft --check` ask whether
// fully-random is the reason; if so the table is written again without it,
// and from then on.
func (f *Firewall) syncNFTRules(ctx context.Context, fam family, rules []rule) (changed bool, err error) {
	nft := f.nft[fam]
	masq := slices.ContainsFunc(rules, func(r rule) bool { return r.verdict == verdictMasquerade })
	changed, err = syncNFT(ctx, nft, fam, rules, f.fullyRandom[fam])
	switch {
	case !masq || f.randomKnown[fam] || !f.fullyRandom[fam]:
		return changed, err
	case err == nil:
		f.randomKnown[fam] = changed // a table already in place proves nothing
		return changed, nil
	}
	ok, known := nftFullyRandom(ctx, nft)
	f.randomKnown[fam] = known
	if ok || !known {
		return changed, err
	}
	f.fullyRandom[fam] = false
	f.logNoFullyRandom(fam)
	return syncNFT(ctx, nft, fam, rules, false)
}

func (f *Firewall) wrote(backend string, fam family, what string, changed bool) {
	if !changed {
		return
	}
	f.metrics.changes.WithLabelValues(backend, fam.String()).Inc()
	f.log.Info("firewall rules written (installed, updated or repaired)", "backend", backend, "family", fam, "object", what)
}

func (f *Firewall) removed(backend string, fam family, what string, changed bool) {
	if !changed {
		return
	}
	f.metrics.changes.WithLabelValues(backend, fam.String()).Inc()
	f.log.Info("firewall rules removed (no longer wanted)", "backend", backend, "family", fam, "object", what)
}

// Cleanup removes everything loom installs, in both backends and both
// families, from cfg.NetNSPath: the nftables tables "ip loom" and "ip6
// loom", and the iptables chains LOOM-POSTRTG and LOOM-FWD with their
// jumps. Only cfg.NetNSPath (and the unexported test hooks) matter. A
// missing nft or iptables binary means there is nothing of its kind to
// remove. Running it again is harmless.
func Cleanup(ctx context.Context, cfg Config) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	return inNS(cfg.NetNSPath, func() error {
		var errs []error
		for _, fam := range families() {
			if nft, err := cfg.newNFT(fam); err == nil {
				if _, err := syncNFT(ctx, nft, fam, nil, false); err != nil {
					errs = append(errs, fmt.Errorf("cleanup %s: %w", fam, err))
				}
			} else if !errors.Is(err, exec.ErrNotFound) {
				errs = append(errs, fmt.Errorf("cleanup %s: open nftables: %w", fam, err))
			}
			if ipt, err := cfg.newIPT(fam); err == nil {
				for _, c := range iptChains() {
					if _, err := removeIPT(ipt, c); err != nil {
						errs = append(errs, fmt.Errorf("cleanup %s: %w", fam, err))
					}
				}
			} else if !errors.Is(err, exec.ErrNotFound) {
				errs = append(errs, fmt.Errorf("cleanup %s: open iptables: %w", fam, err))
			}
		}
		return errors.Join(errs...)
	})
}

// Render returns what loom installs for a, for golden tests and doctor. It
// assumes fully-random masquerading is supported.
//
//   - ModeIPTables: nft is empty; ipt lists every rule of LOOM-POSTRTG and
//     LOOM-FWD, each chain followed by the jump into it.
//   - ModeNFTables and ModeAuto: nft is the text of the "ip loom" and "ip6
//     loom" tables ("add table/chain/rule" lines, as knftables.Fake dumps
//     them); ipt is LOOM-FWD and its jump, which are installed only while
//     iptables' FORWARD policy is DROP.
func Render(mode Mode, a Addrs, ipMasq, forward bool) (nft string, ipt []Rule) {
	for _, fam := range families() {
		network, subnet := a.of(fam)
		rules := ruleTable(fam, network, subnet, ipMasq, forward)
		if mode == ModeIPTables {
			ipt = append(ipt, renderIPT(fam, rules, true, hookNAT, hookForward)...)
			continue
		}
		nft += renderNFT(fam, rules, true)
		ipt = append(ipt, renderIPT(fam, rules, true, hookForward)...)
	}
	return nft, ipt
}

// inNS runs fn on a thread inside the network namespace at path ("" = the
// caller's own). nft and iptables, exec'd from that thread, run there too.
func inNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	n, err := ns.GetNS(path)
	if err != nil {
		return fmt.Errorf("open network namespace %s: %w", path, err)
	}
	defer n.Close()
	return n.Do(func(ns.NetNS) error { return fn() })
}
