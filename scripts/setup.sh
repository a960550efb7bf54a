#!/usr/bin/env bash
# Installs what Sluice needs on a Debian 12 machine (as root) and builds it in release mode
# (`--no-build`: installs only). Enough on a bare Debian 12 (`debootstrap --variant=minbase`
# plus a Rust toolchain): scripts/fresh-check.sh checks that.
# Safe to run again: it installs only what is missing and cargo rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# A program on PATH (type -P: `kill` is also a bash builtin, the tests run the program).
have() { type -P "$1" >/dev/null; }
need() { [[ " ${need_pkgs[*]} " == *" $1 "* ]] || need_pkgs+=("$1"); }
# command -> Debian package. The build: cc and c++ (BoringSSL, built by boring-sys with cmake
# and make, is C and C++; ring and the linker need cc), git (boring-sys applies its patches to
# BoringSSL with `git apply`). The lab and the tests: the rest (sysctl and kill are procps';
# valgrind runs the Apple library's C test host; systemd-analyze verifies and rates the
# systemd units, debootstrap makes the bare Debian the .deb is installed into, and
# dpkg-shlibdeps computes the .deb's dependencies, in linux/tests/{systemd_units,deb_package}.rs;
# promtool checks the metrics. promtool comes only with the Prometheus server's package: where
# systemd runs, its postinst starts prometheus.service on port 9090, which
# `systemctl disable --now prometheus` stops for good). The container image and pod
# (deploy/oci/build.sh, linux/tests/container_lab.rs): buildah builds the image, podman plays the
# pod with runc (crun fails here on setrlimit and hybrid cgroups), nsenter puts it in the lab's
# namespace, and the pod's demo app is busybox's httpd (the static build: the image has no libc).
# The fault lab (linux/tests/fault_lab.rs, bench/fault_matrix.py): nftables drops and delays
# packets (these kernels have no netem), conntrack flushes the NAT routers' mappings, tcpdump
# captures what the relay sees. Relays sharing a registry (linux/tests/relays_lab.rs): etcd and
# etcdctl; protoc compiles the etcd client's gRPC definitions (etcd-client's build script).
tools=(cc:gcc c++:g++ make:make cmake:cmake git:git
       ip:iproute2 iptables:iptables iperf3:iperf3 curl:curl dig:dnsutils
       dnsmasq:dnsmasq-base nft:nftables python3:python3 ping:iputils-ping
       pgrep:procps sysctl:procps kill:procps sha256sum:coreutils
       sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client
       valgrind:valgrind systemd-analyze:systemd debootstrap:debootstrap
       dpkg-shlibdeps:dpkg-dev promtool:prometheus
       podman:podman buildah:buildah runc:runc nsenter:util-linux busybox:busybox-static
       tc:iproute2 conntrack:conntrack tcpdump:tcpdump
       etcd:etcd-server etcdctl:etcd-client protoc:protobuf-compiler base64:coreutils)
for pair in "${tools[@]}"; do
  have "${pair%%:*}" || need "${pair#*:}"
done
# bindgen (used by BoringSSL's -sys crate) needs libclang itself; libclang-cpp (which other
# packages pull in and whose name is alike) does not do.
compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null \
  || compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null \
  || need libclang-dev
# cargo downloads crates over HTTPS and checks the server against the system's CA list.
[ -s /etc/ssl/certs/ca-certificates.crt ] || need ca-certificates
# kubernetes-validate (below) goes into a virtual environment: Debian's python3 makes one only
# with python3-venv (its ensurepip).
have kubernetes-validate || python3 -c 'import ensurepip' 2>/dev/null || need python3-venv
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# apt-get can end with status 0 without having installed everything (interrupted by Ctrl-C).
missing=()
for pair in "${tools[@]}"; do have "${pair%%:*}" || missing+=("${pair%%:*}"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: still missing after apt-get install: ${missing[*]}" >&2
  exit 1
fi

# kubernetes-validate validates deploy/kubernetes against the Kubernetes schemas it bundles
# (offline; linux/tests/container_lab.rs). It is on PyPI only. In a virtual environment of its
# own: Debian's python3 refuses `pip install` into the system's packages (PEP 668).
if ! have kubernetes-validate; then
  echo "setup: installing kubernetes-validate (python3 -m pip, into /opt/sluice-tools/kubernetes-validate)"
  python3 -m venv /opt/sluice-tools/kubernetes-validate
  /opt/sluice-tools/kubernetes-validate/bin/python3 -m pip install --quiet kubernetes-validate==1.37.0
  ln -sf /opt/sluice-tools/kubernetes-validate/bin/kubernetes-validate /usr/local/bin/kubernetes-validate
fi

if ! have cargo; then
  echo "setup: Rust is missing: install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
  exit 1
fi

# cargo-deb builds the Debian package (linux/Cargo.toml's [package.metadata.deb]); the package
# test runs it, so it is installed with --no-build too. --locked: the versions its release was
# tested with. It compiles in a minute or two, once.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "setup: installing cargo-deb (cargo install cargo-deb --locked)"
  cargo install cargo-deb --locked
fi

# scripts/test.sh passes --no-build: `cargo test` builds the binary itself, with the features the
# test dependencies add to shared crates (a build here would be a second, unused one).
[ "${1:-}" = --no-build ] && exit 0

echo "setup: building sluice (release; the first build compiles BoringSSL and takes several minutes)"
cargo build --release --locked --bin sluice
