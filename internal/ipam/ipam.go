// Package ipam hands out pod addresses from a node's subnet and remembers
// them on disk, in the layout of the reference host-local plugin, so that
// loom-cni, host-local and flannel's CNI plugin (which delegates to
// host-local) can take turns on one node without handing out an address
// twice, and so that `loom doctor` can read either's allocations.
//
// Layout, under <DataDir>/<network name>/:
//
//	10.244.1.2            one file per allocated address, created with O_EXCL;
//	fc00:0:0:1::2         content "<container ID>\r\n<ifname>" (host-local
//	                      writes CRLF; files of old host-local versions hold
//	                      only the container ID and are matched by ID alone)
//	last_reserved_ip.0    the address last handed out from range 0 (the first
//	last_reserved_ip.1    range passed to Allocate, IPv4 by convention), .1 for
//	                      range 1 (IPv6): allocation resumes after it, so a
//	                      freed address is not reused at once (round robin)
//	lock                  flock'ed for the whole of every read-modify-write
//
// Every operation takes the lock, so concurrent CNI invocations (separate
// processes) and host-local serialize on it; reads for diagnosis take it
// shared. Nothing is cached in memory: the files are the truth, the plugin
// process lives for one command, and a store of a /24 is at most 254 small
// files, read once per operation.
package ipam

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// DefaultDataDir is host-local's default store root.
const DefaultDataDir = "/var/lib/cni/networks"

// DefaultLockTimeout bounds the wait for the store lock. Allocation holds the
// lock for milliseconds, so a longer wait means a stuck process; runtimes give
// a whole ADD a few minutes.
const DefaultLockTimeout = 30 * time.Second

const (
	lockName           = "lock"
	lastReservedPrefix = "last_reserved_ip."
	// ownerSep separates container ID and ifname in an allocation file;
	// host-local writes CRLF, and we write what it writes.
	ownerSep = "\r\n"
)

// ErrExhausted is returned (wrapped) by Allocate when a range has no free
// address; the message names the range and how many addresses are taken.
var ErrExhausted = errors.New("no free address")

// Attachment identifies one pod interface: reservations are keyed by it, as
// the CNI spec keys attachments.
type Attachment struct {
	ContainerID string
	IfName      string
}

func (a Attachment) validate() error {
	if strings.TrimSpace(a.ContainerID) == "" {
		return errors.New("attachment has an empty container ID")
	}
	if a.IfName == "" {
		return fmt.Errorf("attachment %s has an empty interface name", a.ContainerID)
	}
	// A line break would corrupt the two-line file format.
	if strings.ContainsAny(a.ContainerID+a.IfName, "\r\n") {
		return fmt.Errorf("attachment %q/%q contains a line break", a.ContainerID, a.IfName)
	}
	return nil
}

// Allocation is one reserved address and its owner. IfName is empty for files
// written by old host-local versions, which recorded only the container ID.
type Allocation struct {
	IP          netip.Addr
	ContainerID string
	IfName      string
}

// owns reports whether the allocation belongs to a: the same container and
// interface, or the same container when the file predates ifnames.
func (al Allocation) owns(a Attachment) bool {
	return al.ContainerID == strings.TrimSpace(a.ContainerID) && (al.IfName == a.IfName || al.IfName == "")
}

// Config says where a network's store lives.
type Config struct {
	// DataDir is the store root; the network's files live in
	// DataDir/Network. Empty means DefaultDataDir.
	DataDir string
	// Network is the CNI network name.
	Network string
	// LockTimeout bounds the wait for the lock; zero means DefaultLockTimeout.
	LockTimeout time.Duration
}

// Store is the allocation store of one network. It holds no state besides
// its location: every method reads the files under the lock.
type Store struct {
	dir         string
	lockTimeout time.Duration
}

