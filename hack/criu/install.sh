#!/usr/bin/env bash
# Provides CRIU 4.2 without touching the system: bookworm's criu 3.17 fails on current kernels
# ("vdso: Unexpected rt vDSO area bounds"), trixie's 4.1.1 cannot dump any inet socket on kernels
# >= 6.16 ("sockets: Can't get 1:16 opt"), and installing a newer criu system-wide would drag in a
# new libc. Instead, forky's criu and its libraries are fetched with `apt-get download` through a
# private apt configuration (sources derived at run time from the machine's own Debian sources,
# same URIs and keyring, Suites: forky), unpacked with `dpkg -x` into $STASIS_CACHE/criu/root,
# and run through their own dynamic loader by the wrapper $STASIS_CACHE/criu/criu.
#
# The bundle also holds nsjoin.so (built here from nsjoin.c with the system's cc): the agent
# preloads it into CRIU to enter a container's namespaces only after the loader has mapped CRIU
# and its libraries from the bundle (see criurun), and an empty plugins/ directory that CRIU is
# pointed at instead of the container's /usr/lib/criu.
#
# Idempotent: returns at once when the wrapper exists and `criu check` passes. Prints the wrapper path.
#
# Usage: hack/criu/install.sh [DEST]     (DEST defaults to $STASIS_CACHE/criu)
set -euo pipefail

cache=${STASIS_CACHE:-$HOME/.cache/stasis}
dest=${1:-$cache/criu}
wrapper=$dest/criu
root=$dest/root
stamp=$dest/.complete

# Packages measured to be enough for forky's criu 4.2.1 (see the shared machine facts).
suite=forky
pkgs=(criu libcompel1 libc6 libbsd0 libgnutls30t64 libnet9 libnftables1 libnl-3-200 libprotobuf-c1
  libuuid1 libmd0 libp11-kit0 libidn2-0 libunistring5 libtasn1-6 libnettle8t64 libhogweed6t64
  libgmp10 libffi8 libjansson4 libmnl0 libnftnl11 libxtables12 libgcc-s1)
here=$(cd "$(dirname "$0")" && pwd)

check() {
  # The rlimit line is harmless here (no CAP_SYS_RESOURCE in the sandbox); "Looks good" is the verdict.
  "$wrapper" check 2>&1 | tee "$dest/check.log" | grep -q 'Looks good'
}

mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9

if [ "$(cat "$stamp" 2>/dev/null)" = "$suite $(sha256sum <"$here/nsjoin.c")" ] && [ -x "$wrapper" ] &&
  [ -f "$dest/nsjoin.so" ] && check; then
  echo "$wrapper"
  exit 0
fi

src=/etc/apt/sources.list.d/debian.sources
[ -r "$src" ] || { echo "install.sh: $src not found: cannot derive a $suite source" >&2; exit 1; }

work=$(mktemp -d "$dest/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/etc/sources.list.d" "$work/lists/partial" "$work/archives/partial" "$work/debs"

# Keep the machine's URIs and keyring; take only the main archive stanza (the one with bookworm or
# bookworm-updates, not -security) and point it at $suite.
awk -v RS= -v ORS='\n\n' '/Suites:[^\n]*bookworm([ \n]|$)/ && !/security/' "$src" |
  sed -E "s/^Suites:.*/Suites: $suite/; /^#/d" >"$work/etc/sources.list.d/$suite.sources"
grep -q "^Suites: $suite" "$work/etc/sources.list.d/$suite.sources" || {
  echo "install.sh: no bookworm stanza in $src to derive $suite from" >&2
  exit 1
}
: >"$work/etc/sources.list"

aptopts=(
  -o Dir::Etc::sourcelist="$work/etc/sources.list"
  -o Dir::Etc::sourceparts="$work/etc/sources.list.d"
  -o Dir::State::Lists="$work/lists"
  -o Dir::Cache::Archives="$work/archives"
  -o Dir::Cache::pkgcache="" -o Dir::Cache::srcpkgcache=""
  -o APT::Get::List-Cleanup=0
  -o Debug::NoLocking=1
  -o APT::Sandbox::User=root
)
echo "install.sh: fetching $suite's criu and libraries (private apt dir, system apt untouched)" >&2
apt-get "${aptopts[@]}" update -qq >&2
versioned=()
for p in "${pkgs[@]}"; do versioned+=("$p/$suite"); done
(cd "$work/debs" && apt-get "${aptopts[@]}" download -qq "${versioned[@]}" >&2)

rm -rf "$root"
mkdir -p "$root"
for deb in "$work"/debs/*.deb; do
  dpkg -x "$deb" "$root"
done

loader=$root/usr/lib64/ld-linux-x86-64.so.2
[ -e "$loader" ] || loader=$root/lib64/ld-linux-x86-64.so.2
[ -e "$loader" ] || { echo "install.sh: no loader in the unpacked libc6" >&2; exit 1; }

# The wrapper resolves its own directory so the whole folder can be copied elsewhere (the Stasis
# image ships it at /usr/local/lib/stasis/criu). The agent does not use the wrapper (it starts the
# loader itself, see criurun.Bundle); tests, the bench and people do.
cat >"$wrapper" <<'EOF'
#!/bin/sh
# CRIU 4.2 from Debian forky, run through its own loader and libraries (independent of the libc of
# whatever image or host this runs on).
d=$(dirname "$(readlink -f "$0")")/root
# Hardware breakpoints never fire in Firecracker VMs: without this (CRIU's FI_NO_BREAKPOINTS),
# dumps hang after "Waiting for N to trap". Syscall tracing works everywhere.
export CRIU_FAULT="${CRIU_FAULT:-130}"
exec "$d/usr/lib64/ld-linux-x86-64.so.2" --library-path "$d/usr/lib/x86_64-linux-gnu:$d/lib/x86_64-linux-gnu" "$d/usr/sbin/criu" "$@"
EOF
chmod 0755 "$wrapper"
if [ ! -e "$root/usr/lib64/ld-linux-x86-64.so.2" ]; then
  mkdir -p "$root/usr/lib64"
  ln -sf "${loader#"$root"}" "$root/usr/lib64/ld-linux-x86-64.so.2"
fi

if ! check; then
  echo "install.sh: criu check failed:" >&2
  cat "$dest/check.log" >&2
  exit 1
fi
cc -shared -fPIC -O2 -Wall -o "$dest/nsjoin.so" "$here/nsjoin.c"
mkdir -p "$dest/plugins"
"$wrapper" --version | head -1 >&2
echo "$suite $(sha256sum <"$here/nsjoin.c")" >"$stamp"
echo "$wrapper"
