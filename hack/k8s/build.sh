#!/usr/bin/env bash
# Builds the Kubernetes control plane, kubelet, kubectl and etcd at the pinned versions from the Go
# module proxy, once per version: the binaries land in $STASIS_CACHE/k8s-$K8S_VERSION/bin and every
# later call returns at once. Cold: ≈ 10 min on 2 cores; warm: < 1 s.
#
# Usage: hack/k8s/build.sh            prints the bin directory on stdout
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.2}
STAGING_VERSION=${STAGING_VERSION:-v0.37.2}
CACHE=${STASIS_CACHE:-$HOME/.cache/stasis}
out="$CACHE/k8s-$K8S_VERSION"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl etcd)

have_all() { for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || return 1; done; }
if have_all; then echo "$out/bin"; exit 0; fi

here=$(cd "$(dirname "$0")" && pwd)
work="$out/src"
mkdir -p "$work" "$out/bin"
exec 9>"$out/.lock"
flock 9
if have_all; then echo "$out/bin"; exit 0; fi

# The wrapper module: k8s.io/kubernetes cannot be required on its own because its go.mod points every
# staging module at ./staging; replace them with the published v0.x versions.
staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
  kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver streaming)
{
  echo "module stasis.local/k8sbins"
  echo
  echo "go 1.25"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  for s in "${staging[@]}"; do echo "replace k8s.io/$s => k8s.io/$s $STAGING_VERSION"; done
} >"$work/go.mod"
cp "$here/tools.go.txt" "$work/tools.go"
cd "$work"
export GOFLAGS=-mod=mod
go get "k8s.io/kubernetes@$K8S_VERSION" >&2
# etcd is built at the version Kubernetes itself pins (its client's version): another version would
# make the module graph move k8s.io/kubernetes to an older release.
ETCD_VERSION=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/client/v3)
go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
[ "$(go list -m -f '{{.Version}}' k8s.io/kubernetes)" = "$K8S_VERSION" ] || { echo "etcd $ETCD_VERSION moved k8s.io/kubernetes" >&2; exit 1; }

major=${K8S_VERSION#v}; minor=${major#*.}; minor=${minor%%.*}; major=${major%%.*}
date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ld=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
  ld="$ld -X $p.gitTreeState=clean -X $p.buildDate=$date"
done
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
  [ -x "$out/bin/$b" ] && continue
  echo "building $b $K8S_VERSION" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ld" -o "$out/bin/$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2
  mv "$out/bin/$b.tmp" "$out/bin/$b"
done
if [ ! -x "$out/bin/etcd" ]; then
  echo "building etcd $ETCD_VERSION" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
  mv "$out/bin/etcd.tmp" "$out/bin/etcd"
fi
echo "$out/bin"
