package ipam

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"syscall"
	"time"
)

// ErrLockTimeout is returned (wrapped) when the store's lock could not be
// taken in Config.LockTimeout: another process holds it. The CNI layer turns
// it into "try again later".
var ErrLockTimeout = errors.New("timed out waiting for the IPAM store lock")

// lockFile takes flock(how) on the store's lock file and returns the function
// that releases it. flock, like host-local's lock, belongs to the open file
// description, so it excludes other processes and other goroutines of this
// process alike, and the kernel drops it if the process dies.
//
// The wait polls a non-blocking flock instead of blocking in the kernel,
// because a blocking flock cannot be abandoned when the timeout expires.
// The polls are short and jittered so fifty waiting processes do not wake
// in lockstep.
func (s *Store) lockFile(how int, create bool) (unlock func(), err error) {
	flags := os.O_RDONLY
	if create {
		flags |= os.O_CREATE
	}
	f, err := os.OpenFile(s.lockPath(), flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	deadline := time.Now().Add(s.lockTimeout)
	for backoff := time.Millisecond; ; backoff = min(2*backoff, 20*time.Millisecond) {
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing the file drops the lock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", s.lockPath(), err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("%w %s after %s", ErrLockTimeout, s.lockPath(), s.lockTimeout)
		}
		time.Sleep(backoff/2 + rand.N(backoff))
	}
}
