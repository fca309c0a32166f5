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
//	attachment-<16 hex>   loom's own addition: an empty file per attachment
//	                      that loom reserved addresses for, named by a hash
//	                      of container ID and ifname (see Reserve)
//
// Every operation takes the lock, so concurrent CNI invocations (separate
// processes) and host-local serialize on it; reads for diagnosis take it
// shared. Nothing is cached in memory: the files are the truth, the plugin
// process lives for one command.
//
// Cost: finding what an attachment holds means reading every allocation
// file, one per pod, so DEL, GC, CHECK and Lookup grow with the pods on the
// node. ADD does not: it needs only the round-robin hint and one O_EXCL
// create per range, and learns from the attachment file, without reading
// the others, whether a retried ADD holds addresses already. host-local
// ignores attachment files (their names are not addresses, and being empty
// they match no owner), so a store stays readable and writable by it.
package ipam

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
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
	markerPrefix       = "attachment-"
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
// address yields that address, whoever wrote its file. Either every range
// gets an address or none of this call's reservations remain.
func (s *Store) Allocate(att Attachment, ranges []Range) ([]netip.Addr, error) {
	r, err := s.reserve(att, ranges, true)
	if err != nil {
		return nil, err
	}
	return r.Addrs, nil
}

// Reservation is what Reserve did, so that a failing ADD can undo exactly
// that.
type Reservation struct {
	// Addrs holds one address per range, in range order.
	Addrs []netip.Addr

	store  *Store
	att    Attachment
	fresh  []netip.Addr // reserved by this call, as opposed to held before
	marked bool         // this call created att's attachment file
}

// Reserve is Allocate for ADD, without its cost in pods: it reads the
// allocation files only if att's attachment file exists, that is if loom
// reserved addresses for att before (a retried ADD), and then reuses them.
// Otherwise it reserves with O_EXCL creates alone. The one difference from
// Allocate: addresses that host-local (or a loom-cni older than attachment
// files) reserved for att are not reused but kept, so att ends up holding
// two addresses in that range until DEL frees both. That needs one
// attachment to be set up by two plugins in turn without a DEL in
// between, which runtimes do not do.
func (s *Store) Reserve(att Attachment, ranges []Range) (*Reservation, error) {
	return s.reserve(att, ranges, false)
}

// reserve is Allocate and Reserve; scan forces the read of every
// allocation file.
func (s *Store) reserve(att Attachment, ranges []Range, scan bool) (*Reservation, error) {
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

	marker := filepath.Join(s.dir, markerName(att))
	_, err = os.Lstat(marker)
	hasMarker := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("look for the attachment file of %s/%s: %w", att.ContainerID, att.IfName, err)
	}
	var allocs []Allocation
	if scan || hasMarker {
		if allocs, err = s.readLocked(); err != nil {
			return nil, err
		}
	}
	res := &Reservation{Addrs: make([]netip.Addr, len(ranges)), store: s, att: att}
	for i, r := range ranges {
		if j := slices.IndexFunc(allocs, func(al Allocation) bool { return al.owns(att) && r.Contains(al.IP) }); j >= 0 {
			res.Addrs[i] = allocs[j].IP
			continue
		}
		// The attachment file comes before the first address file, so
		// that every address loom reserves for att is found by a retry,
		// also after a crash between the two.
		if !hasMarker {
			if err := os.WriteFile(marker, nil, 0o600); err != nil {
				err = fmt.Errorf("create the attachment file of %s/%s: %w", att.ContainerID, att.IfName, err)
				return nil, errors.Join(err, res.undoLocked())
			}
			hasMarker, res.marked = true, true
		}
		a, err := s.reserveLocked(i, r, att, allocs)
		if err != nil {
			return nil, errors.Join(err, res.undoLocked())
		}
		res.fresh = append(res.fresh, a)
		res.Addrs[i] = a
	}
	return res, nil
}

// Undo frees the addresses this reservation made (not those att held
// before) and the attachment file it created: the rollback of a failed ADD.
func (r *Reservation) Undo() error {
	if len(r.fresh) == 0 && !r.marked {
		return nil
	}
	unlock, err := r.store.lockFile(syscall.LOCK_EX, true)
	if err != nil {
		return err
	}
	defer unlock()
	return r.undoLocked()
}

