#!/usr/bin/env python3
"""The agent engine's memory as an Apple Network Extension would see it (issue 15, item 7).

iOS kills a Network Extension above about 50 MiB. This measures the resident memory of the C
host (apple/tests/c_host/host.c: the Apple host's job on Linux, through the same C ABI and the
same static library the extension links) with one connector and N open TCP flows through it:

  1. `sluice lab up --prefix bem-`, the lab's own agent stopped;
  2. the C host started in the agent namespace in host-driven mode over a real TUN device,
     with the lab agent's config (DNS at a sentinel address) and credentials;
  3. its VmRSS once the tunnel is up (one request through it), then `bench/probe.py
     idle-client` opens N connections from the agent namespace to `probe.py idle-server` in
     the service namespace and holds them, and VmRSS and VmHWM are read again.

Run as root from the repository, after `cargo build --release --locked --workspace`:

  bench/engine_memory.py              # 1,000 flows
  bench/engine_memory.py --flows 5000

It prints one table and the target (under 20 MiB with 1,000 flows), and writes the figures as
JSON to bench/results/engine_memory.json. The process holds the C host and libc too; the
engine is most of it.
"""

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RELEASE = REPO / "target" / "release"
SLUICE = RELEASE / "sluice"
LIB = RELEASE / "libsluice_apple.a"
PROBE = REPO / "bench" / "probe.py"
PREFIX = "bem-"
LAB = Path("/run/sluice-lab") / PREFIX
SVC = "198.51.100.10"
IDLE_PORT = 9002
DNS_SENTINEL = "100.96.0.53"
TARGET_MIB = 20.0
# What `rustc --print native-static-libs` says the static library needs on Linux.
NATIVE_LIBS = ["-lstdc++", "-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"]


def log(msg):
    print(f"engine_memory: {msg}", file=sys.stderr, flush=True)


def run(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


def ns(short, *args):
    return ["ip", "netns", "exec", PREFIX + short, *args]


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def build_host(out_dir):
    if not LIB.is_file() or not SLUICE.is_file():
        raise SystemExit(f"engine_memory: {LIB} or {SLUICE} missing: "
                         "cargo build --release --locked --workspace")
    exe = out_dir / "host"
    run("cc", "-std=c99", "-O2", "-I", str(REPO / "apple" / "include"),
        str(REPO / "apple" / "tests" / "c_host" / "host.c"), str(LIB), *NATIVE_LIBS,
        "-o", str(exe))
    return exe


def line_reader(p):
    """A queue of the child's stdout lines, read by a thread (select on a buffered pipe would
    miss lines already in Python's buffer)."""
    q = queue.Queue()

    def pump():
        for line in p.stdout:
            q.put(line.strip())
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def read_line(lines, timeout, want):
    """Lines until one starts with `want` (None after `timeout` s or at the end)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return None
        if line is None:
            return None
        if line.startswith(want):
            return line


def measure(flows):
    out_dir = Path(run("mktemp", "-d", "/tmp/sluice-engine-memory.XXXXXX").stdout.strip())
    exe = build_host(out_dir)
    run(str(SLUICE), "lab", "down", "--prefix", PREFIX, check=False)
    up = run(str(SLUICE), "lab", "up", "--prefix", PREFIX, check=False)
    if up.returncode != 0:
        raise SystemExit(f"engine_memory: lab up failed:\n{up.stdout}{up.stderr}")
    host = server = client = None
    try:
        pid = int((LAB / "agent.pid").read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        text = (LAB / "agent.yaml").read_text()
        cfg = out_dir / "agent.yaml"
        cfg.write_text(f"{text}dns:\n  address: {DNS_SENTINEL}\n  upstream: [192.0.2.53:53]\n")
        files = [str(cfg), str(LAB / "policy.yaml"), str(LAB / "lab-agent.pem"),
                 str(LAB / "lab-agent.key"), str(LAB / "ca" / "ca.pem")]
        host = subprocess.Popen(ns("agent", str(exe), "tun", *files), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=open(out_dir / "host.log", "w"),
                                text=True)
        log("C host started; waiting for its settings")
        if not read_line(line_reader(host), 15, "ready"):
            raise SystemExit(f"engine_memory: the C host did not start (log {out_dir}/host.log)")
        # One request brings the tunnel up.
        page = None
        for _ in range(50):
            r = run(*ns("agent", "curl", "-sS", "--max-time", "2", f"http://{SVC}/"), check=False)
            if r.returncode == 0:
                page = r.stdout
                break
            time.sleep(0.2)
        if page is None:
            raise SystemExit("engine_memory: no page through the C host")
        time.sleep(1.0)
        base = status_kib(host.pid, "VmRSS")
        log(f"tunnel up, RSS {base / 1024:.1f} MiB; opening {flows} flows")
        server = subprocess.Popen(ns("svc", sys.executable, str(PROBE), "idle-server", SVC,
                                     str(IDLE_PORT)), stdout=subprocess.PIPE, text=True)
        if (server.stdout.readline() or "").strip() != "listening":
            raise SystemExit("engine_memory: idle-connection server did not start")
        client = subprocess.Popen(ns("agent", sys.executable, str(PROBE), "idle-client", SVC,
                                     str(IDLE_PORT), str(flows)),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = client.stdout.readline()
        if not line:
            raise SystemExit("engine_memory: idle-client did not report")
        opened = json.loads(line)
        log(f"{opened.get('opened')} flows open")
        time.sleep(1.0)
        idle = status_kib(host.pid, "VmRSS")
        hwm = status_kib(host.pid, "VmHWM")
        return {
            "flows_requested": flows,
            "flows_opened": opened.get("opened"),
            "open_s": opened.get("seconds"),
            "rss_tunnel_up_mib": round(base / 1024, 2),
            "rss_with_flows_mib": round(idle / 1024, 2),
            "peak_rss_mib": round(hwm / 1024, 2),
            "target_mib": TARGET_MIB,
        }
    finally:
        for p in (client, server):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        if host and host.poll() is None:
            try:
                host.stdin.write("stop\n")
                host.stdin.flush()
                host.wait(10)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                host.kill()
                host.wait()
        run(str(SLUICE), "lab", "down", "--prefix", PREFIX, check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=1000, help="open TCP flows (default 1000)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"),
                    help="results directory (default bench/results/)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("engine_memory: run as root (it creates network namespaces)")
    r = measure(a.flows)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "engine_memory.json").write_text(json.dumps(r, indent=2) + "\n")
    print(f"| flows open | RSS, tunnel up | RSS with flows | peak RSS | target |")
    print(f"|---|---|---|---|---|")
    print(f"| {r['flows_opened']} of {r['flows_requested']} | {r['rss_tunnel_up_mib']} MiB | "
          f"{r['rss_with_flows_mib']} MiB | {r['peak_rss_mib']} MiB | < {TARGET_MIB:g} MiB |")
    met = r["peak_rss_mib"] < TARGET_MIB and r["flows_opened"] == r["flows_requested"]
    print(f"target (peak RSS under {TARGET_MIB:g} MiB with {a.flows} flows): "
          f"{'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
