package bench

import (
	"context"
	"strings"
	"testing"
)

// A mistake in Config is refused before any lab is built (no root, no
// namespaces), with the bad value named.
func TestRunRefusesBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{name: "unknown backend", cfg: Config{Backends: []string{"wireguard"}}, want: `backend "wireguard"`},
		{name: "unknown group", cfg: Config{Groups: []string{"scale", "speed"}}, want: `group "speed"`},
		{name: "more peers than /29s", cfg: Config{ScalePeers: []int{100, 9000}}, want: "scale peers 9000"},
		{name: "no peers", cfg: Config{ScalePeers: []int{0}}, want: "scale peers 0"},
		{name: "negative runs", cfg: Config{Runs: -1}, want: "runs -1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := Run(context.Background(), tc.cfg)
			if err == nil || rep != nil {
				t.Fatalf("Run(%+v) = %v, %v; want an error and no report", tc.cfg, rep, err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %q", err, tc.want)
			}
		})
	}
}
