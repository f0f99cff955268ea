#!/usr/bin/env bash
# Assembles a container root filesystem from Debian packages of the machine's own suite (bookworm),
# without Docker, a registry or any system-wide install: a private apt configuration (the machine's
# sources copied as they are, a private state and cache, and an EMPTY dpkg status so that apt treats
# nothing as installed and fetches the whole dependency closure), then `dpkg -x` of every .deb into
# the rootfs, plus what a container needs that maintainer scripts would have made (/tmp 1777, users,
# /bin/sh, ld.so cache, alternatives the apps call).
#
# Downloaded .debs are cached in $STASIS_CACHE/debs/<suite>/ (apt fetches only what changed); the
# caller (hack/testimages) caches the packed image by the hash of this folder.
#
# Usage: hack/testimages/debian/rootfs.sh DEST PKG...   (DEST must not exist or be a rootfs of ours)
set -euo pipefail

dest=${1:?usage: rootfs.sh DEST PKG...}
shift
[ $# -gt 0 ] || { echo "rootfs.sh: no packages given" >&2; exit 1; }
cache=${STASIS_CACHE:-$HOME/.cache/stasis}
src=/etc/apt/sources.list.d/debian.sources
[ -r "$src" ] || { echo "rootfs.sh: $src not found: cannot derive the Debian sources" >&2; exit 1; }
suite=$(awk '/^Suites:/ {print $2; exit}' "$src")
[ -n "$suite" ] || { echo "rootfs.sh: no Suites: line in $src" >&2; exit 1; }

apt=$cache/debs/$suite
mkdir -p "$apt/etc/sources.list.d" "$apt/lists/partial" "$apt/archives/partial" "$apt/state"
exec 9>"$apt/.lock"
flock 9
# The machine's own sources (URIs, suites, keyring) as they are: nothing newer than the host's suite.
grep -v '^#' "$src" >"$apt/etc/sources.list.d/debian.sources"
: >"$apt/etc/sources.list"
# Empty on purpose: with nothing "installed", apt resolves the full closure of the packages.
: >"$apt/state/status"

aptopts=(
  -o Dir::Etc::sourcelist="$apt/etc/sources.list"
  -o Dir::Etc::sourceparts="$apt/etc/sources.list.d"
  -o Dir::Etc::preferencesparts="$apt/etc/preferences.d"
  -o Dir::State="$apt/state"
  -o Dir::State::status="$apt/state/status"
  -o Dir::State::Lists="$apt/lists"
  -o Dir::Cache::Archives="$apt/archives"
  -o Dir::Cache::pkgcache="" -o Dir::Cache::srcpkgcache=""
  -o APT::Get::List-Cleanup=0
  -o APT::Install-Recommends=0
  -o Debug::NoLocking=1
  -o APT::Sandbox::User=root
)
mkdir -p "$apt/etc/preferences.d"
# Package lists younger than a day are reused: a second build needs no network at all.
if [ -z "$(find "$apt/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  echo "rootfs.sh: apt-get update ($suite, private lists)" >&2
  apt-get "${aptopts[@]}" update -qq >&2
fi
echo "rootfs.sh: resolving and downloading the closure of: $*" >&2
apt-get "${aptopts[@]}" install -y -qq --download-only "$@" >&2
# The exact set apt chose (the archive cache may hold other versions too): its simulation prints
# "Inst NAME (VERSION RELEASE [ARCH])"; the archive file is NAME_VERSION_ARCH.deb, ':' as %3a.
mapfile -t debs < <(apt-get "${aptopts[@]}" install -s "$@" 2>/dev/null |
  awk '/^Inst / {v=$3; sub(/^\(/, "", v); gsub(/:/, "%3a", v); match($0, /\[[a-z0-9]+\]/);
    a=substr($0, RSTART+1, RLENGTH-2); print $2 "_" v "_" a ".deb"}')
[ ${#debs[@]} -gt 0 ] || { echo "rootfs.sh: apt resolved no package" >&2; exit 1; }

rm -rf "$dest"
mkdir -p "$dest"
for d in "${debs[@]}"; do
  f=$apt/archives/$d
  [ -f "$f" ] || { echo "rootfs.sh: $f missing after download" >&2; exit 1; }
  dpkg -x "$f" "$dest"
done
printf '%s\n' "${debs[@]}" >"$dest/.debs"
echo "rootfs.sh: unpacked ${#debs[@]} packages ($(du -sm "$dest" | cut -f1) MiB)" >&2

# Left out to keep the image small (≈ 250 MiB less): documentation, and what none of the apps runs
# (the JDK's jmods for jlink; LLVM and z3, used only by PostgreSQL's optional JIT, which is then off).
rm -rf "$dest"/usr/share/{doc,man,info,locale} "$dest"/usr/lib/jvm/*/jmods \
  "$dest"/usr/lib/x86_64-linux-gnu/libLLVM* "$dest"/usr/lib/x86_64-linux-gnu/libz3* "$dest"/usr/lib/postgresql/*/lib/llvmjit*

# What maintainer scripts would have done, as far as the apps need it.
chmod 1777 "$dest/tmp" 2>/dev/null || install -d -m 1777 "$dest/tmp"
install -d -m 1777 "$dest/var/tmp"
install -d -m 0755 "$dest/proc" "$dest/sys" "$dest/dev" "$dest/run" "$dest/var/run/postgresql"
[ -e "$dest/bin/sh" ] || ln -sfn "$(test -e "$dest/bin/dash" && echo dash || echo bash)" "$dest/bin/sh"
for jdk in "$dest"/usr/lib/jvm/java-*-openjdk-*; do
  [ -d "$jdk" ] || continue
  for b in java javac jcmd; do
    [ -e "$jdk/bin/$b" ] && ln -sf "${jdk#"$dest"}/bin/$b" "$dest/usr/bin/$b"
  done
done
# Debian's alternatives (made by postinst scripts) that users call by their generic name.
[ -e "$dest/usr/bin/awk" ] || { [ -e "$dest/usr/bin/gawk" ] && ln -s gawk "$dest/usr/bin/awk"; }
cat >"$dest/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/bash
redis:x:998:998:redis:/var/lib/redis:/usr/sbin/nologin
app:x:1000:1000:app:/home/app:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
P
cat >"$dest/etc/group" <<'G'
root:x:0:
daemon:x:1:
postgres:x:999:
redis:x:998:
app:x:1000:
nogroup:x:65534:
G
install -d -m 0700 -o 999 -g 999 "$dest/var/lib/postgresql"
install -d -m 0755 -o 1000 -g 1000 "$dest/home/app"
chown 999:999 "$dest/var/run/postgresql"
chmod 2775 "$dest/var/run/postgresql"
echo "127.0.0.1 localhost" >"$dest/etc/hosts"
# The rootfs' own ldconfig, pointed at the rootfs (a chroot into it).
ldconfig=$dest/sbin/ldconfig
[ -x "$ldconfig" ] || ldconfig=$dest/usr/sbin/ldconfig
[ -x "$ldconfig" ] && "$ldconfig" -r "$dest"
echo "$dest"
