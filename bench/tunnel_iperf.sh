#!/usr/bin/env bash
# Throughput through the Sluice tunnel (relayed path) next to the raw veth path of the same lab,
# in the same run: iperf3 TCP, 1 and 4 streams, each direction. Prints a table with the ratio.
#   bench/tunnel_iperf.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
bin=target/release/sluice
[ -x "$bin" ] || scripts/setup.sh
p=bench-
trap '$bin lab down --prefix $p >/dev/null 2>&1 || true' EXIT
$bin lab up --prefix $p >/dev/null

ip netns exec ${p}relay iperf3 -s -D -B 192.0.2.1 >/dev/null
ip netns exec ${p}svc iperf3 -s -D -B 198.51.100.10 >/dev/null
sleep 0.5

gbps() { # namespace server streams reverse -> Gbit/s received
  local out
  out=$(ip netns exec "$1" iperf3 -c "$2" -P "$3" $4 -t "$secs" -J)
  python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' <<<"$out"
}

printf "%-28s %12s %12s %8s\n" "test (${secs}s each)" "veth Gbit/s" "sluice Gbit/s" "ratio"
for streams in 1 4; do
  for dir in "" "-R"; do
    raw=$(gbps ${p}agent 192.0.2.1 $streams "$dir")
    tun=$(gbps ${p}agent 198.51.100.10 $streams "$dir")
    name="tcp ${streams} stream(s) $([ -z "$dir" ] && echo upload || echo download)"
    printf "%-28s %12s %12s %8s\n" "$name" "$raw" "$tun" "$(python3 -c "print('%.3f' % ($tun/$raw))")"
  done
done
echo "machine: $(nproc) cores, $(uname -r); sluice over the relay (agent -> relay -> connector -> service)"
