// Package version says which loom this is.
package version

import (
	"runtime"
	"runtime/debug"
)

// Version is set at link time (-ldflags "-X .../version.Version=v0.1.0");
// otherwise the module version or VCS revision from the build info is used.
var Version = ""

// String is the one-line version shown by `loom version` and in logs.
func String() string {
	v := Version
	if v == "" {
		v = "dev"
		if bi, ok := debug.ReadBuildInfo(); ok {
			if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
				v = bi.Main.Version
			}
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" && len(s.Value) >= 12 {
					v += "+" + s.Value[:12]
				}
			}
		}
	}
	return "loom " + v + " " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH
}
