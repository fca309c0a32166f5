#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kubectl, at the version
# pinned in tools/kube/go.mod, into a cache directory that loom's Kubernetes-mode
# tests and lab find with kubecp.FindBins. A cold build takes minutes; a warm
# one only checks that the three binaries are there.
#
# The cache directory is $LOOM_KUBE_BIN_DIR, else
# /var/cache/loom/kube/<kubernetes version>-<go version>, e.g.
# /var/cache/loom/kube/v1.37.1-go1.26.8. Keep this formula the same as
# kubecp.DefaultBinDir in internal/kubecp/bins.go.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
go=${GO:-go} # the Makefile passes its $(GO)
mod=$root/tools/kube
bins=(kube-apiserver kube-controller-manager kubectl)

# The version is read from the module's requirement, so go.mod stays the one
# place that pins it (kubecp's tests check that its constant agrees).
version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$mod/go.mod")
if [[ ! $version =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]]; then
	echo "kube-bins: no k8s.io/kubernetes vX.Y.Z requirement in $mod/go.mod" >&2
	exit 1
fi
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}
# GOVERSION can carry experiment suffixes ("go1.26.8 X:foo"); the key keeps
# only the release, as runtime.Version's first word in kubecp does.
goversion=$("$go" env GOVERSION)
dir=${LOOM_KUBE_BIN_DIR:-/var/cache/loom/kube/$version-${goversion%% *}}

complete() {
	local b
	for b in "${bins[@]}"; do
		[[ -x $dir/$b ]] || return 1
	done
}

if complete; then
	exit 0
fi

mkdir -p "$dir"
# Two builds at once (two checkouts, make -j) would only waste the cores;
# the second waits and then finds the cache complete.
exec 9>"$dir/.build.lock"
flock 9
if complete; then
	exit 0
fi

echo "kube-bins: building Kubernetes $version into $dir (a few minutes, once)" >&2
start=$SECONDS
# A build killed by SIGKILL (no trap runs) leaves its temporary directory.
rm -rf "$dir"/.build.tmp.*
tmp=$(mktemp -d "$dir/.build.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Clients compare the server's version (kubectl version, discovery), so the
# binaries carry the release's version as Kubernetes' own build does. The build
# date is the release's publication date, so two builds are identical.
date=$(cd "$mod" && "$go" list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit= -X $pkg.buildDate=$date"
done

# CGO off: Kubernetes builds these three statically too.
(cd "$mod" && CGO_ENABLED=0 "$go" build -mod=readonly -trimpath -ldflags "$ldflags" -o "$tmp/" \
	k8s.io/kubernetes/cmd/kube-apiserver \
	k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kubectl)

# Each rename is atomic, so a build killed at any point leaves every binary
# either absent or whole, and the next run builds what is missing.
for b in "${bins[@]}"; do
	mv -f "$tmp/$b" "$dir/$b"
done
echo "kube-bins: built in $((SECONDS - start))s" >&2
