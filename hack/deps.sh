#!/usr/bin/env bash
# Installs the Debian (bookworm) packages the tests and the local cluster need. Idempotent and quiet
# when everything is there. Never installs from trixie or forky: CRIU 4.2 is unpacked privately by
# hack/criu/install.sh instead.
set -euo pipefail
pkgs=(
  util-linux iproute2 iptables procps psmisc kmod       # nsenter/unshare, bridges, DNAT, process tools
  containerd runc containernetworking-plugins           # real nodes (e2e tier)
  conntrack socat ethtool ebtables                      # kubelet's host checks
  openssl ca-certificates jq curl                        # PKI and probes in scripts
  gcc libc6-dev                                          # nsjoin.so, the CRIU preload of the agent
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -t bookworm -y -qq --no-install-recommends "${missing[@]}" >&2
