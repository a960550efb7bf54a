#!/usr/bin/env bash
# Runs the README's two commands (scripts/demo.sh, then scripts/test.sh) as a new user would: in
# a bare Debian 12 (`debootstrap --variant=minbase bookworm`) with only a Rust toolchain added,
# so that whatever setup.sh forgets to install shows up (the machines here have it all already).
# Prints one line per command: how it ended, how long it took, and its log's tail on failure.
#
#   scripts/fresh-check.sh [--dir DIR] [--keep] [--only demo|test|build] [--setup-only] [--mirror URL]
#
#   --dir DIR      the root to build (default: a new /var/tmp/sluice-fresh.XXXXXX); a root kept
#                  by an earlier --keep run is reused as it is (then it is no longer fresh)
#   --keep         keep the root afterwards (it is removed by default, also on failure or Ctrl-C)
#   --only CMD     run one command: demo (scripts/demo.sh), test (scripts/test.sh), or build
#                  (scripts/setup.sh: the install step and the release build, no lab)
#   --setup-only   run only `scripts/setup.sh --no-build` (the install step: a quick check)
#   --mirror URL   the Debian mirror (default: the one apt's sources on this machine name)
#
# Logs go to DIR.logs/ and are kept. Needs root, debootstrap (installed if missing), and a
# rustup toolchain (${RUSTUP_HOME:-~/.rustup}, ${CARGO_HOME:-~/.cargo}/bin), which is mounted
# read-only into the root; cargo's own home (registry, downloads) inside the root starts empty.
# The root has the host's network (cargo and apt download through it) but its own /run: the
# labs' namespaces (/run/netns) and state (/run/sluice-lab) inside it do not meet the host's,
# so labs with the same prefix on the host are not disturbed. The host's own CA certificates
# (a TLS-intercepting proxy's) are added to the root's once setup.sh installs ca-certificates.
# A full run builds everything twice (release binary, then the tests): on 2 cores it takes the
# best part of an hour. CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

usage() { sed -n '7,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
root="" keep=0 only="" mirror=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) root=${2:?--dir needs a directory}; shift 2 ;;
    --keep) keep=1; shift ;;
    --only) only=${2:?--only needs demo, test or build}; shift 2 ;;
    --setup-only) only=setup; shift ;;
    --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "fresh-check: unknown argument $1" >&2; usage ;;
  esac
done
case "$only" in
  "") cmds=(demo test) ;;
  demo|test|build|setup) cmds=("$only") ;;
  *) echo "fresh-check: --only takes demo, test or build, not $only" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "fresh-check: needs root (debootstrap, mounts, chroot)" >&2; exit 1; }

say() { echo "fresh-check: $*"; }
die() { echo "fresh-check: $*" >&2; exit 1; }
dur() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# --- The host's Rust toolchain (rustup's proxies in CARGO_HOME/bin, toolchains in RUSTUP_HOME).
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
[ -x "$cargo_bin/cargo" ] && [ -d "$rustup_home/toolchains" ] \
  || die "needs a rustup toolchain: no $cargo_bin/cargo or $rustup_home/toolchains (https://rustup.rs)"

# --- The Debian mirror apt uses here: the first `deb` source for bookworm (one-line or deb822).
find_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # deb [options] URI SUITE COMPONENTS...
    awk '$1 == "deb" { i = 2
           if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
           if ($(i + 1) == "bookworm") print $i }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # Stanzas separated by blank lines; fields "Key: value"; comment lines start with #.
    awk 'BEGIN { RS = ""; FS = "\n" }
         { types = ""; uris = ""; suites = ""; enabled = "yes"
           for (j = 1; j <= NF; j++) {
             if ($j ~ /^#/ || $j !~ /:/) continue
             k = $j; sub(/:.*/, "", k); k = tolower(k)
             v = $j; sub(/^[^:]*:[ \t]*/, "", v)
             if (k == "types") types = v; else if (k == "uris") uris = v
             else if (k == "suites") suites = v; else if (k == "enabled") enabled = tolower(v)
           }
           if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ / bookworm /) {
             split(uris, u, " "); print u[1]
           } }' "$f"
  done
}
if [ -z "$mirror" ]; then
  mirror=$(find_mirror | grep -E '^(https?|ftp|file)://' | head -n 1 || true)
  [ -n "$mirror" ] || die "no bookworm source in /etc/apt/sources.list{,.d/*}: pass --mirror URL"
