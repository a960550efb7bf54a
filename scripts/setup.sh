#!/usr/bin/env bash
# Installs what Sluice needs on a Debian 12 machine (as root) and builds it in release mode
# (`--no-build`: installs only).
# Safe to run again: it installs only what is missing and cargo rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
# command -> Debian package
for pair in cmake:cmake ip:iproute2 iptables:iptables iperf3:iperf3 curl:curl dig:dnsutils \
            dnsmasq:dnsmasq-base nft:nftables python3:python3 ping:iputils-ping pgrep:procps sha256sum:coreutils \
            sshd:openssh-server ssh:openssh-client; do
  have "${pair%%:*}" || need_pkgs+=("${pair#*:}")
done
# bindgen (used by BoringSSL's -sys crate) needs libclang itself; libclang-cpp (which other
# packages pull in and whose name is alike) does not do.
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null \
  || compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null \
  || need_pkgs+=(libclang-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! have cargo; then
  echo "setup: Rust is missing: install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
  exit 1
fi

# scripts/test.sh passes --no-build: `cargo test` builds the binary itself, with the features the
# test dependencies add to shared crates (a build here would be a second, unused one).
[ "${1:-}" = --no-build ] && exit 0

echo "setup: building sluice (release; the first build compiles BoringSSL and takes several minutes)"
cargo build --release --locked --bin sluice
