package ipam

import (
	"fmt"
	"os"
	"strconv"
	"testing"
)

// TestMain doubles as the child process of TestAllocateAcrossProcesses:
// with LOOM_IPAM_HELPER_DIR set it allocates and exits instead of testing,
// so concurrency across real processes (each with its own flock) is tested
// without a test that skips itself in normal runs.
func TestMain(m *testing.M) {
	if dir := os.Getenv("LOOM_IPAM_HELPER_DIR"); dir != "" {
		if err := helperAllocate(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func helperAllocate(dir string) error {
	n, err := strconv.Atoi(os.Getenv("LOOM_IPAM_HELPER_N"))
	if err != nil {
		return fmt.Errorf("LOOM_IPAM_HELPER_N: %w", err)
	}
	s, err := New(Config{DataDir: dir, Network: "loom"})
	if err != nil {
		return err
	}
	id, err := strconv.Atoi(os.Getenv("LOOM_IPAM_HELPER_ID"))
	if err != nil {
		return fmt.Errorf("LOOM_IPAM_HELPER_ID: %w", err)
	}
	for i := range n {
		a := att(fmt.Sprintf("p%d-c%d", id, i))
		// Half the helpers reserve as ADD does (O_EXCL alone), half as
		// Allocate does (after reading every allocation), so that both
		// meet each other and host-local-like writers.
		if id%2 == 0 {
			_, err = s.Allocate(a, []Range{v4(), v6()})
		} else {
			_, err = s.Reserve(a, []Range{v4(), v6()})
		}
		if err != nil {
			return fmt.Errorf("allocate %v: %w", a, err)
		}
	}
	return nil
}