func (r *Reservation) undoLocked() error {
	var errs []error
	for _, a := range r.fresh {
		if err := os.Remove(r.store.ipPath(a)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("free %s: %w", a, err))
		}
	}
	r.fresh = nil
	if r.marked {
		if err := os.Remove(filepath.Join(r.store.dir, markerName(r.att))); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove the attachment file of %s/%s: %w", r.att.ContainerID, r.att.IfName, err))
		}
		r.marked = false
	}
	return errors.Join(errs...)
}

// markerName is the name of att's attachment file. A hash, because a
// container ID may be longer than a file name and hold any character; 64
// bits make a collision between two of a node's attachments impossible in
// practice, and one would only make an ADD read the allocation files.
func markerName(att Attachment) string {
	sum := sha256.Sum256([]byte(strings.TrimSpace(att.ContainerID) + "\x00" + att.IfName))
	return markerPrefix + hex.EncodeToString(sum[:8])
}

// reserveLocked picks the first free address after the range's last
// reserved one, wrapping around (host-local's round robin), and claims its
// file with O_EXCL. allocs is every allocation when the caller read them,
// nil when it did not: then O_EXCL alone tells used addresses, which after
// the round-robin hint is usually the first one tried.
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
	last, hintLen := s.lastReservedLocked(idx)
	if last.IsValid() && r.Subnet.Contains(last) {
		start = next(last)
	}
	// Every address we skip is a used one (or the gateway), so with fewer
	// used than capacity this loop ends well before it comes round again.
	for a := start; ; {
		if r.Contains(a) && !used[a] {
			err := s.writeOwner(a, att)
			if err == nil {
				if err := s.writeLastReserved(idx, a, hintLen); err != nil {
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

func (s *Store) lastReservedPath(idx int) string {
	return filepath.Join(s.dir, fmt.Sprintf("%s%d", lastReservedPrefix, idx))
}

// writeLastReserved records a as range idx's last reserved address, over a
// hint of oldLen bytes. It overwrites the file in place, and cuts it to
// length only when the new address is shorter, instead of truncating it to
// zero first: every change to the file's size or times is an ext4 journal
// transaction, which waits while the journal commits (other tenants' disk
// writes make that a millisecond), and ext4 also starts writeback of a
// file that was truncated to zero and rewritten as soon as it is closed
// (auto_da_alloc, meant for editors that replace files without fsync).
// Nothing needs the hint durable: a torn or lost one (crash mid-write)
// only costs the round robin, like any unreadable hint.
func (s *Store) writeLastReserved(idx int, a netip.Addr, oldLen int) error {
	f, err := os.OpenFile(s.lastReservedPath(idx), os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	content := a.String()
	_, err = f.WriteAt([]byte(content), 0)
	if err == nil && len(content) < oldLen {
		err = f.Truncate(int64(len(content)))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// maxHintLen bounds the read of a hint: no address is longer as text, so a
// longer file is unreadable anyway.
const maxHintLen = 64

// lastReservedLocked returns range idx's last reserved address (the zero
// Addr if there is none or it is unreadable, which only costs the round
// robin) and the hint file's length in bytes. It reads with O_NOATIME: the
// file was written by the previous reservation, so a plain read would
// update its access time (relatime), one more journal transaction per ADD.
func (s *Store) lastReservedLocked(idx int) (netip.Addr, int) {
	f, err := openNoATime(s.lastReservedPath(idx))
	if err != nil {
		return netip.Addr{}, 0
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxHintLen+1))
	if err != nil {
		return netip.Addr{}, len(data)
	}
	a, err := netip.ParseAddr(strings.TrimSpace(string(data)))
	if err != nil {
		return netip.Addr{}, len(data)
	}
	return a.Unmap(), len(data)
}

// openNoATime opens path for reading without updating its access time,
// falling back to a plain open where O_NOATIME is not allowed (a file of
// another owner, without CAP_FOWNER).
func openNoATime(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOATIME, 0)
	if errors.Is(err, syscall.EPERM) {
		return os.Open(path)
	}
	return f, err
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

// Release frees every address att holds, and its attachment file, and
// returns the addresses. Releasing an attachment that holds nothing, or a
// store that was never created, is not an error: DEL must be idempotent.
func (s *Store) Release(att Attachment) ([]netip.Addr, error) {
	if err := att.validate(); err != nil {
		return nil, err
	}
	marker := markerName(att)
	freed, err := s.removeWhere(func(al Allocation) bool { return al.owns(att) }, func(name string) bool { return name == marker })
	addrs := make([]netip.Addr, len(freed))
	for i, al := range freed {
		addrs[i] = al.IP
	}
	return addrs, err
}

// GC frees every allocation whose owner is not in valid, and the
// attachment files of attachments not in valid, and returns the freed
// allocations. A file that cannot be removed does not stop the sweep; its
// error is reported with the others.
func (s *Store) GC(valid []Attachment) ([]Allocation, error) {
	keep := make(map[string]bool, len(valid))
	for _, a := range valid {
		keep[markerName(a)] = true
	}
	return s.removeWhere(func(al Allocation) bool {
		return !slices.ContainsFunc(valid, al.owns)
	}, func(name string) bool { return !keep[name] })
}

// removeWhere removes the allocations drop selects, then the attachment
// files dropMarker selects by name: in that order, so that a failure
// half-way leaves an attachment file for every address that is left.
func (s *Store) removeWhere(drop func(Allocation) bool, dropMarker func(name string) bool) ([]Allocation, error) {
	if _, err := os.Stat(s.dir); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	unlock, err := s.lockFile(syscall.LOCK_EX, true)
	if err != nil {
		return nil, err
	}
	defer unlock()
	allocs, markers, err := s.scanLocked()
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
	if len(errs) == 0 {
		for _, m := range markers {
			if !dropMarker(m) {
				continue
			}
			if err := os.Remove(filepath.Join(s.dir, m)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove attachment file %s: %w", m, err))
			}
		}
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
// (lock, last_reserved_ip.N, attachment files, anything else) are not
// allocations.
func (s *Store) readLocked() ([]Allocation, error) {
	allocs, _, err := s.scanLocked()
	return allocs, err
}

// scanLocked reads every allocation file and lists the attachment files.
//
// This is the part of DEL and GC that grows with the number of pods (one
// file each), so the files are read relative to the directory with bare
// openat, read and close: os.ReadFile spends ten system calls per file (a
// stat for the size, and a poller registration it tries and undoes), which
// at 200 pods made a scan take milliseconds.
func (s *Store) scanLocked() (allocs []Allocation, markers []string, err error) {
	dir, err := os.Open(s.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("read IPAM store: %w", err)
	}
	defer dir.Close()
	entries, err := dir.ReadDir(-1)
	if err != nil {
		return nil, nil, fmt.Errorf("read IPAM store: %w", err)
	}
	dirfd := int(dir.Fd())
	buf := make([]byte, 0, 512)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), markerPrefix) {
			markers = append(markers, e.Name())
			continue
		}
		a, err := netip.ParseAddr(e.Name())
		if err != nil || !e.Type().IsRegular() {
			continue
		}
		buf, err = readFileAt(dirfd, e.Name(), buf[:0])
		if errors.Is(err, fs.ErrNotExist) {
			continue // released by a writer that ignores the lock
		}
		if err != nil {
			return nil, nil, fmt.Errorf("read allocation %s: %w", e.Name(), err)
		}
		id, ifname := parseOwner(string(buf))
		allocs = append(allocs, Allocation{IP: a.Unmap(), ContainerID: id, IfName: ifname})
	}
	slices.SortFunc(allocs, func(x, y Allocation) int { return x.IP.Compare(y.IP) })
	return allocs, markers, nil
}

// readFileAt appends the content of the file name in the directory dirfd
// to buf.
func readFileAt(dirfd int, name string, buf []byte) ([]byte, error) {
	// O_NOATIME: a scan reads every file, and an access time update of a
	// file read for the first time since it was written (relatime) is a
	// journal transaction.
	fd, err := retryEINTR(func() (int, error) {
		return unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOATIME, 0)
	})
	if errors.Is(err, unix.EPERM) {
		fd, err = retryEINTR(func() (int, error) { return unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0) })
	}
	if err != nil {
		return buf, err
	}
	defer unix.Close(fd)
	for {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, cap(buf))
		}
		n, err := retryEINTR(func() (int, error) { return unix.Read(fd, buf[len(buf):cap(buf)]) })
		if err != nil {
			return buf, err
		}
		if n == 0 {
			return buf, nil
		}
		buf = buf[:len(buf)+n]
	}
}

func retryEINTR(f func() (int, error)) (int, error) {
	for {
		n, err := f()
		if !errors.Is(err, unix.EINTR) {
			return n, err
		}
	}
}

// parseOwner splits "<id>\r\n<ifname>" (or a bare "<id>" from old
// host-local versions). An empty file, left by a crash between create and
// write, has no owner: GC frees it, nothing else matches it.
func parseOwner(content string) (id, ifname string) {
	id, ifname, _ = strings.Cut(strings.TrimSpace(content), "\n")
	return strings.TrimSpace(id), strings.TrimSpace(ifname)
}
