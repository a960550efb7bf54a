#!/usr/bin/env bash
# Builds the Sluice OCI image from a root file system made here (no registry, no base image):
# the binary, the shared libraries `ldd` names, /etc/passwd and /etc/group with the `sluice`
# user (uid and gid 10001). See deploy/oci/Containerfile.
#
#   deploy/oci/build.sh [BINARY]      (default target/release/sluice)
#
# Tags localhost/sluice:VERSION (VERSION from `BINARY --version`) and localhost/sluice:latest
# in the local containers storage (`podman images`), and prints the first on standard output;
# buildah's messages go to standard error. Needs buildah (scripts/setup.sh installs it).
# `podman save localhost/sluice:VERSION | ssh HOST podman load` moves the image; `podman push`
# sends it to a registry.
#
# The image is reproducible: the same binary gives the same image id (layer timestamps are
# SOURCE_DATE_EPOCH, else the binary's modification time).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../../target/release/sluice}
[ -x "$bin" ] || { echo "build.sh: $bin: no such executable (cargo build --release --locked --bin sluice)" >&2; exit 1; }
type -P buildah >/dev/null || { echo "build.sh: buildah is missing (apt-get install buildah; scripts/setup.sh does it)" >&2; exit 1; }

# "sluice 0.1.0" -> 0.1.0
version=$("$bin" --version | awk '{print $2}')
[ -n "$version" ] || { echo "build.sh: $bin --version printed no version" >&2; exit 1; }
image=localhost/sluice:$version

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/bin" "$root/etc/sluice" "$root/run" "$ctx/run-sluice"
# Debug information is most of a release binary (54 of its 66 MB at 0.1.0); the symbols stay,
# so backtraces still name functions.
if type -P strip >/dev/null; then
  strip --strip-debug -o "$root/usr/bin/sluice" "$bin"
else
  cp "$bin" "$root/usr/bin/sluice"
fi
chmod 0755 "$root/usr/bin/sluice"

# Each library at the path ldd found it (the loader's own path, /lib64/ld-linux-x86-64.so.2, is
# written into the binary; the others are where glibc's loader looks without an ld.so.cache).
# -L: the file itself, not Debian's version symlink.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
[ -n "$libs" ] || { echo "build.sh: ldd found no libraries in $bin (a static binary needs none: remove this check)" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# The user the image runs as; root only so that tools reading /etc/passwd find uid 0.
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/usr/sbin/nologin
sluice:x:10001:10001:Sluice zero-trust network access:/nonexistent:/usr/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
sluice:x:10001:
EOF
# A relay given by name is resolved by glibc: /etc/hosts first, then DNS (the files the
# runtime mounts at /etc/hosts and /etc/resolv.conf).
cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd: files
group:  files
hosts:  files dns
EOF
cp "$here/Containerfile" "$ctx/Containerfile"

# The image :latest named so far; removed below once nothing names it (no pile of untagged
# images from rebuilds; one a container uses, or another tag names, stays).
previous=$(buildah images --quiet --no-trunc localhost/sluice:latest 2>/dev/null || true)
epoch=${SOURCE_DATE_EPOCH:-$(stat -c %Y "$bin")}
buildah build --quiet --format oci --timestamp "$epoch" \
  --label org.opencontainers.image.title=sluice \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.description="Sluice zero-trust network access (relay, connector)" \
  -t "$image" -t localhost/sluice:latest -f "$ctx/Containerfile" "$ctx" >&2
if [ -n "$previous" ] && [ "$previous" != "$(buildah images --quiet --no-trunc "$image")" ]; then
  buildah rmi "$previous" >/dev/null 2>&1 || true
fi
echo "$image"
