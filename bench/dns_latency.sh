#!/usr/bin/env bash
# DNS answer latency in the lab, in one run: a resource name answered by the agent from its
# synthetic pool, a public name the agent forwards upstream, and the same public name asked of
# the upstream directly. Prints median and 99th percentile per case and the ratios.
#   bench/dns_latency.sh [queries per case, default 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
bin=target/release/sluice
[ -x "$bin" ] || scripts/setup.sh
p=bdns-
trap '$bin lab down --prefix $p >/dev/null 2>&1 || true' EXIT
$bin lab up --prefix $p >/dev/null

ip netns exec ${p}agent python3 - "$n" <<'PY'
import random, socket, struct, sys, time

n = int(sys.argv[1])

def query(name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", 1, 1)

def run(server, name):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((server, 53))
    times = []
    for i in range(n):
        qid = random.randrange(65536)
        t0 = time.perf_counter()
        s.send(query(name, qid))
        while True:
            r = s.recv(4096)
            if struct.unpack(">H", r[:2])[0] == qid:
                break
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]

cases = [
    ("resource name, answered by the agent", "100.96.0.1", "wiki.corp.internal"),
    ("public name, forwarded by the agent", "100.96.0.1", "www.example.test"),
    ("public name, upstream asked directly", "192.0.2.53", "www.example.test"),
]
results = [(label, *run(server, name)) for label, server, name in cases]
base = results[2][1]
print(f"{'case (' + str(n) + ' queries each)':<42} {'median us':>10} {'p99 us':>9} {'ratio':>7}")
for label, med, p99 in results:
    print(f"{label:<42} {med:>10.0f} {p99:>9.0f} {med / base:>7.2f}")
print("ratio: median against asking the upstream directly, measured in the same run")
PY
