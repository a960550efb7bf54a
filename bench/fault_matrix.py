#!/usr/bin/env python3
"""The fault matrix: checksummed transfers through the Sluice lab under network faults and
process restarts, beside boringtun under the same netem settings, in one run.

    bench/fault_matrix.py [--quick] [--cells PATTERNS] [--size MIB] [--cap SECS]
                          [--sluice PATH] [--no-boringtun] [--no-install] [--out FILE]
    bench/fault_matrix.py --list        # the cells, one a line
    bench/fault_matrix.py --render bench/results/fault-matrix-STAMP.json   # the doc again

Every cell downloads one checksummed stream (bench/xfer.py) from the lab's private service
(198.51.100.10 in PREFIXsvc) to the agent's namespace through the tunnel (the *up cells upload
it the other way), and records: bytes
intact or not (SHA-256 of what arrived against the first as many bytes of what was sent),
resets (the app's error, and the kernel's TCP EstabResets counter of the agent's and the
service's namespaces), time to recover, throughput, and the paths the agent's status showed.

Cells (NAME = FAULT@PATH; --cells takes comma-separated fnmatch patterns of NAMEs):
  netem faults, on @direct (`sluice lab up`), @relay (`--relay-only`) and @boringtun (the
  boringtun pair of bench/compare.py): none, loss1, loss5, delay100, delay300, reorder, dup,
  loss1up, loss5up
  events: outage20@direct, outage20@relay, conn-restart@direct, conn-restart@relay,
  conn-crash@relay, relay-restart@relay, relay-crash@relay, relay-restart@direct,
  nat-rebind@direct, nat-rebind@relay, addr-change@direct

Writes the table to docs/fault-matrix.md (keeping what follows its notes marker) and the raw
results to bench/results/fault-matrix-<timestamp>.json. Removes everything it made on exit, on
errors and on Ctrl-C, and the leftovers of an interrupted run when it starts. Needs root.
Python 3 standard library only. See docs/fault-matrix.md.
"""

import argparse
import datetime
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (its namespaces, boringtun pair, process and cleanup helpers)
from compare import Interrupted, nsx, run  # noqa: E402

REPO = compare.REPO
XFER = REPO / "bench" / "xfer.py"
DOC = REPO / "docs" / "fault-matrix.md"
RESULTS = REPO / "bench" / "results"
NOTES_MARKER = "<!-- fault_matrix.py keeps everything below this line -->"
XFER_PORT = 9100
SVC = compare.SVC_ADDR
MIB = 1 << 20

# Lab prefixes: the plain lab (direct), a relay-only lab, and the NAT lab of the rebinding cell
# (agent behind a symmetric NAT, connector behind a full cone: direct, and every conntrack
# flush gives the agent new public ports).
LABS = {
    "direct": ("fmd-", [], "direct"),
    "relay": ("fmr-", ["--relay-only"], "relay"),
    "nat-direct": ("fmn-", ["--nat-agent", "symmetric", "--nat-connector", "full-cone"], "direct"),
    "nat-relay": ("fmnr-", ["--relay-only", "--nat-agent", "symmetric",
                            "--nat-connector", "full-cone"], "relay"),
}
BT = "boringtun"

# The network faults, each made on every direction of the path (see Env): what netem would be
# told, and how it is made here. This machine's kernel has no netem (CONFIG_NET_SCH_NETEM is
# not set and it has no modules), so loss is iptables' `statistic` match, duplication its TEE
# target, and delay, jitter and reordering an NFQUEUE that bench/nfq_delay.py releases late.
NETEM = {
    "none": None,
    "loss1": "loss 1%",
    "loss5": "loss 5%",
    "delay100": "delay 100ms 20ms",
    "delay300": "delay 300ms 60ms",
    "reorder": "delay 5ms reorder 25%",
    "dup": "duplicate 5%",
    # The same losses with the bytes going the other way (agent to service): the agent's
    # kernel TCP sends into the tunnel, the connector's smoltcp receives.
    "loss1up": "loss 1%",
    "loss5up": "loss 5%",
}
# Cells that upload (xfer.py put); all others download.
UPLOAD = {"loss1up", "loss5up"}
IMPAIR = {
    "loss1": ("loss", 0.01),
    "loss5": ("loss", 0.05),
    # Jitter that keeps the packets in order (as a real path's varying delay does): reordering
    # is a cell of its own.
    "delay100": ("delay", ["--delay-ms", 100, "--jitter-ms", 20, "--keep-order"]),
    "delay300": ("delay", ["--delay-ms", 300, "--jitter-ms", 60, "--keep-order"]),
    "reorder": ("delay", ["--reorder", 25, "--reorder-ms", 5]),
    "dup": ("dup", 0.05),
    "loss1up": ("loss", 0.01),
    "loss5up": ("loss", 0.05),
}
# MiB per transfer of the slow netem cells (the others move --size): through the connector's
# smoltcp TCP, which has no SACK and a 1 s minimum retransmission timeout, these run at a few
# Mbit/s or less (reordering: some 6), and 256 MiB would take hours. --quick divides them by 4 (at least 1 MiB).
SLOW_MIB = {"loss1": 16, "loss5": 2, "delay100": 16, "delay300": 4, "reorder": 32,
            "loss1up": 64, "loss5up": 16}
