// Package zapslog routes the zap logs of etcd's client and server to slog,
// so loom has one log stream and one format. Only entries at or above a
// level pass: etcd logs every request retry and every raft step at info,
// which would drown the agent's own messages.
package zapslog

import (
	"context"
	"log/slog"
	"slices"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// New returns a zap logger that writes entries at min or above to l.
// demote, when not nil, picks entries to write at debug level instead:
// etcd's known noise, such as its complaints while it is being shut down.
func New(l *slog.Logger, min zapcore.Level, demote func(zapcore.Entry) bool) *zap.Logger {
	return zap.New(&core{l: l, min: min, demote: demote})
}

// core is a zapcore.Core over a slog.Logger. It is immutable: With returns
// a copy, so it needs no lock.
type core struct {
	l      *slog.Logger
	min    zapcore.Level
	demote func(zapcore.Entry) bool
	attrs  []slog.Attr // fields added by With
}

func (c *core) Enabled(l zapcore.Level) bool { return l >= c.min }

func (c *core) With(fs []zapcore.Field) zapcore.Core {
	return &core{l: c.l, min: c.min, demote: c.demote, attrs: append(slices.Clip(c.attrs), toAttrs(fs)...)}
}

func (c *core) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *core) Write(e zapcore.Entry, fs []zapcore.Field) error {
	attrs := append(slices.Clip(c.attrs), toAttrs(fs)...)
	if e.LoggerName != "" {
		attrs = append(attrs, slog.String("logger", e.LoggerName))
	}
	lvl := level(e.Level)
	if c.demote != nil && c.demote(e) {
		lvl = slog.LevelDebug
	}
	c.l.LogAttrs(context.Background(), lvl, e.Message, attrs...)
	return nil
}

func (c *core) Sync() error { return nil }

func level(l zapcore.Level) slog.Level {
	switch {
	case l <= zapcore.DebugLevel:
		return slog.LevelDebug
	case l == zapcore.InfoLevel:
		return slog.LevelInfo
	case l == zapcore.WarnLevel:
		return slog.LevelWarn
	}
	return slog.LevelError
}

// toAttrs renders zap fields through zap's own map encoder, so every field
// type (durations, errors, objects) comes out as zap would print it.
func toAttrs(fs []zapcore.Field) []slog.Attr {
	if len(fs) == 0 {
		return nil
	}
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range fs {
		f.AddTo(enc)
	}
	keys := make([]string, 0, len(enc.Fields))
	for k := range enc.Fields {
		keys = append(keys, k)
	}
	slices.Sort(keys) // map order is random; logs should not be
	attrs := make([]slog.Attr, 0, len(keys))
	for _, k := range keys {
		attrs = append(attrs, slog.Any(k, enc.Fields[k]))
	}
	return attrs
}
