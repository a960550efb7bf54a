#!/usr/bin/env bash
# What one ping costs each tunnel process: CPU time, syscalls and context switches per ping
# (perf stat on the running processes while pings go through), and the ping RTT.
#
#   bench/ping_cost.sh sluice PREFIX [COUNT] [INTERVAL]   a running lab (`sluice lab up --prefix PREFIX`)
#   bench/ping_cost.sh boringtun [COUNT] [INTERVAL]       a boringtun pair it builds and removes
#
# COUNT pings (default 500) at INTERVAL seconds (default 0.02, as bench/compare.py pings). The
# boringtun pair lives in namespaces pc-bt-s and pc-bt-r (192.0.2.1/2 on a veth, tunnel
# 10.77.9.1/2, MTU 1420), removed on exit. Needs perf, and for boringtun wg and boringtun-cli.
set -euo pipefail

die() { echo "ping_cost: $*" >&2; exit 2; }
command -v perf >/dev/null || die "perf not found (apt-get install linux-perf)"

STATS=$(mktemp -d)
PERF_PIDS=()
BT_PIDS=()
cleanup() {
    for p in "${PERF_PIDS[@]}" "${BT_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [[ ${MODE:-} == boringtun ]]; then
        ip netns del pc-bt-s 2>/dev/null || true
        ip netns del pc-bt-r 2>/dev/null || true
        rm -f /var/run/wireguard/pcbt-s.sock /var/run/wireguard/pcbt-r.sock
    fi
    rm -rf "$STATS"
}
trap cleanup EXIT

# measure NS TARGET COUNT INTERVAL NAME=PID...
measure() {
    local ns=$1 target=$2 count=$3 interval=$4
    shift 4
    PERF_PIDS=()
    for np in "$@"; do
        perf stat -e task-clock,raw_syscalls:sys_enter,context-switches -p "${np#*=}" \
            -o "$STATS/${np%%=*}" &
        PERF_PIDS+=($!)
    done
    sleep 0.3
    ip netns exec "$ns" ping -n -q -c "$count" -i "$interval" "$target" | tail -1
    kill -INT "${PERF_PIDS[@]}"
    wait "${PERF_PIDS[@]}" 2>/dev/null || true
    PERF_PIDS=()
    for np in "$@"; do
        python3 - "$STATS/${np%%=*}" "${np%%=*}" "$count" <<'PY'
import re, sys
path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = open(path).read()
def num(pattern):
    return float(re.search(pattern, t).group(1).replace(",", ""))
cpu = num(r"([\d,.]+) msec task-clock")
sc = num(r"([\d,]+)\s+raw_syscalls:sys_enter")
cs = num(r"([\d,]+)\s+context-switches")
print(f"{name:<22} cpu {cpu * 1000 / n:6.1f} us/ping  {sc / n:5.1f} syscalls/ping  "
      f"{cs / n:4.1f} context switches/ping")
PY
    done
}

MODE=${1:-}
case $MODE in
sluice)
    prefix=${2:?"usage: $0 sluice PREFIX [COUNT] [INTERVAL]"}
    count=${3:-500} interval=${4:-0.02}
    dir=/run/sluice-lab/$prefix
    [[ -f $dir/agent.pid && -f $dir/connector.pid ]] || die "no lab $prefix (sluice lab up --prefix $prefix)"
    procs=(agent="$(cat "$dir/agent.pid")" connector="$(cat "$dir/connector.pid")")
    [[ -f $dir/relay.pid ]] && procs+=(relay="$(cat "$dir/relay.pid")")
    ip netns exec "${prefix}agent" ping -n -q -c 5 -i 0.2 198.51.100.10 >/dev/null ||
        die "no ping through lab $prefix"
    measure "${prefix}agent" 198.51.100.10 "$count" "$interval" "${procs[@]}"
    ;;
boringtun)
    count=${2:-500} interval=${3:-0.02}
    bt=$(command -v boringtun-cli || echo "$HOME/.cargo/bin/boringtun-cli")
    [[ -x $bt ]] || die "boringtun-cli not found (cargo install boringtun-cli --locked)"
    command -v wg >/dev/null || die "wg not found (apt-get install wireguard-tools)"
    for ns in pc-bt-s pc-bt-r; do
        ip netns del "$ns" 2>/dev/null || true
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip link add pc-bt-s netns pc-bt-s type veth peer name pc-bt-r netns pc-bt-r
    ip -n pc-bt-s addr add 192.0.2.1/24 dev pc-bt-s
    ip -n pc-bt-r addr add 192.0.2.2/24 dev pc-bt-r
    ip -n pc-bt-s link set pc-bt-s up
    ip -n pc-bt-r link set pc-bt-r up
    declare -A key pub
    umask 077
    for end in s r; do
        key[$end]=$STATS/$end.key
        wg genkey >"${key[$end]}"
        pub[$end]=$(wg pubkey <"${key[$end]}")
        WG_SUDO=1 WG_LOG_LEVEL=error ip netns exec "pc-bt-$end" "$bt" --foreground \
            --disable-drop-privileges "pcbt-$end" >/dev/null 2>&1 &
        BT_PIDS+=($!)
    done
    for _ in $(seq 50); do
        [[ -S /var/run/wireguard/pcbt-s.sock && -S /var/run/wireguard/pcbt-r.sock ]] && break
        sleep 0.1
    done
    ip netns exec pc-bt-s wg set pcbt-s private-key "${key[s]}" listen-port 51820 peer "${pub[r]}" \
        allowed-ips 10.77.9.2/32 endpoint 192.0.2.2:51820
    ip netns exec pc-bt-r wg set pcbt-r private-key "${key[r]}" listen-port 51820 peer "${pub[s]}" \
        allowed-ips 10.77.9.1/32 endpoint 192.0.2.1:51820
    ip -n pc-bt-s addr add 10.77.9.1/24 dev pcbt-s
    ip -n pc-bt-r addr add 10.77.9.2/24 dev pcbt-r
    ip -n pc-bt-s link set pcbt-s mtu 1420 up
    ip -n pc-bt-r link set pcbt-r mtu 1420 up
    ip netns exec pc-bt-s ping -n -q -c 5 -i 0.2 10.77.9.2 >/dev/null || die "no ping through boringtun"
    # The daemons are the children of `ip netns exec`, which execs them: same pids.
    measure pc-bt-s 10.77.9.2 "$count" "$interval" \
        boringtun-sender="${BT_PIDS[0]}" boringtun-receiver="${BT_PIDS[1]}"
    echo "veth without a tunnel:"
    ip netns exec pc-bt-s ping -n -q -c 50 -i "$interval" 192.0.2.2 | tail -1
    ;;
*)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
