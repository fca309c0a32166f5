# loom: `make lab` brings up a 3-node lab on this machine and prints its
# connectivity matrix; `make test` runs every test. Both need root.

GO        ?= go
BIN       := bin
GOTESTFLAGS ?= -p 2 -timeout 40m

.PHONY: all build deps lab lab-down test lint fuzz clean

all: build

build:
	$(GO) build -o $(BIN)/loom ./cmd/loom
	$(GO) build -o $(BIN)/loom-cni ./cmd/loom-cni

deps:
	@scripts/deps.sh

lab: deps build
	$(BIN)/loom lab down
	$(BIN)/loom lab up

lab-down: build
	$(BIN)/loom lab down --all

test: deps
	@out=$$(gofmt -l cmd internal); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) test $(GOTESTFLAGS) ./...

lint:
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

# Short fuzz runs of every parser of outside input.
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParse$$ -fuzztime 20s ./internal/netconf/
	$(GO) test -run '^$$' -fuzz FuzzParse$$ -fuzztime 20s ./internal/subnetenv/
	$(GO) test -run '^$$' -fuzz FuzzUnmarshalAttrs -fuzztime 20s ./internal/lease/
	$(GO) test -run '^$$' -fuzz FuzzParseConf -fuzztime 20s ./internal/cni/

clean:
	rm -rf $(BIN)