NFQ = 7  # the NFQUEUE number the delayer binds (queues are per network namespace)
NFQ_DELAY = REPO / "bench" / "nfq_delay.py"
NETEM_TEXT = {
    "none": "no fault (baseline)",
    "loss1": "1 % loss each way",
    "loss5": "5 % loss each way",
    "delay100": "100 ms ± 20 ms each way (in order)",
    "delay300": "300 ms ± 60 ms each way (in order)",
    "reorder": "reordering: 75 % of packets 5 ms late",
    "dup": "5 % duplicated each way",
    "loss1up": "1 % loss each way, upload",
    "loss5up": "5 % loss each way, upload",
}
EVENTS = {
    "outage20": "{outage:g} s outage of the whole internet segment (100 % loss)",
    "conn-restart": "connector restart (SIGTERM, started again)",
    "conn-crash": "connector crash (SIGKILL, started again)",
    "relay-restart": "relay restart (SIGTERM, started again)",
    "relay-crash": "relay crash (SIGKILL, started again 2 s later)",
    "nat-rebind": "NAT rebinding: conntrack flush in both routers",
    "addr-change": "the agent's address changes (192.0.2.10 -> 192.0.2.12)",
}
EVENT_CELLS = [
    ("outage20", "direct"), ("outage20", "relay"),
    ("conn-restart", "direct"), ("conn-restart", "relay"), ("conn-crash", "relay"),
    ("relay-restart", "relay"), ("relay-crash", "relay"), ("relay-restart", "direct"),
    ("nat-rebind", "nat-direct"), ("nat-rebind", "nat-relay"),
    ("addr-change", "direct"),
]
PATH_NAME = {"direct": "direct", "relay": "relay", "nat-direct": "direct (NAT)",
             "nat-relay": "relay (NAT)", BT: BT}


def log(msg):
    print(f"[fault-matrix +{time.monotonic() - compare.T0:6.1f}s] {msg}", file=sys.stderr,
          flush=True)


def cell_name(fault, path):
    return f"{fault}@{'direct' if path == 'nat-direct' else 'relay' if path == 'nat-relay' else path}"


def all_cells():
    cells = []
    for fault in NETEM:
        for path in ("direct", "relay", BT):
            cells.append((fault, path))
    return cells + EVENT_CELLS


# ---------------------------------------------------------------- labs and processes