// New returns the store of cfg.Network. It touches nothing on disk: the
// directory is created by the first Allocate, so read-only callers (DEL of
// an unknown container, doctor) leave no trace.
func New(cfg Config) (*Store, error) {
	if cfg.Network == "" || cfg.Network == "." || cfg.Network == ".." || strings.ContainsAny(cfg.Network, `/\`) {
		return nil, fmt.Errorf("network name %q cannot name a store directory", cfg.Network)
	}
	if cfg.DataDir == "" {
		cfg.DataDir = DefaultDataDir
	}
	if cfg.LockTimeout <= 0 {
		cfg.LockTimeout = DefaultLockTimeout
	}
	return &Store{dir: filepath.Join(cfg.DataDir, cfg.Network), lockTimeout: cfg.LockTimeout}, nil
}

// Dir is the directory holding this network's files.
func (s *Store) Dir() string { return s.dir }

func (s *Store) lockPath() string { return filepath.Join(s.dir, lockName) }

// Allocate reserves one address in each range for att and returns them in
// range order. It is idempotent: a range in which att already holds an
// address yields that address. Either every range gets an address or none
// of this call's reservations remain.
func (s *Store) Allocate(att Attachment, ranges []Range) ([]netip.Addr, error) {
	if err := att.validate(); err != nil {
		return nil, err
	}
	for _, r := range ranges {
		if err := r.validate(); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(s.dir, 0o755); err != nil {
		return nil, fmt.Errorf("create IPAM store: %w", err)
	}
	unlock, err := s.lockFile(syscall.LOCK_EX, true)
	if err != nil {
		return nil, err
	}
	defer unlock()

	allocs, err := s.readLocked()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, len(ranges))
	var fresh []netip.Addr
	for i, r := range ranges {
		if j := slices.IndexFunc(allocs, func(al Allocation) bool { return al.owns(att) && r.Contains(al.IP) }); j >= 0 {
			out[i] = allocs[j].IP
			continue
		}
		a, err := s.reserveLocked(i, r, att, allocs)
		if err != nil {
			for _, f := range fresh {
				os.Remove(s.ipPath(f)) // best effort: the error below is what matters
			}
			return nil, err
		}
		fresh = append(fresh, a)
		out[i] = a
	}
	return out, nil
}

// reserveLocked picks the first free address after the range's last
// reserved one, wrapping around (host-local's round robin), and claims its
// file with O_EXCL.
func (s *Store) reserveLocked(idx int, r Range, att Attachment, allocs []Allocation) (netip.Addr, error) {
	used := make(map[netip.Addr]bool)
	for _, al := range allocs {
		if r.Contains(al.IP) {
			used[al.IP] = true
		}
	}
	capacity := r.Capacity()
	if uint64(len(used)) >= capacity {
		return netip.Addr{}, fmt.Errorf("%w: range %s is full: %d of %d addresses allocated", ErrExhausted, r, len(used), capacity)
	}
	next := func(a netip.Addr) netip.Addr {
		if n := a.Next(); n.IsValid() && n.Compare(r.last()) <= 0 {
			return n
		}
		return r.first()
	}
	start := r.first()
	if last, ok := s.lastReservedLocked(idx); ok && r.Subnet.Contains(last) {
		start = next(last)
	}
	// Every address we skip is a used one (or the gateway), so with fewer
	// used than capacity this loop ends well before it comes round again.
	for a := start; ; {
		if r.Contains(a) && !used[a] {
			err := s.writeOwner(a, att)
			if err == nil {
				if err := os.WriteFile(filepath.Join(s.dir, fmt.Sprintf("%s%d", lastReservedPrefix, idx)), []byte(a.String()), 0o600); err != nil {
					os.Remove(s.ipPath(a))
					return netip.Addr{}, fmt.Errorf("record last reserved address of range %s: %w", r, err)
				}
				return a, nil
			}
			if !errors.Is(err, fs.ErrExist) {
				return netip.Addr{}, err
			}
			used[a] = true // a file we could not parse, or a writer ignoring the lock
		}
		if a = next(a); a == start {
			return netip.Addr{}, fmt.Errorf("%w: range %s is full: %d of %d addresses allocated", ErrExhausted, r, len(used), capacity)
		}
	}
}

func (s *Store) writeOwner(a netip.Addr, att Attachment) error {
	f, err := os.OpenFile(s.ipPath(a), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("reserve %s: %w", a, err)
	}
	_, err = f.WriteString(strings.TrimSpace(att.ContainerID) + ownerSep + att.IfName)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("reserve %s: %w", a, err)
	}
	return nil
}

func (s *Store) lastReservedLocked(idx int) (netip.Addr, bool) {
	data, err := os.ReadFile(filepath.Join(s.dir, fmt.Sprintf("%s%d", lastReservedPrefix, idx)))
	if err != nil {
		return netip.Addr{}, false // a missing or unreadable hint only costs the round robin
	}
	a, err := netip.ParseAddr(strings.TrimSpace(string(data)))
	return a.Unmap(), err == nil
}

func (s *Store) ipPath(a netip.Addr) string { return filepath.Join(s.dir, a.String()) }

// Lookup returns the addresses att holds, in address order.
func (s *Store) Lookup(att Attachment) ([]netip.Addr, error) {
	allocs, err := s.List()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, al := range allocs {
		if al.owns(att) {
			out = append(out, al.IP)
		}
	}
	return out, nil
}

// Release frees every address att holds and returns them. Releasing an
// attachment that holds nothing, or a store that was never created, is not
// an error: DEL must be idempotent.
func (s *Store) Release(att Attachment) ([]netip.Addr, error) {
	if err := att.validate(); err != nil {
		return nil, err
	}
	freed, err := s.removeWhere(func(al Allocation) bool { return al.owns(att) })
	addrs := make([]netip.Addr, len(freed))
	for i, al := range freed {
		addrs[i] = al.IP
	}
	return addrs, err
}

// GC frees every allocation whose owner is not in valid and returns what it
// freed. A file that cannot be removed does not stop the sweep; its error
// is reported with the others.
func (s *Store) GC(valid []Attachment) ([]Allocation, error) {
	return s.removeWhere(func(al Allocation) bool {
		return !slices.ContainsFunc(valid, al.owns)
	})
}

func (s *Store) removeWhere(drop func(Allocation) bool) ([]Allocation, error) {
	if _, err := os.Stat(s.dir); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	unlock, err := s.lockFile(syscall.LOCK_EX, true)
	if err != nil {
		return nil, err
	}
	defer unlock()
	allocs, err := s.readLocked()
	if err != nil {
		return nil, err
	}
	var freed []Allocation
	var errs []error
	for _, al := range allocs {
		if !drop(al) {
			continue
		}
		if err := os.Remove(s.ipPath(al.IP)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("free %s: %w", al.IP, err))
			continue
		}
		freed = append(freed, al)
	}
	return freed, errors.Join(errs...)
}

// List returns every allocation, in address order (IPv4 first). It takes
// the lock shared and creates nothing, so diagnosis never changes the store.
func (s *Store) List() ([]Allocation, error) {
	if _, err := os.Stat(s.dir); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	unlock, err := s.lockFile(syscall.LOCK_SH, false)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// No lock file: nothing has ever allocated here through a lock.
	case err != nil:
		return nil, err
	default:
		defer unlock()
	}
	return s.readLocked()
}

// RangeUsage is how full one range is.
type RangeUsage struct {
	Range     Range
	Allocated uint64
	Capacity  uint64
}

// Full reports whether the range cannot serve another address.
func (u RangeUsage) Full() bool { return u.Allocated >= u.Capacity }

// Usage counts the allocations in each range, for STATUS and doctor.
func (s *Store) Usage(ranges []Range) ([]RangeUsage, error) {
	allocs, err := s.List()
	if err != nil {
		return nil, err
	}
	out := make([]RangeUsage, len(ranges))
	for i, r := range ranges {
		out[i] = RangeUsage{Range: r, Capacity: r.Capacity()}
		for _, al := range allocs {
			if r.Contains(al.IP) {
				out[i].Allocated++
			}
		}
	}
	return out, nil
}

// readLocked reads every allocation file. Names that are not addresses
// (lock, last_reserved_ip.N, anything else) are not allocations.
func (s *Store) readLocked() ([]Allocation, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("read IPAM store: %w", err)
	}
	var out []Allocation
	for _, e := range entries {
		a, err := netip.ParseAddr(e.Name())
		if err != nil || !e.Type().IsRegular() {
			continue
		}
		data, err := os.ReadFile(filepath.Join(s.dir, e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			continue // released by a writer that ignores the lock
		}
		if err != nil {
			return nil, fmt.Errorf("read allocation %s: %w", e.Name(), err)
		}
		id, ifname := parseOwner(string(data))
		out = append(out, Allocation{IP: a.Unmap(), ContainerID: id, IfName: ifname})
	}
	slices.SortFunc(out, func(x, y Allocation) int { return x.IP.Compare(y.IP) })
	return out, nil
}

// parseOwner splits "<id>\r\n<ifname>" (or a bare "<id>" from old
// host-local versions). An empty file, left by a crash between create and
// write, has no owner: GC frees it, nothing else matches it.
func parseOwner(content string) (id, ifname string) {
	id, ifname, _ = strings.Cut(strings.TrimSpace(content), "\n")
	return strings.TrimSpace(id), strings.TrimSpace(ifname)
}
