# Stasis — every entry point a developer or CI uses. `make test` is what .ci/run runs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

export STASIS_CACHE ?= $(HOME)/.cache/stasis
GO ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/stasis-k8s/stasis/internal/version.Version=$(VERSION)
# Tests that need CRIU find it here (a wrapper around trixie's CRIU 4.x, unpacked privately).
CRIU_WRAPPER = $(STASIS_CACHE)/criu/criu

.PHONY: all build deps criu k8s cert-manager lint unit integration images e2e test bench bench-dumps bench-drain bench-webhook demo down clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/stasis .

# System packages every tier needs (bookworm only; never trixie system-wide).
deps:
	hack/deps.sh

# CRIU 4.x unpacked privately under $(STASIS_CACHE)/criu (cached).
criu: deps
	hack/criu/install.sh

# etcd, kube-apiserver, controller-manager, scheduler, kubelet, kubectl built from the module proxy (cached).
k8s:
	hack/k8s/build.sh >/dev/null

lint:
	@bad=$$(gofmt -l $$(git ls-files -co --exclude-standard '*.go')); \
	  if [ -n "$$bad" ]; then echo "gofmt needed: $$bad"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags integration,e2e ./tests/...

# Unit tier: table-driven tests, handler tests, and real CRIU on real processes (needs root).
unit: criu
	STASIS_CRIU=$(CRIU_WRAPPER) $(GO) test -count=1 ./...

# Integration tier: the webhook inside a real kube-apiserver + controller-manager + scheduler.
# cert-manager's controller and CA injector built from its Go module, and its CRDs (cached), for the
# deployment tests (tests/deploy: deploy/ with cert-manager and with the no-cert-manager overlay).
cert-manager:
	hack/cert-manager/build.sh >/dev/null

integration: k8s build criu cert-manager
	$(GO) test -tags integration -count=1 -timeout 30m ./tests/integration/...
	$(GO) test -tags integration -count=1 -timeout 30m ./tests/deploy/...

# The two images as docker-archive tarballs (no Docker needed), for `ctr -n k8s.io images import`.
images: build criu
	$(GO) run ./hack/image --out $(STASIS_CACHE)/images --stasis bin/stasis --criu-dir $(STASIS_CACHE)/criu

# End-to-end tier: two real kubelets with containerd, Stasis deployed from deploy/.
e2e: k8s build criu
	STASIS_CRIU=$(CRIU_WRAPPER) $(GO) test -tags e2e -count=1 -v -timeout 45m ./tests/e2e/...

# The README's run command: a local 2-node cluster (real kubelets + containerd on this machine),
# Stasis installed from deploy/overlays/local, scenario 1 shown; the cluster stays up.
# Against an existing cluster: make demo KUBECONFIG=/path (installs deploy/overlays/no-cert-manager).
DEMO_DIR ?= /var/tmp/stasis-demo
demo: k8s build criu
	STASIS_DEMO_DIR=$(DEMO_DIR) $(GO) run ./hack/cluster demo $(if $(KUBECONFIG),--kubeconfig $(KUBECONFIG))

down:
	STASIS_DEMO_DIR=$(DEMO_DIR) $(GO) run ./hack/cluster down

test: lint unit integration e2e

# Dump/restore of 1 GiB of touched memory: agent path vs raw criu, same process, same run.
bench: criu build
	STASIS_CRIU=$(CRIU_WRAPPER) $(GO) test -count=1 -run '^$$' -bench . -benchtime 3x -timeout 45m ./agent/...

# The agent's dump scheduling (issue 13): 8 apps of 256 MiB asked to checkpoint at once, with 1,
# 2, 4, 8 dumps at once and the adaptive scheduler; drain time and per-dump freeze, real CRIU.
bench-dumps: criu build
	STASIS_CRIU=$(CRIU_WRAPPER) $(GO) test -count=1 -run '^$$' -bench '^BenchmarkDrainDumps$$' -benchtime 2x ./agent/ 2>&1 | \
	  grep -E 'MiB: drain|^(ok|FAIL)'

# A node drained of 1, 4 and 16 checkpoint-enabled pods (256 MiB each) on the e2e tier's real
# nodes: drain time against the sum of the dumps and the disk's time for the bytes. One e2e run
# at a time on a machine (fixed addresses). STASIS_BENCH_DRAIN_PODS / _MIB change the load.
bench-drain: k8s build criu
	STASIS_BENCH_DRAIN=1 STASIS_CRIU=$(CRIU_WRAPPER) $(GO) test -tags e2e -count=1 -v -timeout 45m -run '^TestBenchDrain$$' ./tests/e2e/ 2>&1 | \
	  tee /tmp/stasis-bench-drain.log | grep -E '^(== bench-drain|pods |--- |ok|FAIL|PASS)|bench_drain_test'

# Admission at scale (issue 13): floods of checkpoint-enabled pod creations (server-side dry run)
# at 50, 200 and 1000/s for 20 s each through the integration tier's real API server and webhook
# binary, with evictions during and after each flood. STASIS_BENCH_RATES / STASIS_BENCH_SECONDS
# change the rates and the duration.
bench-webhook: k8s build
	STASIS_BENCH_WEBHOOK=1 $(GO) test -tags integration -count=1 -timeout 30m -run '^TestBenchWebhook$$' -v ./tests/integration/ 2>&1 | \
	  tee /tmp/stasis-bench-webhook.log | grep -E '^(== bench-webhook|rate |--- |ok|FAIL|PASS)'

clean:
	rm -rf bin