class Lab:
    def __init__(self, key):
        self.key = key
        self.prefix, self.args, self.want = LABS[key]
        self.dir = Path("/run/sluice-lab") / self.prefix
        self.up = False
        self.fresh = False  # built and not yet used by an event cell

    def ns(self, short):
        return f"{self.prefix}{short}"

    def start(self):
        """`sluice lab up` (replacing what an earlier lab of the prefix left), the transfer
        server, and a check that the tunnel is on the path the lab is for."""
        p = run([compare.State.sluice, "lab", "up", "--prefix", self.prefix, *self.args],
                check=False, timeout=180)
        self.up = True
        if p.returncode != 0:
            raise RuntimeError(f"sluice lab up --prefix {self.prefix} failed:\n"
                               f"{(p.stdout + p.stderr).strip()[-2000:]}")
        # Sluice sends UDP in GSO batches (up to 64 packets in one buffer) that cross veths
        # whole: a rule dropping "1 % of packets" would drop 1 % of batches. Cut at each
        # host's link, as by a NIC without UDP segmentation offload, every packet meets the
        # fault on its own (in every cell, the baselines too, so that they compare).
        for host in ("agent", "conn", "relay"):
            run(["ip", "-n", self.ns(host), "link", "set", "dev", "eth0", "gso_max_segs", "1"])
        start_server(self.ns("svc"), SVC)
        self.wait_path(self.want, 15)
        self.fresh = True

    def down(self):
        if compare.State.sluice:
            run([compare.State.sluice, "lab", "down", "--prefix", self.prefix], check=False,
                timeout=90)
        self.up = False

    def status(self):
        p = run([compare.State.sluice, "status", "--json", "--socket",
                 str(self.dir / "agent.sock")], check=False, timeout=10)
        try:
            return json.loads(p.stdout)
        except ValueError:
            return None

    def path(self):
        st = self.status()
        if not st:
            return "no agent"
        tunnels = st.get("tunnels") or []
        if not tunnels:
            return "no tunnel"
        t = tunnels[0]
        return t.get("path") if t.get("state") == "up" else (t.get("state") or "?")

    def wait_path(self, want, secs):
        compare.wait_for(f"lab {self.prefix}: the tunnel on the {want} path",
                         lambda: self.path() == want, timeout=secs, interval=0.2)

    def pid(self, role):
        return int((self.dir / f"{role}.pid").read_text())

    def stop_role(self, role, sig):
        pid = self.pid(role)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while compare.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if compare.alive(pid):
            os.kill(pid, signal.SIGKILL)
            compare.wait_for(f"{role} to exit", lambda: not compare.alive(pid), 5)

    def start_role(self, role):
        """Starts a role again as `sluice lab up` does: its namespace, config, log (appended)
        and pid file, in a process group of its own."""
        ns = self.ns({"connector": "conn"}.get(role, role))
        logf = open(self.dir / f"{role}.log", "ab")
        p = subprocess.Popen(nsx(ns, compare.State.sluice, role, "--config",
                                 self.dir / f"{role}.yaml"),
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                             process_group=0)
        logf.close()
        (self.dir / f"{role}.pid").write_text(str(p.pid))
        compare.State.procs.append(p)
        return p

    def log_tail(self, role, n=25):
        try:
            lines = (self.dir / f"{role}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def start_server(ns, host):
    p = compare.spawn(nsx(ns, sys.executable, XFER, "serve", host, XFER_PORT),
                      stdout=subprocess.PIPE)
    if compare.read_line(p, 10) != "listening":
        raise RuntimeError(f"the transfer server in {ns} did not start")
    return p


AGENT_IP, CONN_IP, RELAY_IP = "192.0.2.10", "192.0.2.20", "192.0.2.1"


class Env:
    """Where a cell's transfer runs: the client's namespace, the server's address, where the
    faults are made, and the namespaces whose TCP counters are read.

    The faults hit the agent's link to the internet, both ways: every packet to the agent, and
    every packet from it, meets exactly one of them, on the direct and on the relayed path
    alike (the relay's link to the connector stays clean), as each direction of the boringtun
    pair does. Loss and delay are made where the packet arrives (an INPUT rule in the
    receiving namespace: queued packets hold no sender's socket buffer, and a drop there is
    silent, as on a wire), duplication where it leaves (TEE clones it to the same next hop)."""

    def __init__(self, path, lab=None, bt=None):
        self.path, self.lab = path, lab
        if lab:
            self.client_ns, self.target = lab.ns("agent"), SVC
            a, c, r = lab.ns("agent"), lab.ns("conn"), lab.ns("relay")
            self.rx = [(a, ["-i", "eth0", "-p", "udp"]),
                       (c, ["-i", "eth0", "-p", "udp", "-s", AGENT_IP]),
                       (r, ["-i", "eth0", "-p", "udp", "-s", AGENT_IP])]
            self.tx = [(a, ["-o", "eth0", "-p", "udp", "-d", CONN_IP], CONN_IP),
                       (a, ["-o", "eth0", "-p", "udp", "-d", RELAY_IP], RELAY_IP),
                       (c, ["-o", "eth0", "-p", "udp", "-d", AGENT_IP], AGENT_IP),
                       (r, ["-o", "eth0", "-p", "udp", "-d", AGENT_IP], AGENT_IP)]
            # The outage: the whole internet segment goes dark (everything that arrives on
            # the three hosts' internet links is dropped).
            self.dark = [(a, ["-i", "eth0"]), (c, ["-i", "eth0"]), (r, ["-i", "eth0"])]
            self.counter_ns = [lab.ns("agent"), lab.ns("svc")]
        else:
            s, rc = bt.sender, bt.receiver
            u = compare.UNDERLAY
            self.client_ns, self.target = s, bt.target
            self.rx = [(s, ["-i", s, "-p", "udp"]), (rc, ["-i", rc, "-p", "udp"])]
            self.tx = [(s, ["-o", s, "-p", "udp", "-d", u[1]], u[1]),
                       (rc, ["-o", rc, "-p", "udp", "-d", u[0]], u[0])]
            self.dark = [(s, ["-i", s]), (rc, ["-i", rc])]
            self.counter_ns = [s, rc]
        self.delayers = []

    def namespaces(self):
        return sorted({ns for ns, *_ in self.rx + self.tx + self.dark})


def ipt(ns, *args, check=True):
    return run(nsx(ns, "iptables", "-w", *args), check=check)


def impair(env, fault):
    """Makes `fault` (a key of IMPAIR, or "outage") on every direction of env's path."""
    clear(env)
    for ns in env.namespaces():
        ipt(ns, "-N", "SLFAULT")
        ipt(ns, "-I", "INPUT", "-j", "SLFAULT")
        ipt(ns, "-t", "mangle", "-N", "SLFAULT")
        ipt(ns, "-t", "mangle", "-I", "OUTPUT", "-j", "SLFAULT")
    if fault == "outage":
        for ns, match in env.dark:
            ipt(ns, "-A", "SLFAULT", *match, "-j", "DROP")
        return
    kind, arg = IMPAIR[fault]
    if kind == "loss":
        for ns, match in env.rx:
            ipt(ns, "-A", "SLFAULT", *match, "-m", "statistic", "--mode", "random",
                "--probability", arg, "-j", "DROP")
    elif kind == "dup":
        for ns, match, gw in env.tx:
            ipt(ns, "-t", "mangle", "-A", "SLFAULT", *match, "-m", "statistic", "--mode",
                "random", "--probability", arg, "-j", "TEE", "--gateway", gw)
    elif kind == "delay":
        for ns in sorted({ns for ns, _ in env.rx}):
            p = compare.spawn(nsx(ns, sys.executable, NFQ_DELAY, "--queue", NFQ, *arg),
                              stdout=subprocess.PIPE)
            if compare.read_line(p, 10) != "ready":
                raise RuntimeError(f"the delayer in {ns} did not start")
            env.delayers.append(p)
        for ns, match in env.rx:
            ipt(ns, "-A", "SLFAULT", *match, "-j", "NFQUEUE", "--queue-num", NFQ,
                "--queue-bypass")


def clear(env):
    """Removes every fault from env's path (safe to call any time)."""
    for ns in env.namespaces():
        if not compare.ns_exists(ns):
            continue
        ipt(ns, "-D", "INPUT", "-j", "SLFAULT", check=False)
        ipt(ns, "-F", "SLFAULT", check=False)
        ipt(ns, "-X", "SLFAULT", check=False)
        ipt(ns, "-t", "mangle", "-D", "OUTPUT", "-j", "SLFAULT", check=False)
        ipt(ns, "-t", "mangle", "-F", "SLFAULT", check=False)
        ipt(ns, "-t", "mangle", "-X", "SLFAULT", check=False)
    for p in env.delayers:
        compare.stop(p)  # it lets what it still holds go first
    env.delayers = []


def estab_resets(namespaces):
    out = []
    for ns in namespaces:
        lines = [l.split() for l in run(nsx(ns, "cat", "/proc/net/snmp")).stdout.splitlines()
                 if l.startswith("Tcp:")]
        out.append(int(dict(zip(lines[0][1:], lines[1][1:])).get("EstabResets", 0)))
    return out


class Transfer(threading.Thread):
    """One `xfer.py get` in the client's namespace; `bytes` follows its progress lines."""

    def __init__(self, env, length, seed, rate=0, max_secs=0, timeout=60, connect_timeout=5,
                 mode="get"):
        super().__init__(daemon=True)
        args = [sys.executable, XFER, mode, env.target, XFER_PORT, length, seed,
                "--progress", 0.1, "--timeout", timeout, "--connect-timeout", connect_timeout]
        if rate:
            args += ["--rate", rate]
        if max_secs:
            args += ["--max-secs", max_secs]
        self.p = subprocess.Popen(nsx(env.client_ns, *args), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        compare.State.procs.append(self.p)
        self.bytes = 0
        self.result = None
        self.other = []
        self.start()

    def run(self):
        for line in self.p.stdout:
            line = line.decode(errors="replace").strip()
            if line.startswith("progress "):
                self.bytes = int(line.split()[2])
            elif line.startswith("{"):
                self.result = json.loads(line)
            elif line:
                self.other.append(line)
        self.p.wait()

    def hurry(self):
        try:
            self.p.stdin.write(b"hurry\n")
            self.p.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    def finish(self, timeout):
        self.join(timeout)
        if self.is_alive():
            compare.stop(self.p)
            self.join(5)
            return {"error": f"no end within {timeout:g} s (killed by the harness)",
                    "bytes": self.bytes, "intact": None, "complete": False, "reset": False,
                    "gaps": [], "mbps": None, "mbps_unpaced": None}
        if self.result is None:
            return {"error": "the client printed no result: " + " | ".join(self.other[-3:]),
                    "bytes": self.bytes, "intact": None, "complete": False, "reset": False,
                    "gaps": [], "mbps": None, "mbps_unpaced": None}
        return self.result

    def wait_bytes(self, more, secs):
        """Waits until `more` bytes beyond the count now have arrived; whether they did."""
        start, deadline = self.bytes, time.monotonic() + secs
        while time.monotonic() < deadline:
            if self.bytes >= start + more:
                return True
            if not self.is_alive():
                return self.bytes >= start + more
            time.sleep(0.05)
        return False


class PathWatch(threading.Thread):
    """Samples the agent's path twice a second: the sequence of distinct paths seen."""

    def __init__(self, lab):
        super().__init__(daemon=True)
        self.lab, self.seen, self.stopped = lab, [], threading.Event()
        if lab:
            self.start()

    def run(self):
        while not self.stopped.is_set():
            p = self.lab.path()
            if not self.seen or self.seen[-1] != p:
                self.seen.append(p)
            self.stopped.wait(0.5)

    def stop(self):
        self.stopped.set()
        if self.lab:
            self.join(15)
        return "→".join(self.seen) if self.seen else "-"


def quick_get(env, length, seed, timeout):
    """A short download run to its end: its result."""
    t = Transfer(env, length, seed, timeout=timeout, connect_timeout=1)
    return t.finish(timeout + 10)


# ---------------------------------------------------------------- cells

def recovery(res, t_fault, t_end_fault):
    """Seconds from the fault's end until bytes flowed again after the last stall (a gap of at
    least 0.2 s with no byte) that began between the fault and 10 s after its end; 0 when the
    transfer never stalled; and the length of that stall."""
    gaps = [g for g in res.get("gaps") or [] if t_fault - 0.5 <= g[0] <= t_end_fault + 10
            or g[0] <= t_fault <= g[1]]
    if not gaps:
        return 0.0, 0.0
    last = max(gaps, key=lambda g: g[1])
    return max(0.0, last[1] - t_end_fault), max(g[1] - g[0] for g in gaps)


def base_result(name, fault, path, text):
    return {"cell": name, "fault": fault, "path": path, "path_name": PATH_NAME[path],
            "fault_text": text, "tunnel": BT if path == BT else "sluice"}


def fill_transfer(r, res, length):
    r.update({
        "intact": res.get("intact"), "complete": res.get("complete"),
        "bytes": res.get("bytes", 0), "len": length, "error": res.get("error"),
        "reset_app": bool(res.get("reset")),
        "mbps": res.get("mbps"), "mbps_unpaced": res.get("mbps_unpaced"),
        "max_gap_s": res.get("max_gap_s"),
    })


def cell_size(cfg, fault, path=None):
    """Bytes of a netem cell's transfer. boringtun, much faster under these faults, moves 8
    times as much in the slow cells: a transfer of a few MiB over kernel TCP is over before
    it leaves slow start, and one early loss decides its rate."""
    if fault in SLOW_MIB:
        mib = SLOW_MIB[fault] if not cfg.quick else max(1, SLOW_MIB[fault] // 4)
        if path == BT:
            mib *= 8
        return min(cfg.size, mib * MIB)
    return cfg.size


def netem_cell(cfg, env, fault, seed):
    name = cell_name(fault, env.path)
    r = base_result(name, fault, env.path, NETEM_TEXT[fault])
    r["netem"] = NETEM[fault]
    before = estab_resets(env.counter_ns)
    if fault != "none":
        impair(env, fault)
    watch = PathWatch(env.lab)
    try:
        size = cell_size(cfg, fault, env.path)
        t = Transfer(env, size, seed, max_secs=cfg.cap, timeout=60,
                     mode="put" if fault in UPLOAD else "get")
        res = t.finish(cfg.cap + 90)
    finally:
        r["paths_seen"] = watch.stop()
        clear(env)
    fill_transfer(r, res, size)
    after = estab_resets(env.counter_ns)
    r["estab_resets"] = [a - b for a, b in zip(after, before)]
    r["throughput_mbps"] = r["mbps"]
    r["recovery_s"] = None
    r["ok"] = bool(r["intact"]) and not r["error"] and not r["reset_app"] \
        and not any(r["estab_resets"])
    return r


def event_cell(cfg, env, fault, seed):
    lab = env.lab
    name = cell_name(fault, env.path)
    text = EVENTS[fault].format(outage=cfg.outage)
    r = base_result(name, fault, env.path, text)
    before = estab_resets(env.counter_ns)
    watch = PathWatch(lab)
    extra = {}
    try:
        t = Transfer(env, cfg.size, seed, rate=cfg.pace, timeout=60)
        if not t.wait_bytes(2 * MIB, 15):
            raise RuntimeError(f"{name}: the paced transfer did not start: {t.finish(1)}")
        time.sleep(cfg.lead)
        t_fault = time.monotonic()
        if fault == "outage20":
            impair(env, "outage")
            time.sleep(cfg.outage)
            clear(env)
        elif fault in ("conn-restart", "conn-crash", "relay-restart", "relay-crash"):
            role = "connector" if fault.startswith("conn") else "relay"
            sig = signal.SIGTERM if fault.endswith("restart") else signal.SIGKILL
            lab.stop_role(role, sig)
            if fault == "relay-crash":
                time.sleep(2)
            lab.start_role(role)
        elif fault == "nat-rebind":
            for router in ("nat-agent", "nat-conn"):
                run(nsx(lab.ns(router), "conntrack", "-F"), check=False)
        elif fault == "addr-change":
            run(["ip", "-n", lab.ns("agent"), "addr", "del", "192.0.2.10/24", "dev", "eth0"])
            run(["ip", "-n", lab.ns("agent"), "addr", "add", "192.0.2.12/24", "dev", "eth0"])
        t_end_fault = time.monotonic()
        extra["fault_secs"] = round(t_end_fault - t_fault, 3)
        if fault.startswith("conn-"):
            # The app's flow dies with the connector: it must see a reset, and a new
            # connection must work within 5 s of the restart.
            new_ok = None
            attempts = 0
            while time.monotonic() - t_end_fault < 30:
                attempts += 1
                q = quick_get(env, MIB, seed + 1000 + attempts, timeout=2)
                if q.get("intact") and q.get("complete"):
                    new_ok = time.monotonic() - t_end_fault
                    break
                time.sleep(0.05)
            extra["new_connection_s"] = new_ok
            extra["new_connection_attempts"] = attempts
            t.hurry()
            res = t.finish(90)
            first = res
            extra["first_flow"] = {k: first.get(k) for k in ("bytes", "intact", "error", "reset")}
            reset_at = first.get("t_end")
            extra["reset_after_s"] = (round(reset_at - t_fault, 3)
                                      if first.get("reset") and reset_at else None)
            # Then the full transfer on a new connection.
            t2 = Transfer(env, cfg.size, seed + 500, max_secs=cfg.cap, timeout=60)
            res2 = t2.finish(cfg.cap + 90)
            fill_transfer(r, res2, cfg.size)
            r["intact"] = bool(res2.get("intact")) and first.get("intact") is not False
            r["reset_app"] = bool(first.get("reset"))
            r["throughput_mbps"] = res2.get("mbps")
            r["recovery_s"] = new_ok
            r["stall_s"] = None
        else:
            recovered = t.wait_bytes(2 * MIB, 60)
            extra["recovered_within_60s"] = recovered
            time.sleep(1)
            t.hurry()
            res = t.finish(cfg.cap + 120)
            fill_transfer(r, res, cfg.size)
            rec, stall = recovery(res, t_fault, t_end_fault)
            r["recovery_s"], r["stall_s"] = rec, stall
            r["throughput_mbps"] = res.get("mbps_unpaced")
    finally:
        r["paths_seen"] = watch.stop()
        clear(env)
    after = estab_resets(env.counter_ns)
    r["estab_resets"] = [a - b for a, b in zip(after, before)]
    r.update(extra)
    if fault.startswith("conn-"):
        nc = r.get("new_connection_s")
        r["ok"] = (r["reset_app"] and nc is not None and nc <= 5.0 and bool(r["intact"])
                   and not r["error"])
    else:
        r["ok"] = (bool(r["intact"]) and bool(r["complete"]) and not r["error"]
                   and not r["reset_app"] and not any(r["estab_resets"]))
    if not r["ok"]:
        r["logs"] = {role: lab.log_tail(role) for role in ("agent", "connector", "relay")}
    return r


# ---------------------------------------------------------------- the run

def parse_args(argv):
    ap = argparse.ArgumentParser(description="Sluice's fault matrix in the lab "
                                             "(see docs/fault-matrix.md)")
    ap.add_argument("--quick", action="store_true",
                    help="32 MiB per cell, netem cells capped at 8 s, an 8 s outage")
    ap.add_argument("--cells", help="comma-separated fnmatch patterns of cell names "
                                    "(FAULT@PATH, e.g. 'loss*@*,nat-rebind@direct')")
    ap.add_argument("--size", type=int, help="MiB per transfer (default 256; --quick 32)")
    ap.add_argument("--cap", type=float,
                    help="seconds after which a transfer stops early, what arrived still "
                         "checked (default 180; --quick 30)")
    ap.add_argument("--pace", type=float, default=4.0,
                    help="MiB/s of the paced transfers of event cells until they recovered "
                         "(default 4)")
    ap.add_argument("--sluice", default=str(REPO / "target" / "release" / "sluice"),
                    help="the sluice binary (default target/release/sluice; copied first)")
    ap.add_argument("--no-boringtun", action="store_true", help="no boringtun rows")
    ap.add_argument("--no-install", action="store_true",
                    help="do not install missing tools (see bench/compare.py)")
    ap.add_argument("--out", default=str(DOC), help="the Markdown table (docs/fault-matrix.md)")
    ap.add_argument("--list", action="store_true", help="list the cells and exit")
    ap.add_argument("--render", metavar="JSON",
                    help="only write --out again from a run's bench/results/*.json")
    a = ap.parse_args(argv)
    a.size = (a.size or (32 if a.quick else 256)) * MIB
    a.cap = a.cap or (30.0 if a.quick else 180.0)
    a.outage = 8.0 if a.quick else 20.0
    a.pace = a.pace * MIB
    a.lead = 3.0
    return a


def selected(cfg):
    cells = all_cells()
    if cfg.no_boringtun:
        cells = [c for c in cells if c[1] != BT]
    if cfg.cells:
        pats = [p.strip() for p in cfg.cells.split(",") if p.strip()]
        cells = [c for c in cells if any(fnmatch.fnmatch(cell_name(*c), p) for p in pats)]
        if not cells:
            raise SystemExit(f"fault_matrix.py: no cell matches {cfg.cells!r} (see --list)")
    return cells


def cleanup_all(quiet=False):
    compare.cleanup(quiet=True)
    binary = compare.State.sluice or compare.State.lab_sluice
    if binary and Path(binary).exists():
        for prefix, _, _ in LABS.values():
            run([binary, "lab", "down", "--prefix", prefix], check=False, timeout=90)
    for d in Path(tempfile.gettempdir()).glob("sluice-fault-matrix.*"):
        shutil.rmtree(d, ignore_errors=True)
    if not quiet:
        log("cleaned up")


def matrix(cfg):
    if os.geteuid() != 0:
        raise SystemExit("fault_matrix.py: run as root (it creates network namespaces)")
    src = Path(cfg.sluice)
    if not src.is_file() or not os.access(src, os.X_OK):
        raise SystemExit(f"fault_matrix.py: no sluice binary at {src}: build it with "
                         "cargo build --release --locked --workspace, or pass --sluice PATH")
    cells = selected(cfg)
    compare.State.lab_sluice = str(src)
    cleanup_all(quiet=True)  # what an interrupted run left
    # scripts/setup.sh installs them all.
    for tool, pkg in (("iptables", "iptables"), ("conntrack", "conntrack"), ("ip", "iproute2")):
        if not shutil.which(tool):
            raise SystemExit(f"fault_matrix.py: {tool} is missing (apt-get install -y {pkg})")
    tools = compare.ensure_tools(not cfg.no_install)
    compare.State.tmp = tempfile.mkdtemp(prefix="sluice-fault-matrix.")
    compare.State.sluice = str(Path(compare.State.tmp) / "sluice")
    shutil.copy2(src, compare.State.sluice)
    watch = compare.BuildWatch()
    watch.start()
    started = datetime.datetime.now().astimezone()
    machine = compare.machine_info(tools, src)
    log(f"sluice {src} (sha256 {machine['sluice_sha256']}), commit {machine['git_head']}"
        f"{' + uncommitted changes' if machine['git_dirty'] else ''}; {len(cells)} cells, "
        f"{cfg.size // MIB} MiB each (slow cells less), netem cells capped at {cfg.cap:g} s")
    labs = {}
    envs = {}
    results = []
    seed = 1

    def env_for(path):
        if path in envs:
            return envs[path]
        if path == BT:
            row = compare.Row(BT)
            compare.setup_wireguard(row, tools)
            if row.skipped:
                raise RuntimeError(row.skipped)
            start_server(row.receiver, row.target)
            envs[path] = Env(BT, bt=row)
        else:
            lab = labs.setdefault(path, Lab(path))
            lab.start()
            envs[path] = Env(path, lab=lab)
        return envs[path]

    for fault, path in cells:
        name = cell_name(fault, path)
        seed += 1
        log(f"{name}: {NETEM_TEXT.get(fault) or EVENTS[fault].format(outage=cfg.outage)} "
            f"on {PATH_NAME[path]}")
        try:
            if fault in NETEM:
                env = env_for(path)
                if env.lab and env.lab.path() != env.lab.want:
                    log(f"  lab {env.lab.prefix} is on {env.lab.path()}: building it again")
                    env.lab.start()
                r = netem_cell(cfg, env, fault, seed)
                if env.lab:
                    env.lab.fresh = False
            else:
                env = env_for(path)
                # Every event cell starts on a lab of its own: the last one changed this one.
                if not env.lab.fresh:
                    env.lab.start()
                env.lab.fresh = False
                r = event_cell(cfg, env, fault, seed)
        except RuntimeError as e:
            r = base_result(name, fault, path, NETEM_TEXT.get(fault) or EVENTS[fault])
            r.update({"ok": False, "error": str(e), "intact": None})
            log(f"  failed: {e}")
        results.append(r)
        log("  " + summary_line(r))
        if r.get("error") or not r.get("ok"):
            for role, text in (r.get("logs") or {}).items():
                log(f"  --- {role}.log (last lines) ---\n{text}")
    watch.stopped.set()
    ended = datetime.datetime.now().astimezone()
    run_info = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((ended - started).total_seconds(), 1),
        "command": " ".join(["bench/fault_matrix.py"] + sys.argv[1:]),
        "mode": "quick" if cfg.quick else "full",
        "size_mib": cfg.size // MIB, "cap_s": cfg.cap, "outage_s": cfg.outage,
        "slow_mib": {f: cell_size(cfg, f) // MIB for f in SLOW_MIB},
        "slow_mib_boringtun": {f: cell_size(cfg, f, BT) // MIB for f in SLOW_MIB},
        "pace_mib_s": cfg.pace / MIB,
        **watch.summary(),
        "machine": machine,
    }
    add_ratios(results)
    return results, run_info, started


def add_ratios(results):
    base = {r["path"]: r.get("throughput_mbps") for r in results
            if r["fault"] == "none" and r.get("ok")}
    bt = {r["fault"]: r.get("throughput_mbps") for r in results if r["path"] == BT}
    for r in results:
        b = base.get(r["path"])
        if r["fault"] in NETEM and b and r.get("throughput_mbps"):
            r["retained"] = r["throughput_mbps"] / b
        t = bt.get(r["fault"])
        if r["fault"] in NETEM and r["path"] != BT and t and r.get("throughput_mbps"):
            r["x_boringtun"] = r["throughput_mbps"] / t


def fmt(v, unit="", digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def num(v, unit=""):
    """A rate or a ratio with as many digits as it needs: 933, 5.7, 0.27, 0.004."""
    if v is None:
        return "-"
    a = abs(v)
    digits = 0 if a >= 10 else 1 if a >= 1 else 2 if a >= 0.1 else 3 if a >= 0.01 else 4
    return f"{v:.{digits}f}{unit}"


def summary_line(r):
    if r.get("intact") is None and r.get("error"):
        return f"ERROR: {r['error'][:300]}"
    moved = r.get("bytes", 0) / MIB
    parts = [f"intact={r.get('intact')}", f"moved {moved:.1f} MiB",
             f"app reset={r.get('reset_app')}", f"EstabResets={r.get('estab_resets')}",
             f"{fmt(r.get('throughput_mbps'), ' Mbit/s')}",
             f"recovery {fmt(r.get('recovery_s'), ' s', 2)}", f"paths {r.get('paths_seen')}",
             "ok" if r.get("ok") else "FAILED"]
    if r.get("error"):
        parts.append(f"error: {r['error'][:200]}")
    return ", ".join(parts)


def resets_text(r):
    er = r.get("estab_resets") or []
    app = "1 (app)" if r.get("reset_app") else "0"
    if er and any(er):
        return f"{app}; EstabResets {er[0]}/{er[1]}"
    return app


def table(results):
    head = ("| cell | path | fault | intact | moved | resets | recovery | throughput | "
            "× no fault | paths seen | ok |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["tunnel"] != "sluice":
            continue
        if r.get("intact") is None and r.get("error"):
            lines.append(f"| {r['cell']} | {r['path_name']} | {r['fault_text']} | error: "
                         f"{md(r['error'])[:200]} | | | | | | | no |")
            continue
        moved = f"{num(r.get('bytes', 0) / MIB)} MiB"
        if not r.get("complete"):
            moved += f" (then {md(short_error(r['error']))})" if r.get("error") else " (capped)"
        rec = "-"
        if r["fault"] in EVENTS and not r["fault"].startswith("conn-") and r.get("error"):
            rec = f"none: no byte in the {r.get('stall_s') or 0:.0f} s until the app gave up"
        elif r.get("recovery_s") is not None:
            rec = f"{r['recovery_s']:.2f} s"
            if r["fault"].startswith("conn-"):
                rec = f"new connection after {r['recovery_s']:.2f} s"
            elif r.get("stall_s"):
                rec += f" (stall {r['stall_s']:.1f} s)"
        elif r["fault"].startswith("conn-"):
            rec = "no new connection within 30 s"
        tput = num(r.get("throughput_mbps"), " Mbit/s")
        if r["fault"] in EVENTS and not r["fault"].startswith("conn-") and tput != "-":
            tput += " after"
        if r["fault"].startswith("conn-"):
            first = r.get("first_flow") or {}
            how = ("reset" if first.get("reset") else
                   md(short_error(first.get("error"))) if first.get("error") else "no error")
            after = r.get("reset_after_s")
            rec += f"; old flow: {how}" + (f" {after:.2f} s after the stop" if after else "")
        lines.append(
            f"| {r['cell']} | {r['path_name']} | {r['fault_text']} | "
            f"{'yes' if r.get('intact') else 'NO'} | {moved} | {resets_text(r)} | {rec} | "
            f"{tput} | {num(r.get('retained'))} | {r.get('paths_seen', '-')} | "
            f"{'yes' if r.get('ok') else '**no**'} |")
    return lines


def bt_table(results):
    by = {(r["fault"], r["path"]): r for r in results}
    lines = ["| fault (netem) | sluice direct Mbit/s (× no fault) | sluice relayed Mbit/s "
             "(× no fault) | boringtun Mbit/s (× no fault) | direct ÷ boringtun | "
             "relayed ÷ boringtun | boringtun intact |",
             "|---|---|---|---|---|---|---|"]
    for fault in NETEM:
        cells = [by.get((fault, p)) for p in ("direct", "relay", BT)]
        if not any(cells):
            continue

        def rate(r):
            if not r or r.get("throughput_mbps") is None:
                return "-"
            return f"{num(r['throughput_mbps'])} ({num(r.get('retained'))})"
        d, rl, b = cells
        lines.append(
            f"| {NETEM_TEXT[fault]} (`{NETEM[fault] or 'none'}`) | {rate(d)} | {rate(rl)} | "
            f"{rate(b)} | {num((d or {}).get('x_boringtun'))} | "
            f"{num((rl or {}).get('x_boringtun'))} | "
            f"{'-' if not b else ('yes' if b.get('intact') else 'NO')} |")
    return lines


def short_error(e):
    """"TimeoutError: timed out" -> "timed out"; a reset -> "reset"."""
    if not e:
        return ""
    if e.startswith("reset"):
        return "reset"
    return e.split(": ", 1)[-1][:60]


def md(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def render(cfg, results, run_info, keep):
    m = run_info["machine"]
    failed = [r for r in results if not r.get("ok")]
    sluice_cells = [r for r in results if r["tunnel"] == "sluice"]
    lines = [
        "# The fault matrix",
        "",
        "Checksummed transfers through the Sluice lab while the network misbehaves or a "
        "process restarts, with boringtun under the same netem settings in the same run. "
        "Produced by one command (root, from the repository, after "
        "`cargo build --release --locked --workspace`):",
        "",
        "```sh",
        "bench/fault_matrix.py                # the full matrix (about 15 minutes here)",
        "bench/fault_matrix.py --quick        # 32 MiB per cell, 30 s caps, an 8 s outage",
        "bench/fault_matrix.py --cells 'loss*@*,nat-rebind@direct'   # some cells",
        "bench/fault_matrix.py --list         # every cell's name",
        "```",
        "",
        "## This run",
        "",
        f"- Command: `{run_info['command']}`",
        f"- Date: {run_info['date']} (took {run_info['duration_s'] / 60:.1f} min)",
        f"- Machine: {m['nproc']} vCPUs ({m['cpu_model']}), {m['mem_gib']} GiB, kernel "
        f"{m['kernel']}; Sluice at commit `{m['git_head']}`"
        f"{' with uncommitted changes in the tree' if m['git_dirty'] else ''} "
        f"(binary sha256 `{m['sluice_sha256']}`); {m.get('boringtun') or 'boringtun'}",
        f"- A compiler was running during {run_info['build_overlap_pct']:.0f} % of the run "
        "(others share this 2-core machine): absolute throughputs are noisy; compare the "
        "ratios, which come from the same run.",
        f"- Each cell: one transfer of {run_info['size_mib']} MiB, except the slow netem cells: "
        + ", ".join(f"{NETEM_TEXT[f].split(' (')[0]} {mib} MiB"
                    + (f" (boringtun {run_info['slow_mib_boringtun'][f]})"
                       if "slow_mib_boringtun" in run_info else "")
                    for f, mib in run_info.get("slow_mib", {}).items())
        + " (through the connector's smoltcp TCP these run at a few Mbit/s or less, see the "
        f"notes; boringtun moves more so that its transfers outlast slow start). A transfer still going after {run_info['cap_s']:g} s is stopped (what "
        "arrived is still checked; \"capped\" in the table). Event cells are paced at "
        f"{run_info['pace_mib_s']:g} MiB/s from before the fault until they recovered, then "
        "go as fast as they can.",
        "",
        "## Result",
        "",
    ]
    if not failed:
        lines.append(f"All {len(sluice_cells)} Sluice cells passed: no cell lost or corrupted a "
                     "byte, and none reset a flow where a path remained (the connector "
                     "restarts reset their flow, as they must, and a new connection worked "
                     "within 5 s).")
    else:
        lines.append(f"{len(failed)} of {len(results)} cells did not pass: "
                     + ", ".join(f"`{r['cell']}`" for r in failed) + ".")
    lines += ["", "| | |", "|---|---|",
              "| intact | SHA-256 of the bytes that arrived equals that of the first as many "
              "bytes sent |",
              "| moved | bytes that arrived; \"capped\": the client stopped the transfer at the "
              "cap (a clean half-close, not a failure) |",
              "| resets | a reset seen by the application; and when not zero, the change of "
              "the TCP `EstabResets` counter in the agent's / the service's namespace |",
              "| recovery | event cells: from the fault's end (outage lifted, process started "
              "again, conntrack flushed, address changed) until bytes flowed again after the "
              "stall it caused (the stall's length in brackets); connector restarts: until a "
              "new connection completed a 1 MiB download |",
              "| throughput | netem cells: the whole transfer; event cells: the part after "
              "the recovery (\"after\"); connector restarts: a new transfer after the restart "
              "|",
              "| × no fault | throughput over the same path's no-fault cell in this run |",
              "| paths seen | the agent's `sluice status` sampled twice a second |",
              ""]
    lines += table(results)
    bt = bt_table(results)
    if len(bt) > 2:
        lines += ["", "## Loss tolerance beside boringtun", "",
                  "The same faults on the boringtun pair of `bench/compare.py` (`bwc-bt-s` ↔ "
                  "`bwc-bt-r`, a veth pair, boringtun-cli at each end) and on the lab's agent "
                  "link: every direction of every path meets the fault exactly once. Kernel "
                  "TCP end to end over boringtun; over Sluice, the service's kernel TCP ends at "
                  "the connector's smoltcp, whose TCP carries the bytes through the tunnel to "
                  "the agent's kernel. The delayer (`bench/nfq_delay.py`, a Python NFQUEUE "
                  "reader) passes about 30,000 packets a second here, so the delay and "
                  "reordering cells cannot go much beyond 300 Mbit/s on any tunnel.", ""]
        lines += bt
    lines += ["", "## How each fault is made", "",
              "This machine's kernel has no netem (`CONFIG_NET_SCH_NETEM` is not set, and it "
              "loads no modules), so the faults are made with netfilter, on the agent's link "
              "both ways: in the Sluice lab on every packet arriving in `PREFIXagent` on `eth0`, "
              "and every packet from 192.0.2.10 arriving in `PREFIXconn` or `PREFIXrelay` (the "
              "relay's link to the connector stays clean); on the boringtun pair on every "
              "packet arriving at either end. Each direction of every path meets the fault "
              "once. Drops and delays happen where a packet arrives (a delayed packet holds no "
              "sender's socket buffer, and a drop is silent, as on a wire), duplicates where "
              "it leaves. Sluice sends UDP in GSO batches, which cross the lab's veths whole; "
              "every lab host's `eth0` gets `gso_max_segs 1` (in every cell, the baselines "
              "too), so the kernel cuts each batch into its packets as it leaves the host, as "
              "a NIC without UDP segmentation offload does, and every packet meets the fault "
              "on its own.", "",
              "| fault | netem equivalent | how |", "|---|---|---|"]
    how = {
        "loss": "`iptables -A INPUT MATCH -m statistic --mode random --probability P -j DROP`",
        "dup": "`iptables -t mangle -A OUTPUT MATCH -m statistic --mode random --probability "
               "0.05 -j TEE --gateway NEXT_HOP` (the clone goes to the same next hop)",
        "delay": "`iptables -A INPUT MATCH -j NFQUEUE --queue-num 7 --queue-bypass`, and "
                 "`bench/nfq_delay.py` (in that namespace) accepts each packet after the delay",
    }
    for f, spec in NETEM.items():
        if spec and f not in UPLOAD:
            kind, arg = IMPAIR[f]
            detail = f" `{' '.join(map(str, arg))}`" if kind == "delay" else ""
            lines.append(f"| {NETEM_TEXT[f]} | `netem {spec}` | {how[kind]}{detail} |")
    lines += [
        f"| outage | `netem loss 100%` | `iptables -A INPUT -i eth0 -j DROP` in the agent's, "
        f"the relay's and the connector's namespaces (the whole internet segment) for "
        f"{run_info['outage_s']:g} s |",
        "| connector / relay restart | the role's process stopped (SIGTERM, or SIGKILL for "
        "a crash) and started again as `sluice lab up` starts it |",
        "| NAT rebinding | lab with `--nat-agent symmetric --nat-connector full-cone`; "
        "`conntrack -F` in both routers: the agent's next packets get new public ports |",
        "| address change | `ip addr del 192.0.2.10/24` and `ip addr add 192.0.2.12/24` on "
        "the agent's `eth0` |",
        "",
        NOTES_MARKER,
    ]
    return "\n".join(lines) + "\n" + keep


def write_doc(cfg, results, run_info, started):
    out = Path(cfg.out)
    keep = ""
    if out.exists():
        text = out.read_text()
        if NOTES_MARKER in text:
            keep = text.split(NOTES_MARKER, 1)[1].lstrip("\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(cfg, results, run_info, keep))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S") + ("-quick" if cfg.quick else "")
    js = RESULTS / f"fault-matrix-{stamp}.json"
    js.write_text(json.dumps({"run": run_info, "cells": results}, indent=1) + "\n")
    return out, js


def main(argv):
    cfg = parse_args(argv)
    if cfg.list:
        for c in selected(cfg):
            print(cell_name(*c))
        return 0
    if cfg.render:
        # The table again from a run's JSON (after a change to how it is written).
        saved = json.loads(Path(cfg.render).read_text())
        out = Path(cfg.out)
        keep = ""
        if out.exists() and NOTES_MARKER in out.read_text():
            keep = out.read_text().split(NOTES_MARKER, 1)[1].lstrip("\n")
        out.write_text(render(cfg, saved["cells"], saved["run"], keep))
        print(f"written: {out} (from {cfg.render})")
        return 0
    # compare.py's lock: both build the boringtun pair's namespaces.
    lock = open("/run/sluice-bench-compare.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("fault_matrix.py: compare.py or another fault matrix is running "
                         "(lock /run/sluice-bench-compare.lock)")

    def on_signal(signum, _frame):
        raise Interrupted(signum)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        results, run_info, started = matrix(cfg)
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        code = 128 + e.signum
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        log(f"error: {e}")
        code = 1
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        cleanup_all()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    if code:
        return code
    out, js = write_doc(cfg, results, run_info, started)
    print("\n".join(table(results)))
    bt = bt_table(results)
    if len(bt) > 2:
        print()
        print("\n".join(bt))
    print(f"\nwritten: {out} and {js}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
