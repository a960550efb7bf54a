#!/usr/bin/env python3
"""One agent floods, another transfers: the relay's per-peer limits at work (issue 17, part 2).

In a lab with two agents on the relayed path (`sluice lab up --second-agent --relay-only`):

1. agent 2 alone: a TCP upload to the service (iperf3), its solo rate;
2. agent 1 floods: UDP through its tunnel as fast as iperf3 can send (`-u -b 0`), and while
   it does, agent 2 repeats the upload;
3. both again with the relay's `limits.peer_bytes` set to the flooder's share (--peer-mbit).

Each phase prints both rates; the figure is agent 2's rate during the flood as a fraction of
its solo rate in the same run (the issue's bar: 0.7 or more), and whether the flooder's tunnel
is still up afterwards (a page through it). The machines are shared and small: read the
ratios, not the absolute rates.

    bench/flood.py [--secs 8] [--peer-mbit 200] [--sluice target/release/sluice] [--json OUT]

Needs root, iperf3 and curl (scripts/setup.sh installs them) and a release build.
"""

import argparse
import json
import os
import subprocess
import sys
import time

PREFIX = "fl-"
SVC = "198.51.100.10"


def run(args, check=True, timeout=120):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        sys.exit(f"flood: {' '.join(args)} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def nsx(short, *args):
    return ["ip", "netns", "exec", PREFIX + short, *args]


def iperf_tcp(short, port, secs):
    p = run(nsx(short, "iperf3", "-c", SVC, "-p", str(port), "-t", str(secs), "-J"),
            check=False, timeout=secs + 30)
    try:
        end = json.loads(p.stdout)["end"]
        return end["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return 0.0


def flood(port, secs):
    """Agent 1 sends UDP as fast as iperf3 can, for `secs`."""
    return subprocess.Popen(
        nsx("agent", "iperf3", "-c", SVC, "-p", str(port), "-u", "-b", "0", "-l", "1200",
            "-t", str(secs), "-J"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def flood_rate(p):
    out, _ = p.communicate(timeout=120)
    try:
        end = json.loads(out)["end"]
        return end["sum"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        return 0.0


def page_ok(short):
    return run(nsx(short, "curl", "-s", "-o", "/dev/null", "--max-time", "5", f"http://{SVC}/"),
               check=False).returncode == 0


def relay_metric(name):
    p = run(nsx("relay", "curl", "-s", "--max-time", "2", "http://127.0.0.1:9464/metrics"),
            check=False)
    for line in p.stdout.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def restart_relay(sluice, lab_dir, peer_bytes):
    cfg = os.path.join(lab_dir, "relay.yaml")
    text = open(cfg).read().split("# flood.py:")[0]
    if peer_bytes:
        text += f"# flood.py:\nlimits:\n  peer_bytes: {{ per_second: {peer_bytes} }}\n"
    open(cfg, "w").write(text)
    pid = int(open(os.path.join(lab_dir, "relay.pid")).read())
    os.kill(pid, 15)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.05)
    log = open(os.path.join(lab_dir, "relay.log"), "a")
    p = subprocess.Popen(nsx("relay", sluice, "relay", "--config", cfg), stdout=log, stderr=log,
                         stdin=subprocess.DEVNULL)
    open(os.path.join(lab_dir, "relay.pid"), "w").write(str(p.pid))
    # Both agents and the connector reconnect, and a page goes through each tunnel.
    for _ in range(100):
        if page_ok("agent") and page_ok("agent2"):
            return
        time.sleep(0.2)
    sys.exit("flood: the tunnels did not come back after the relay restart")


def phase(name, secs):
    solo = iperf_tcp("agent2", 5201, secs)
    limited0 = relay_metric("sluice_relay_rate_limited_packets_total")
    f = flood(5202, secs + 4)
    time.sleep(2)
    during = iperf_tcp("agent2", 5201, secs)
    flooded = flood_rate(f)
    limited = relay_metric("sluice_relay_rate_limited_packets_total") - limited0
    up = page_ok("agent")
    r = {
        "phase": name,
        "agent2_solo_mbit": round(solo, 1),
        "agent2_during_flood_mbit": round(during, 1),
        "ratio": round(during / solo, 2) if solo else None,
        "flooder_sent_mbit": round(flooded, 1),
        "relay_rate_limited_packets": int(limited),
        "flooder_tunnel_up_after": up,
    }
    print(f"{name:>28}: agent 2 solo {solo:7.1f} Mbit/s, during the flood {during:7.1f} Mbit/s "
          f"(ratio {r['ratio']}); flooder sent {flooded:7.1f} Mbit/s, relay dropped "
          f"{int(limited)} of its packets; flooder's tunnel up after: {up}")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--secs", type=int, default=8)
    ap.add_argument("--peer-mbit", type=int, default=200,
                    help="the relay's limits.peer_bytes in the limited phase, in Mbit/s")
    ap.add_argument("--sluice", default="target/release/sluice")
    ap.add_argument("--json")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("flood: needs root (network namespaces)")
    sluice = os.path.abspath(a.sluice)
    run([sluice, "lab", "up", "--prefix", PREFIX, "--second-agent", "--relay-only"], timeout=180)
    lab_dir = f"/run/sluice-lab/{PREFIX}"
    try:
        for port in (5201, 5202):
            run(nsx("svc", "iperf3", "-s", "-D", "-p", str(port)))
        time.sleep(0.5)
        results = [phase("no per-peer limit", a.secs)]
        restart_relay(sluice, lab_dir, a.peer_mbit * 1_000_000 // 8)
        results.append(phase(f"peer_bytes {a.peer_mbit} Mbit/s", a.secs))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           "secs": a.secs, "results": results}, f, indent=2)
    finally:
        run([sluice, "lab", "down", "--prefix", PREFIX], check=False)


if __name__ == "__main__":
    main()