fi

# --- The root and its logs.
if [ -z "$root" ]; then
  root=$(mktemp -d /var/tmp/sluice-fresh.XXXXXX)
fi
mkdir -p "$root"
chmod 755 "$root"   # mktemp's 0700 would keep apt's _apt and dnsmasq's nobody out of /
root=$(realpath "$root")
[[ "$root" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "--dir $root: use a path of letters, digits and ._-/"
[ "$root" != / ] || die "--dir /: no"
logs="$root.logs"
mkdir -p "$logs"
marker="$root/.sluice-fresh-check"   # only a root with this file is ever removed
reuse=0
if [ -f "$marker" ] && [ -f "$root/etc/debian_version" ]; then
  reuse=1
elif [ -n "$(ls -A "$root")" ]; then
  die "$root is not empty and is no root of an earlier fresh-check: give another --dir"
fi

# --- Cleanup, whatever happens: the root's processes, its mounts, then (unless --keep) the root.
mounts_under() {
  # Deepest first: a prefix sorts before its extensions, so reverse order puts them first.
  awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}
procs_in_root() {
  # By the root directory's device and inode, not its name: the lab's processes run in mount
  # namespaces of their own (`ip netns exec`), where the root's path may read differently.
  # A process whose root cannot be read (pid 1 here) is no match, nor ever pid 1 or this shell.
  local p id r
  id=$(stat -c %d:%i "$root" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = 1 ] || [ "${p#/proc/}" = $$ ] && continue
    r=$(stat -L -c %d:%i "$p/root" 2>/dev/null) || continue
    [ "$r" = "$id" ] && echo "${p#/proc/}"
  done
  return 0
}
cleanup() {
  local rc=$? pids m i
  set +e
  trap - EXIT INT TERM
  case "$rc" in 130|143) echo; say "interrupted: cleaning up (logs so far in $logs)" ;; esac
  # Whatever the commands left running in the root (a lab's daemons after a Ctrl-C) holds its
  # mounts: these are only processes whose root is this root, so only ones started here.
  pids=$(procs_in_root)
  if [ -n "$pids" ]; then
    say "stopping what still runs in the root: $(echo $pids)"
    kill -TERM $pids 2>/dev/null
    for i in $(seq 20); do [ -z "$(procs_in_root)" ] && break; sleep 0.1; done
    pids=$(procs_in_root); [ -n "$pids" ] && kill -KILL $pids 2>/dev/null && sleep 0.2
  fi
  for i in $(seq 50); do
    m=$(mounts_under | head -n 1)
    [ -z "$m" ] && break
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  if [ -n "$(mounts_under)" ]; then
    echo "fresh-check: mounts left under $root (not removing it):" >&2; mounts_under >&2
  elif [ "$keep" = 1 ]; then
    say "root kept in $root (scripts/fresh-check.sh --dir $root reuses it)"
  elif [ -f "$marker" ] || [ -z "$(ls -A "$root" 2>/dev/null)" ]; then
    rm -rf --one-file-system "$root"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t_all=$SECONDS
rev=$(git describe --always --dirty 2>/dev/null || echo "unknown revision")
say "checking $repo ($rev) in $root; logs in $logs"

# --- 1. The root: Debian 12 minbase.
if [ "$reuse" = 1 ]; then
  say "reusing the root in $root (kept by an earlier run: not fresh)"
else
  if ! type -P debootstrap >/dev/null; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  fi
  t=$SECONDS
  say "debootstrap --variant=minbase bookworm from $mirror (a few minutes)"
  if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$logs/debootstrap.log" 2>&1; then
    say "debootstrap: FAILED after $(dur $((SECONDS - t))); last lines of $logs/debootstrap.log:"
    tail -n 20 "$logs/debootstrap.log" | sed 's/^/  /'
    exit 1
  fi
  touch "$marker"
  say "debootstrap: ok after $(dur $((SECONDS - t)))"
  # No daemon starts inside (openssh-server's postinst would start sshd on the host's network).
  printf '#!/bin/sh\n# fresh-check: no service starts in this root\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
fi
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# The host's own CA certificates (not Debian's: a TLS proxy's, a company's) go where
# update-ca-certificates finds them, so that the root trusts what the host trusts once setup.sh
# has installed ca-certificates, and not before (that install is part of what is checked).
# Debian's own are symlinks in /etc/ssl/certs; regular files there were added locally.
mkdir -p "$root/usr/local/share/ca-certificates"
while IFS= read -r f; do
  if type -P openssl >/dev/null \
     && ! openssl x509 -in "$f" -noout -ext basicConstraints 2>/dev/null | grep -q 'CA:TRUE'; then
    continue   # a server's certificate (ssl-cert's snakeoil), no CA
  fi
  b=${f##*/}
  cp "$f" "$root/usr/local/share/ca-certificates/host-${b%.*}.crt"
done < <({ find /usr/local/share/ca-certificates -type f -name '*.crt' 2>/dev/null
           find /etc/ssl/certs -maxdepth 1 -type f -name '*.pem'; } | sort -u)
# The same certificate may be in both places: count the files.
n=$(find "$root/usr/local/share/ca-certificates" -maxdepth 1 -name 'host-*.crt' | wc -l)
if [ "$n" -gt 0 ]; then
  say "$n CA certificate(s) of this host's own, trusted in the root once ca-certificates is in"
  # A reused root has ca-certificates already.
  [ -x "$root/usr/sbin/update-ca-certificates" ] && chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
[ -s "$root/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"

# --- 2. The checkout: the working tree as git sees it (tracked and untracked files, changes
# included, nothing ignored: no target/).
rm -rf "$root/root/sluice"
mkdir -p "$root/root/sluice"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do { [ -e "$f" ] || [ -L "$f" ]; } && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$root/root/sluice"

# --- 3. Mounts.
# The root is a mount point of its own: `ip netns exec` runs `mount --make-rslave /`, which
# fails where / is not one.
mount --bind "$root" "$root"
mount --make-private "$root"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
# A /run of its own: `ip netns add` keeps its namespaces in /run/netns, the lab its state in
# /run/sluice-lab; a private tmpfs keeps the root's labs apart from the host's.
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
mkdir -p "$root/opt/rustup" "$root/opt/cargo/bin"
for pair in "$rustup_home:$root/opt/rustup" "$cargo_bin:$root/opt/cargo/bin"; do
  mount --bind "${pair%%:*}" "${pair#*:}"
  mount -o remount,bind,ro "${pair#*:}"
done

# --- 4. The commands, each in the root with a clean environment.
in_root() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
    PATH=/opt/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo RUSTUP_AUTO_INSTALL=0 \
    /bin/bash -c "cd /root/sluice && $1"
}
failed=0
results=()
for c in "${cmds[@]}"; do
  case "$c" in
    demo) cmd=scripts/demo.sh ;;
    test) cmd=scripts/test.sh ;;
    build) cmd=scripts/setup.sh ;;
    setup) cmd="scripts/setup.sh --no-build" ;;
  esac
  log="$logs/$c.log"
  say "running $cmd (log $log)"
  t=$SECONDS
  set +e
  in_root "$cmd" </dev/null >"$log" 2>&1
  rc=$?
  set -e
  line="$cmd: $([ "$rc" = 0 ] && echo passed || echo FAILED) (exit $rc) after $(dur $((SECONDS - t))); log $log"
  results+=("$line")
  if [ "$rc" != 0 ]; then
    failed=1
    results+=("$(tail -n 30 "$log" | sed 's/^/    /')")
  fi
done

echo
say "summary ($rev, Debian $(cat "$root/etc/debian_version") minbase, $(dur $((SECONDS - t_all))) in all):"
for r in "${results[@]}"; do
  case "$r" in "    "*) echo "$r" ;; *) echo "fresh-check: $r" ;; esac
done
exit "$failed"
