# loom: `make lab` brings up a 3-node lab on this machine and prints its
# connectivity matrix; `make test` runs every test. Both need root.

GO        ?= go
BIN       := bin
GOTESTFLAGS ?= -p 2 -timeout 40m

.PHONY: all build deps kube-bins lab lab-down test lint fuzz clean

all: build

# Static binaries: no dynamic loader or cgo start in every pod ADD/DEL
# (~1 ms / ~3 ms of them) nor libc in the agent's RSS (1.8 MiB), #8.
# loom is the node binary (agent, doctor); loom-lab holds the store, the
# lab and the bench, which `loom store|lab|bench` execs.
build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/loom ./cmd/loom
	CGO_ENABLED=0 $(GO) build -o $(BIN)/loom-lab ./cmd/loom-lab
	CGO_ENABLED=0 $(GO) build -o $(BIN)/loom-cni ./cmd/loom-cni

deps:
	@scripts/deps.sh

# kube-apiserver, kube-controller-manager and kubectl at the release pinned in
# tools/kube/go.mod, for the Kubernetes-mode tests and lab. Built once (minutes)
# into /var/cache/loom/kube/<kubernetes version>-<go version>, or
# $LOOM_KUBE_BIN_DIR; later runs only check. The path formula lives in
# scripts/kube-bins.sh and, the same, in kubecp.DefaultBinDir
# (internal/kubecp/bins.go): change both together.
kube-bins:
	@GO=$(GO) scripts/kube-bins.sh

lab: deps build
	$(BIN)/loom lab down
	$(BIN)/loom lab up

lab-down: build
	$(BIN)/loom lab down --all

test: deps kube-bins
	@out=$$(gofmt -l cmd internal); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) test $(GOTESTFLAGS) ./...

lint:
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

# Bounded fuzz runs of every parser of outside input. Counts, not
# durations: -fuzztime with a duration can end in a spurious "context
# deadline exceeded" on Go 1.26 (golang/go#75804). Each count takes at most
# ~20 s on a busy 2-core machine.
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 700000x ./internal/netconf/
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 1000000x ./internal/subnetenv/
	$(GO) test -run '^$$' -fuzz '^FuzzUnmarshalAttrs$$' -fuzztime 700000x ./internal/lease/
	$(GO) test -run '^$$' -fuzz '^FuzzParseKey$$' -fuzztime 300000x ./internal/lease/
	$(GO) test -run '^$$' -fuzz '^FuzzParseConf$$' -fuzztime 400000x ./internal/cni/
	$(GO) test -run '^$$' -fuzz '^FuzzEnv$$' -fuzztime 20000x ./internal/cni/
	$(GO) test -run '^$$' -fuzz '^FuzzResultJSON$$' -fuzztime 200000x ./internal/cni/
	$(GO) test -run '^$$' -fuzz '^FuzzGuard$$' -fuzztime 40000x ./internal/registry/
	$(GO) test -run '^$$' -fuzz '^FuzzGuardMatchesReference$$' -fuzztime 20000x ./internal/registry/
	$(GO) test -run '^$$' -fuzz '^FuzzParseOptions$$' -fuzztime 100000x ./internal/backend/vxlan/
	$(GO) test -run '^$$' -fuzz '^FuzzParseOptions$$' -fuzztime 100000x ./internal/backend/udp/
	$(GO) test -run '^$$' -fuzz '^FuzzCoalesce$$' -fuzztime 1000000x ./internal/backend/udp/tun/
	$(GO) test -run '^$$' -fuzz '^FuzzConsume$$' -fuzztime 400000x ./internal/backend/udp/tun/

clean:
	rm -rf $(BIN)
