#!/usr/bin/env bash
# Builds cert-manager's controllers and CA injector (one binary, cert-manager-lite) from the
# github.com/cert-manager/cert-manager module on the Go module proxy, once per version, and prints
# the directory holding the binary and the CRDs:
#
#   $STASIS_CACHE/cert-manager-$VERSION/bin/cert-manager-lite
#   $STASIS_CACHE/cert-manager-$VERSION/crds/*.yaml          (the module's deploy/crds)
#
# cert-manager's own cmd/ modules are not published on the proxy, so main.go.txt wires the
# module's controller packages the way its cmd does, for what Stasis' manifests use. The wrapper
# module lives in the cache, never in Stasis' go.mod (cert-manager pulls in every DNS provider SDK).
# Cold: ≈ 12.5 CPU-minutes (measured: user 9m04s + sys 3m19s with an empty build cache, ≈ 6-7 min on
# 2 idle cores; it shares nothing with hack/k8s/build.sh, cert-manager pins k8s.io v0.36.x); 16 s
# after a main.go.txt change; warm: < 1 s.
#
# Usage: hack/cert-manager/build.sh
set -euo pipefail

VERSION=${CERT_MANAGER_VERSION:-v1.21.2}
CACHE=${STASIS_CACHE:-$HOME/.cache/stasis}
out="$CACHE/cert-manager-$VERSION"
bin="$out/bin/cert-manager-lite"
here=$(cd "$(dirname "$0")" && pwd)
stamp="$out/.stamp-$(sha256sum "$here/main.go.txt" | cut -c1-12)"

done_already() { [ -x "$bin" ] && [ -f "$stamp" ] && [ -n "$(ls "$out"/crds/*.yaml 2>/dev/null)" ]; }
if done_already; then echo "$out"; exit 0; fi
mkdir -p "$out/src" "$out/bin" "$out/crds"
exec 9>"$out/.lock"
flock 9
if done_already; then echo "$out"; exit 0; fi

cd "$out/src"
export GOFLAGS=-mod=mod
cat >go.mod <<MOD
module stasis.local/certmanagerlite

go 1.26
MOD
cp "$here/main.go.txt" main.go
go get "github.com/cert-manager/cert-manager@$VERSION" >&2
go mod tidy >&2
[ "$(go list -m -f '{{.Version}}' github.com/cert-manager/cert-manager)" = "$VERSION" ] || {
  echo "build.sh: cert-manager moved off $VERSION" >&2; exit 1; }
moddir=$(go list -m -f '{{.Dir}}' github.com/cert-manager/cert-manager)
cp "$moddir"/deploy/crds/*.yaml "$out/crds/"
chmod 0644 "$out"/crds/*.yaml
echo "building cert-manager-lite $VERSION" >&2
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin.tmp" . >&2
mv "$bin.tmp" "$bin"
rm -f "$out"/.stamp-*
touch "$stamp"
echo "$out"
