package main

import (
	"context"
	"fmt"
	"io"

	"github.com/loomnet/loom/internal/doctor"
)

// exitError carries a non-zero exit status that is not a failure of the
// command itself: doctor exits 1 when it found warnings and 2 on failures.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }
func (e exitError) ExitCode() int { return e.code }

// runDoctor is `loom doctor`: it prints its report and returns an error
// with ExitCode 1 (warnings) or 2 (failures) when the node is not healthy.
func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	code, err := doctor.Main(ctx, args, stdout, stderr)
	if err != nil {
		return err
	}
	if code != 0 {
		return exitError{code}
	}
	return nil
}
