# syntax=docker/dockerfile:1.7
#
# Stasis' two images, for a machine with Docker/BuildKit:
#
#   docker build --target webhook -t ghcr.io/stasis-k8s/stasis-webhook:v0.1.0 .
#   docker build --target agent   -t ghcr.io/stasis-k8s/stasis-agent:v0.1.0 .
#
# webhook: the static stasis binary on distroless/static, user 65532 (nonroot), nothing else.
# agent:   the stasis binary at /usr/local/bin/stasis (wiring.ImageBinary; the tools init-container
#          copies it into pods with `stasis tools-install`), CRIU 4.2 from Debian forky unpacked with
#          its own loader and libraries at /usr/local/lib/stasis/criu/ with nsjoin.so (the agent
#          preloads it to enter a container's namespaces only after CRIU is loaded from the image)
#          and an empty plugins/ folder; the wrapper `criu` for people, and nsenter.
#
# The same images are assembled without Docker or a registry by `go run ./hack/image` (what CI and
# the e2e tests use); both describe the same paths, users and entrypoints — keep them in step. Image
# names and tags are set in deploy/base/kustomization.yaml (`images:`).
#
# Reproducible: pinned base images (pin the digests with --build-arg when releasing), -trimpath and
# no build-time stamps in the binary but VERSION, SOURCE_DATE_EPOCH honoured by BuildKit, and the
# CRIU package set fetched at an explicit version.

ARG GO_IMAGE=golang:1.26-bookworm
ARG TRIXIE_IMAGE=debian:trixie-slim
ARG FORKY_IMAGE=debian:forky-slim
ARG STATIC_IMAGE=gcr.io/distroless/static-debian13:nonroot

# --- the stasis binary (static) -----------------------------------------------------------------
FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/root/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
RUN --mount=type=cache,target=/root/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -buildvcs=false \
      -ldflags "-s -w -X github.com/stasis-k8s/stasis/internal/version.Version=${VERSION}" \
      -o /out/stasis .

# --- nsjoin.so (hack/criu/nsjoin.c), built as hack/criu/install.sh builds it --------------------
FROM ${GO_IMAGE} AS nsjoin
COPY hack/criu/nsjoin.c /src/nsjoin.c
RUN cc -shared -fPIC -O2 -Wall -o /out-nsjoin.so /src/nsjoin.c

# --- CRIU 4.2 from forky, unpacked privately (the same package set as hack/criu/install.sh) -------
FROM ${FORKY_IMAGE} AS criu
ARG CRIU_VERSION=4.2.1-1
RUN set -eux; \
    apt-get update; \
    mkdir -p /debs /out/criu/root /out/criu/plugins; cd /debs; \
    apt-get download criu=${CRIU_VERSION} libcompel1=${CRIU_VERSION} libc6 libbsd0 libgnutls30t64 \
      libnet9 libnftables1 libnl-3-200 libprotobuf-c1 libuuid1 libmd0 libp11-kit0 libidn2-0 \
      libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10 libffi8 libjansson4 libmnl0 \
      libnftnl11 libxtables12 libgcc-s1; \
    for d in /debs/*.deb; do dpkg -x "$d" /out/criu/root; done; \
    rm -rf /out/criu/root/usr/share/doc /out/criu/root/usr/share/man /out/criu/root/usr/share/lintian /out/criu/root/usr/share/locale; \
    test -e /out/criu/root/usr/lib64/ld-linux-x86-64.so.2
COPY --from=nsjoin /out-nsjoin.so /out/criu/nsjoin.so
# The wrapper as hack/criu/install.sh writes it (keep the two identical).
COPY --chmod=0755 <<"EOF" /out/criu/criu
#!/bin/sh
# CRIU 4.2 from Debian forky, run through its own loader and libraries (independent of the libc of
# whatever image or host this runs on).
d=$(dirname "$(readlink -f "$0")")/root
# Hardware breakpoints never fire in Firecracker VMs: without this (CRIU's FI_NO_BREAKPOINTS),
# dumps hang after "Waiting for N to trap". Syscall tracing works everywhere.
export CRIU_FAULT="${CRIU_FAULT:-130}"
exec "$d/usr/lib64/ld-linux-x86-64.so.2" --library-path "$d/usr/lib/x86_64-linux-gnu:$d/lib/x86_64-linux-gnu" "$d/usr/sbin/criu" "$@"
EOF

# --- webhook: minimal, non-root ------------------------------------------------------------------
FROM ${STATIC_IMAGE} AS webhook
COPY --from=build /out/stasis /usr/local/bin/stasis
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stasis"]
CMD ["webhook"]

# --- agent: stasis + CRIU bundle + nsenter/sh/readlink/dirname ----------------------------------
FROM ${TRIXIE_IMAGE} AS agent
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends util-linux; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*
COPY --from=criu /out/criu /usr/local/lib/stasis/criu
COPY --from=build /out/stasis /usr/local/bin/stasis
USER 0:0
ENTRYPOINT ["/usr/local/bin/stasis"]
CMD ["agent"]
