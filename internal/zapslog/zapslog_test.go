package zapslog

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func TestNew(t *testing.T) {
	var buf bytes.Buffer
	demote := func(e zapcore.Entry) bool { return e.Message == "noise" }
	l := New(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})), zapcore.WarnLevel, demote)
	l.Info("dropped")
	l.Error("noise")
	l.Named("raft").With(zap.String("member", "m1")).Warn("slow", zap.Int("ms", 120), zap.Error(errors.New("boom")))
	out := buf.String()
	if strings.Contains(out, "dropped") {
		t.Errorf("an info entry passed a warn filter:\n%s", out)
	}
	for _, want := range []string{"level=DEBUG msg=noise", "level=WARN", "msg=slow", "member=m1", "ms=120", "error=boom", "logger=raft"} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in\n%s", want, out)
		}
	}
}
