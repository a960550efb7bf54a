#!/usr/bin/env bash
# Regenerates the fuzz seeds, fuzz/corpus/TARGET/seed-*: from the fixtures, and from real
# traffic of a lab (docs/lab.md) of its own, prefix `sfz-`, captured with tcpdump in the lab's
# namespaces only: the agent's TUN device and loopback (its DNS), the relay's and the
# connector's internet interface. Then the lab is taken down. Needs root and the release
# binary (cargo build --release --locked --bin sluice).
#
#   fuzz/capture-lab.sh [--keep DIR]    (DIR: where to leave the pcap files)
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=sfz-
keep=""
[ "${1:-}" = --keep ] && keep="$2"
sluice=target/release/sluice
[ -x "$sluice" ] || { echo "capture: build $sluice first" >&2; exit 1; }
command -v tcpdump >/dev/null || { apt-get update -qq && apt-get install -y -qq tcpdump >/dev/null; }

pcaps=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  "$sluice" lab down --prefix "$prefix" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$sluice" lab up --prefix "$prefix" >/dev/null
in_ns() { ip netns exec "$prefix$1" "${@:2}"; }
capture() {
  # -U: each packet is written at once, so nothing is lost when tcpdump is stopped.
  in_ns "$1" tcpdump -U -n -s 0 -i "$2" -w "$pcaps/$3" "${@:4}" 2>/dev/null &
  pids+=($!)
}
capture agent sluice0 agent-tun.pcap
capture agent lo agent-lo.pcap udp port 53
capture relay eth0 relay.pcap udp port 4433
capture conn eth0 conn.pcap udp
sleep 1

# What an app does through the tunnel: pages by address (v4, v6) and by name, DNS of
# resource and other names, pings, UDP to the private resolver, a refused port.
in_ns agent curl -s -o /dev/null --max-time 5 http://198.51.100.10/ || true
in_ns agent curl -s -o /dev/null --max-time 5 'http://[fd00:5c1c:5c::10]/' || true
in_ns agent curl -s -o /dev/null --max-time 5 http://wiki.corp.internal/ || true
for t in A AAAA MX TXT HTTPS; do
  in_ns agent dig +time=2 +tries=1 @100.96.0.1 wiki.corp.internal "$t" >/dev/null || true
done
in_ns agent dig +time=2 +tries=1 +bufsize=512 @100.96.0.1 app.dev.corp.internal A >/dev/null || true
in_ns agent dig +time=2 +tries=1 @100.96.0.1 www.example.test A >/dev/null || true
in_ns agent dig +time=2 +tries=1 @198.51.100.10 wiki.corp.internal A >/dev/null || true
in_ns agent dig +tcp +time=2 +tries=1 @198.51.100.10 wiki.corp.internal AAAA >/dev/null || true
in_ns agent ping -c 3 -i 0.2 -W 2 198.51.100.10 >/dev/null || true
in_ns agent ping -6 -c 3 -i 0.2 -W 2 fd00:5c1c:5c::10 >/dev/null || true
in_ns agent curl -s -o /dev/null --max-time 3 http://198.51.100.10:9/ || true
sleep 2

cleanup
pids=()
trap - EXIT
ls -l "$pcaps"
cargo run --profile bench --locked -p sluice-fuzz-targets --example seeds -- --pcap "$pcaps"
if [ -n "$keep" ]; then
  mkdir -p "$keep" && mv "$pcaps"/*.pcap "$keep"/ && rmdir "$pcaps"
else
  rm -rf "$pcaps"
fi
