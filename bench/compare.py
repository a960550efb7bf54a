#!/usr/bin/env python3
"""Sluice beside WireGuard: throughput, latency, request rate, CPU and memory, in one run.

    bench/compare.py [--quick] [--reps N] [--secs S] [--sluice PATH] [--sluice-b PATH]
                     [--only ROWS] [--direct-lab-args ARGS] [--relay-lab-args ARGS]
                     [--idle-conns N] [--no-install] [--out DIR]
    bench/compare.py --report RESULTS.json     # reprint a run, redraw its .md and .svg

Rows (each path is "sender namespace -> tunnel -> receiver namespace"):
  veth              two namespaces joined by a veth pair, no tunnel: the machine's limit
  kernel-wireguard  the kernel's WireGuard over the same kind of veth pair (skipped when the
                    kernel has no wireguard module, detected in a scratch namespace)
  boringtun         boringtun-cli (userspace, Cloudflare) configured with `wg`
  wireguard-go      Debian's wireguard-go, configured with `wg`
  sluice-relay      the Sluice lab (`sluice lab up --relay-only`): agent -> relay -> connector
                    -> service
  sluice-direct     the Sluice lab (`sluice lab up`): the tunnel goes direct, agent ->
                    connector -> service
  sluice-relay-b    with --sluice-b PATH: sluice-relay and sluice-direct again, on labs of
  sluice-direct-b   their own run by the second binary, each measured right after its A row;
                    the run then prints the ratio A/B of each figure (same-run A/B of two builds)

Measures per row and repetition: iperf3 TCP with 1 and 4 streams in each direction, iperf3 UDP
at a fixed offered rate (loss %), ping RTT (median), a 1-byte TCP request/response rate, CPU
seconds per GB moved and peak RSS of the tunnel's processes, and for Sluice rows the time from
starting `sluice agent` to the first byte of an HTTP response through the tunnel and the
connector's RSS holding 1,000 idle TCP connections. Ratios to veth are taken within each
repetition. Prints one table; writes bench/results/<timestamp>.{json,csv,md,svg} and
bench/results/latest.{json,csv,md,svg}. Removes everything it made on exit, on errors and on
Ctrl-C, and the leftovers of an interrupted run when it starts. Needs root. Python 3 stdlib only.
See bench/README.md.
"""

import argparse
import csv
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "bench" / "probe.py"
DEFAULT_OUT = REPO / "bench" / "results"

# `sluice lab up` options of the sluice-direct row: the plain lab goes direct by itself (None
# would skip the row).
DIRECT_LAB_ARGS = ""
DIRECT_SKIP = "no --direct-lab-args"
# `sluice lab up` options of the relayed row: the lab prefers direct paths, so force the relay.
RELAY_LAB_ARGS = "--relay-only"

RELAY_LAB = "bw-"    # sluice lab prefix of the sluice-relay row
DIRECT_LAB = "bwd-"  # sluice lab prefix of the sluice-direct row
# With --sluice-b: the same two rows run by the second binary, on labs of their own (a lab's
# addresses live in its own namespaces, so labs of different prefixes run side by side).
# B row -> (its A row, its lab prefix); each is measured right after its A row.
B_ROWS = {"sluice-relay-b": ("sluice-relay", "bwb-"), "sluice-direct-b": ("sluice-direct", "bwdb-")}
# Namespace pairs of the veth and WireGuard rows: BASE-s (sender) and BASE-r (receiver).
PAIRS = {"veth": "bwc-veth", "kernel-wireguard": "bwc-kwg", "boringtun": "bwc-bt",
         "wireguard-go": "bwc-go"}
PROBE_NS = "bwc-probe"
# WireGuard interface names. Userspace WireGuard puts its control socket in
# /var/run/wireguard/NAME.sock, which is not per namespace: names must be unique on the host.
WG_IFACE = {"kernel-wireguard": "bwkw", "boringtun": "bwbt", "wireguard-go": "bwgo"}
WG_NET = {"kernel-wireguard": 1, "boringtun": 2, "wireguard-go": 3}  # tunnel 10.77.N.0/24
WG_PORT = 51820
WG_MTU = 1420  # what wg-quick sets on a 1500-byte underlay
UNDERLAY = ("192.0.2.1", "192.0.2.2")
SVC_ADDR = "198.51.100.10"  # the lab's private service (in PREFIXsvc)
IPERF_PORT, RR_PORT, IDLE_PORT = 5201, 9001, 9002
UDP_RATE, UDP_LEN, UDP_SOCKBUF = "200M", 1200, "1M"
ROW_ORDER = ["veth", "kernel-wireguard", "boringtun", "wireguard-go", "sluice-relay",
             "sluice-direct"]
# The A/B section: (label, field, unit) of each figure compared between an A row and its B row.
AB_METRICS = [("tcp1 up", "tcp1_gbps", "Gbit/s"), ("tcp1 down", "tcp1_rev_gbps", "Gbit/s"),
              ("tcp4 up", "tcp4_gbps", "Gbit/s"), ("tcp4 down", "tcp4_rev_gbps", "Gbit/s"),
              ("rtt", "rtt_ms", "ms"), ("+rtt", "rtt_added_ms", "ms"), ("rr tx/s", "rr_tps", "/s"),
              ("cpu s/GB", "cpu_s_per_gb", "s/GB"), ("rss MiB", "peak_rss_mib", "MiB")]
BUILD_PROCS = {"rustc", "cargo", "cc1", "cc1plus", "cc", "c++", "ld", "ld.lld", "ld.bfd",
               "clang", "cmake", "ninja", "build-script-b"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
T0 = time.monotonic()

# Tools: command -> (installer, package).
TOOLS = {
    "ip": ("apt", "iproute2"), "iperf3": ("apt", "iperf3"), "ping": ("apt", "iputils-ping"),
    "curl": ("apt", "curl"), "ss": ("apt", "iproute2"),
    "wg": ("apt", "wireguard-tools"), "wireguard-go": ("apt", "wireguard-go"),
    "boringtun-cli": ("cargo", "boringtun-cli"),
}
ESSENTIAL = ["ip", "iperf3", "ping", "curl", "ss"]


def install_hint(tool):
    how, pkg = TOOLS[tool]
    if how == "apt":
        return f"apt-get install -y --no-install-recommends {pkg}"
    return f"cargo install {pkg} --locked"


class Interrupted(BaseException):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def log(msg):
    print(f"[compare +{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and cleanup

class State:
    procs = []        # Popen objects started in their own session (killed by process group)
    tmp = None        # temporary directory (keys, logs, the copy of the sluice binary)
    sluice = None     # the sluice binary the labs run (a copy, so rebuilds don't disturb a run)
    lab_sluice = None  # binary used for `lab down` when there is no copy yet
    sluice_b = None   # the copy of --sluice-b, which the B rows' labs run
    lab_sluice_b = None  # --sluice-b itself, for `lab down` of the B labs before it is copied


def run(args, check=True, timeout=120, input=None):
    args = [str(a) for a in args]
    p = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: exit {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[-600:]}")
    return p


def nsx(ns, *args):
    return ["ip", "netns", "exec", ns, *map(str, args)]


def spawn(args, log_name=None, stdin=subprocess.DEVNULL, stdout=None, env=None):
    out = stdout
    if out is None:
        out = open(Path(State.tmp) / f"{log_name}.log", "ab") if log_name else subprocess.DEVNULL
    p = subprocess.Popen(list(map(str, args)), stdin=stdin, stdout=out,
                         stderr=subprocess.STDOUT if out is not subprocess.PIPE else subprocess.DEVNULL,
                         start_new_session=True, env=env)
    State.procs.append(p)
    return p


def stop(p, grace=2.0):
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_line(p, timeout):
    """One line of a PIPE'd child's stdout, or None after `timeout` seconds."""
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout):
            return p.stdout.readline().decode(errors="replace").strip()
        return None
    finally:
        sel.close()


def my_namespaces():
    names = [f"{b}-{side}" for b in PAIRS.values() for side in "sr"]
    return names + [PROBE_NS]


def ns_exists(ns):
    return Path("/run/netns", ns).exists()


def kill_ns_processes(ns):
    p = run(["ip", "netns", "pids", ns], check=False)
    pids = [int(x) for x in p.stdout.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.05)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cleanup(quiet=False):
    """Removes every process, namespace, lab and socket this harness makes. Idempotent."""
    for p in reversed(State.procs):
        stop(p, grace=1.0)
    State.procs.clear()
    for ns in my_namespaces():
        if ns_exists(ns):
            kill_ns_processes(ns)
            run(["ip", "netns", "del", ns], check=False)
    binary = State.sluice or State.lab_sluice
    for prefix in (RELAY_LAB, DIRECT_LAB):
        if binary and Path(binary).exists():
            run([binary, "lab", "down", "--prefix", prefix], check=False, timeout=60)
    # The B rows' labs, also without --sluice-b (what a killed A/B run left), each taken down
    # by the binary that made it when there is one.
    binary_b = next((b for b in (State.sluice_b, State.lab_sluice_b, binary)
                     if b and Path(b).exists()), None)
    for prefix in (lab for _, lab in B_ROWS.values()):
        if binary_b:
            run([binary_b, "lab", "down", "--prefix", prefix], check=False, timeout=60)
    for name in WG_IFACE.values():
        for side in ("s", "r"):
            Path(f"/var/run/wireguard/{name}-{side}.sock").unlink(missing_ok=True)
    if State.tmp:
        shutil.rmtree(State.tmp, ignore_errors=True)
        State.tmp = None
        State.sluice = None
        State.sluice_b = None
    # Leftovers of an interrupted earlier run (we hold the lock: no other run is going on).
    for d in Path(tempfile.gettempdir()).glob("sluice-bench.*"):
        shutil.rmtree(d, ignore_errors=True)
    if not quiet:
        log("cleaned up")


# ---------------------------------------------------------------- tools and machine

def find_tool(name):
    path = shutil.which(name)
    if path:
        return path
    for d in (Path.home() / ".cargo" / "bin", Path("/root/.cargo/bin")):
        if (d / name).exists():
            return str(d / name)
    return None


def ensure_tools(install):
    missing = [t for t in TOOLS if not find_tool(t)]
    apt_pkgs = sorted({TOOLS[t][1] for t in missing if TOOLS[t][0] == "apt"})
    if apt_pkgs and install:
        # --no-install-recommends: wireguard-tools recommends a kernel image (wireguard-modules).
        log(f"installing {' '.join(apt_pkgs)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *apt_pkgs],
                       env=env, check=False, stdout=subprocess.DEVNULL)
    if "boringtun-cli" in missing and install:
        cargo = find_tool("cargo")
        if cargo:
            log("installing boringtun-cli (cargo install boringtun-cli --locked; about 2 minutes)")
            subprocess.run([cargo, "install", "boringtun-cli", "--locked"], check=False)
    tools = {t: find_tool(t) for t in TOOLS}
    bad = [t for t in ESSENTIAL if not tools[t]]
    if bad:
        cmds = "\n".join(f"  {install_hint(t)}" for t in bad)
        raise SystemExit(f"compare.py: missing {', '.join(bad)}; install with:\n{cmds}")
    return tools


def first_line(args):
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=10)
        out = (p.stdout or p.stderr).strip().splitlines()
        return next((l.strip() for l in out if re.search(r"\d+\.\d+", l)), out[0] if out else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def sha256_16(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def mtime_iso(path):
    st = Path(path).stat()
    return datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec="seconds")


def machine_info(tools, sluice_src, sluice_b_src=None):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "unknown")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo")
                if l.startswith("MemTotal")), 0)

    def sysctl(name):
        try:
            return int(Path("/proc/sys/net/core", name).read_text())
        except OSError:
            return None

    git = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain", "-uno"],
                check=False).stdout.strip() != ""
    info = {
        "nproc": os.cpu_count(),
        "kernel": os.uname().release,
        "cpu_model": cpu,
        "mem_gib": round(mem / 2**20, 1),
        "rmem_max": sysctl("rmem_max"),
        "wmem_max": sysctl("wmem_max"),
        "loadavg_start": os.getloadavg()[0],
        "git_head": git,
        "git_dirty": dirty,
        "sluice_binary": str(sluice_src),
        "sluice_binary_mtime": mtime_iso(sluice_src),
        "sluice_sha256": sha256_16(State.sluice),
        "iperf3": first_line([tools["iperf3"], "--version"]),
        "wg": first_line([tools["wg"], "--version"]) if tools["wg"] else None,
        "wireguard_go": first_line([tools["wireguard-go"], "--version"]) if tools["wireguard-go"] else None,
        "boringtun": first_line([tools["boringtun-cli"], "--version"]) if tools["boringtun-cli"] else None,
        "python": sys.version.split()[0],
    }
    if sluice_b_src:
        info.update({
            "sluice_b_binary": str(sluice_b_src),
            "sluice_b_binary_mtime": mtime_iso(sluice_b_src),
            "sluice_b_sha256": sha256_16(State.sluice_b),
        })
    return info


class BuildWatch(threading.Thread):
    """Samples once a second whether a compiler runs on the machine (another engineer's build
    competes for the 2 cores and makes numbers noisy; the report says so)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples = 0
        self.busy = 0
        self.seen = set()
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(1.0):
            names = set()
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        names.add((d / "comm").read_text().strip())
                    except OSError:
                        pass
            hit = names & BUILD_PROCS
            self.samples += 1
            if hit:
                self.busy += 1
                self.seen |= hit

    def summary(self):
        pct = 100.0 * self.busy / self.samples if self.samples else 0.0
        return {"build_overlap_pct": round(pct, 1), "build_processes_seen": sorted(self.seen)}


# ---------------------------------------------------------------- /proc readings

def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def udp_rcvbuf_errors(namespaces):
    total = 0
    for ns in namespaces:
        lines = [l.split() for l in run(nsx(ns, "cat", "/proc/net/snmp")).stdout.splitlines()
                 if l.startswith("Udp:")]
        if len(lines) >= 2:
            total += int(dict(zip(lines[0][1:], lines[1][1:])).get("RcvbufErrors", 0))
    return total


# ---------------------------------------------------------------- rows and topologies

class Row:
    def __init__(self, name):
        self.name = name
        self.skipped = None   # reason, when the row cannot run here
        self.error = None     # first error while setting up or measuring
        self.sender = self.receiver = self.target = None
        self.procs = {}       # label -> pid of the tunnel's processes (CPU and RSS)
        self.udp_ns = []      # namespaces whose UDP receive-buffer drops are counted
        self.lab = None       # sluice lab prefix
        self.lab_args = []
        self.binary = None    # the sluice binary (copy) this row's lab runs
        self.agent_proc = None
        self.reps = []        # one dict of measurements per repetition
        self.final = {}       # measured once after the repetitions (RSS, idle connections)
        self.info = {}

    @property
    def base(self):
        """The row this one is built like: the A row of a B row, else itself."""
        return B_ROWS[self.name][0] if self.name in B_ROWS else self.name

    @property
    def kind(self):
        if self.name.startswith("sluice"):
            return "sluice"
        return "veth" if self.name == "veth" else "wireguard"


def wait_for(what, fn, timeout, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(interval)
    raise RuntimeError(f"{what}: not ready within {timeout:g}s")


def make_pair(base):
    s, r = f"{base}-s", f"{base}-r"
    for ns in (s, r):
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "link", "add", s, "netns", s, "type", "veth", "peer", "name", r, "netns", r])
    for ns, addr in ((s, UNDERLAY[0]), (r, UNDERLAY[1])):
        run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ns])
        run(["ip", "-n", ns, "link", "set", ns, "up"])
    return s, r


def kernel_wireguard():
    """(supported, reason) from trying `ip link add type wireguard` in a scratch namespace."""
    run(["ip", "netns", "add", PROBE_NS])
    try:
        p = run(["ip", "-n", PROBE_NS, "link", "add", "bwkw-probe", "type", "wireguard"],
                check=False)
        return p.returncode == 0, (p.stderr or p.stdout).strip()
    finally:
        run(["ip", "netns", "del", PROBE_NS], check=False)


def start_servers(row):
    spawn(nsx(row.receiver, "iperf3", "-s", "-B", row.target, "-p", IPERF_PORT),
          log_name=f"{row.name}-iperf3")
    rr = spawn(nsx(row.receiver, sys.executable, PROBE, "rr-server", row.target, RR_PORT),
               stdout=subprocess.PIPE)
    if read_line(rr, 10) != "listening":
        raise RuntimeError(f"{row.name}: request/response server did not start")

    def listening():
        out = run(nsx(row.receiver, "ss", "-Hltn", f"sport = :{IPERF_PORT}"), check=False).stdout
        return out.strip() != ""
    wait_for(f"{row.name}: iperf3 server", listening, 10)


def setup_veth(row):
    row.sender, row.receiver = make_pair(PAIRS["veth"])
    row.target = UNDERLAY[1]
    start_servers(row)


def setup_wireguard(row, tools):
    impl = row.name
    if not tools["wg"]:
        row.skipped = f"wg not found: install with `{install_hint('wg')}`"
        return
    if impl == "boringtun" and not tools["boringtun-cli"]:
        row.skipped = f"boringtun-cli not found: install with `{install_hint('boringtun-cli')}`"
        return
    if impl == "wireguard-go" and not tools["wireguard-go"]:
        row.skipped = f"wireguard-go not found: install with `{install_hint('wireguard-go')}`"
        return
    s, r = make_pair(PAIRS[impl])
    row.sender, row.receiver, row.udp_ns = s, r, [s, r]
    net = WG_NET[impl]
    tun = {s: f"10.77.{net}.1", r: f"10.77.{net}.2"}
    keys = {}
    for ns in (s, r):
        priv = run([tools["wg"], "genkey"]).stdout.strip()
        pub = run([tools["wg"], "pubkey"], input=priv + "\n").stdout.strip()
        kf = Path(State.tmp) / f"{ns}.key"
        kf.write_text(priv + "\n")
        kf.chmod(0o600)
        keys[ns] = (kf, pub)
    for ns, label in ((s, "sender"), (r, "receiver")):
        iface = f"{WG_IFACE[impl]}-{ns[-1]}"
        if impl == "kernel-wireguard":
            run(["ip", "-n", ns, "link", "add", iface, "type", "wireguard"])
        else:
            sock = Path(f"/var/run/wireguard/{iface}.sock")
            sock.unlink(missing_ok=True)
            if impl == "boringtun":
                env = dict(os.environ, WG_SUDO="1", WG_LOG_LEVEL="error")
                p = spawn(nsx(ns, tools["boringtun-cli"], "--foreground",
                              "--disable-drop-privileges", iface),
                          log_name=f"{impl}-{label}", env=env)
            else:
                p = spawn(nsx(ns, tools["wireguard-go"], "-f", iface),
                          log_name=f"{impl}-{label}")
            wait_for(f"{impl} {label} control socket", sock.exists, 10)
            row.procs[label] = p.pid
    for ns, peer in ((s, r), (r, s)):
        iface = f"{WG_IFACE[impl]}-{ns[-1]}"
        peer_underlay = UNDERLAY[1] if peer == r else UNDERLAY[0]
        run(nsx(ns, tools["wg"], "set", iface, "private-key", keys[ns][0], "listen-port", WG_PORT,
                "peer", keys[peer][1], "allowed-ips", f"{tun[peer]}/32",
                "endpoint", f"{peer_underlay}:{WG_PORT}"))
        run(["ip", "-n", ns, "addr", "add", f"{tun[ns]}/24", "dev", iface])
        run(["ip", "-n", ns, "link", "set", iface, "mtu", WG_MTU, "up"])
    row.target = tun[r]
    wait_for(f"{impl} tunnel (ping)", lambda: run(
        nsx(s, "ping", "-n", "-c", "1", "-W", "1", row.target), check=False).returncode == 0, 15)
    start_servers(row)
    row.info["mtu"] = WG_MTU


def lab_dir(row):
    return Path("/run/sluice-lab") / row.lab


def setup_sluice(row):
    p = run([row.binary, "lab", "up", "--prefix", row.lab, *row.lab_args], check=False,
            timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"sluice lab up --prefix {row.lab} failed:\n"
                           f"{(p.stdout + p.stderr).strip()[-2000:]}")
    row.sender, row.receiver = f"{row.lab}agent", f"{row.lab}svc"
    row.udp_ns = [f"{row.lab}agent", f"{row.lab}relay", f"{row.lab}conn"]
    row.target = SVC_ADDR
    for role in ("agent", "relay", "connector"):
        row.procs[role] = int((lab_dir(row) / f"{role}.pid").read_text())
    row.info["mtu"] = 1280
    start_servers(row)
    # The row measures the path it is named after: a page brings the tunnel up, then the
    # agent's own status must say which path it took.
    want = "direct" if row.base == "sluice-direct" else "relay"
    run(["ip", "netns", "exec", row.sender, "curl", "-s", "-o", "/dev/null", "--max-time", "5",
         f"http://{SVC_ADDR}/"], check=False, timeout=10)
    wait_for(f"{row.name}: the tunnel on the {want} path",
             lambda: sluice_path(row) == want, timeout=10, interval=0.2)


def sluice_path(row):
    """The path of the lab agent's tunnel ("direct" or "relay"), from `sluice status --json`."""
    p = run([row.binary, "status", "--json", "--socket", str(lab_dir(row) / "agent.sock")],
            check=False, timeout=10)
    try:
        tunnels = json.loads(p.stdout).get("tunnels") or []
    except ValueError:
        return None
    up = [t for t in tunnels if t.get("state") == "up"]
    return up[0].get("path") if up else None


def restart_agent(row):
    """Stops the lab's agent and starts it again the way `sluice lab up` does (same namespace,
    command, log, pid file, own process group); returns seconds from the start until the first
    byte of an HTTP response from the service through the tunnel."""
    d = lab_dir(row)
    ns = f"{row.lab}agent"
    pid = int((d / "agent.pid").read_text())
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 3)):
        if not alive(pid):
            break
        os.kill(pid, sig)
        if row.agent_proc is not None and row.agent_proc.pid == pid:
            try:
                row.agent_proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        else:
            deadline = time.monotonic() + wait
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
    if alive(pid):
        raise RuntimeError(f"the lab's agent (pid {pid}) does not stop")
    wait_for("the old agent's TUN device to go", lambda: run(
        ["ip", "-n", ns, "link", "show", "sluice0"], check=False).returncode != 0, 5)
    logf = open(d / "agent.log", "ab")
    t0 = time.monotonic()
    p = subprocess.Popen(nsx(ns, row.binary, "agent", "--config", d / "agent.yaml"),
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, process_group=0)
    logf.close()
    (d / "agent.pid").write_text(str(p.pid))
    State.procs.append(p)
    row.agent_proc = p
    row.procs["agent"] = p.pid
    while time.monotonic() - t0 < 30:
        c = run(nsx(ns, "curl", "-sf", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total}",
                    "--connect-timeout", "0.5", "--max-time", "3", f"http://{SVC_ADDR}/"),
                check=False, timeout=10)
        t_end = time.monotonic()
        if c.returncode == 0:
            ttfb, total = map(float, c.stdout.split())
            return t_end - (total - ttfb) - t0
        if p.poll() is not None:
            raise RuntimeError(f"the restarted agent exited ({p.returncode}); see {d}/agent.log")
        time.sleep(0.01)
    raise RuntimeError("no HTTP response through the tunnel within 30 s of starting the agent")


# ---------------------------------------------------------------- measurements

def iperf(row, secs, streams=1, reverse=False, udp=False):
    args = ["iperf3", "-c", row.target, "-p", IPERF_PORT, "-t", secs, "-J",
            "--connect-timeout", "3000"]
    if streams > 1:
        args += ["-P", streams]
    if reverse:
        args.append("-R")
    if udp:
        # -w: iperf3's own UDP sockets get 1 MiB buffers (capped by net.core.rmem_max), the
        # same for every row, so the receiving iperf3 is not what drops packets.
        args += ["-u", "-b", UDP_RATE, "-l", UDP_LEN, "-w", UDP_SOCKBUF]
    last = None
    for attempt in range(2):
        p = run(nsx(row.sender, *args), check=False, timeout=secs + 30)
        try:
            d = json.loads(p.stdout)
        except json.JSONDecodeError:
            d = {"error": (p.stderr or p.stdout).strip()[-300:]}
        if p.returncode == 0 and "error" not in d:
            return d
        last = d.get("error", f"exit {p.returncode}")
        time.sleep(1)  # e.g. "the server is busy" right after an aborted test
    raise RuntimeError(f"iperf3 {' '.join(map(str, args[3:]))} from {row.sender}: {last}")


def measure_tcp(row, secs, streams, reverse, out):
    key = f"tcp{streams}{'_rev' if reverse else ''}"
    before = {k: cpu_ticks(pid) for k, pid in row.procs.items()}
    drops = udp_rcvbuf_errors(row.udp_ns)
    d = iperf(row, secs, streams, reverse)
    drops = udp_rcvbuf_errors(row.udp_ns) - drops
    after = {k: cpu_ticks(pid) for k, pid in row.procs.items()}
    rcv = d["end"]["sum_received"]
    out[f"{key}_gbps"] = rcv["bits_per_second"] / 1e9
    out[f"{key}_retransmits"] = d["end"]["sum_sent"].get("retransmits")
    if row.udp_ns:
        out[f"{key}_udp_rcvbuf_errors"] = drops
    if streams == 1 and row.procs:
        gb = rcv["bytes"] / 1e9
        total = 0.0
        for k in row.procs:
            cpu = (after[k] - before[k]) / CLK_TCK
            total += cpu
            out[f"cpu_s_per_gb{'_rev' if reverse else ''}_{k}"] = cpu / gb
        out[f"cpu_s_per_gb{'_rev' if reverse else ''}"] = total / gb


def measure_udp(row, secs, out):
    d = iperf(row, secs, udp=True)
    end = d["end"]
    s = end.get("sum_received") if "lost_percent" in end.get("sum_received", {}) else end["sum"]
    out["udp_loss_pct"] = s["lost_percent"]
    out["udp_gbps"] = s["bits_per_second"] / 1e9


def measure_ping(row, count, out):
    p = run(nsx(row.sender, "ping", "-n", "-c", count, "-i", "0.02", "-W", "1", row.target),
            check=False, timeout=count + 30)
    times = [float(m) for m in re.findall(r"time=([\d.]+) ms", p.stdout)]
    if not times:
        raise RuntimeError(f"ping {row.target} from {row.sender}: no reply: {p.stdout[-300:]}")
    out["rtt_ms"] = statistics.median(times)
    out["ping_loss_pct"] = 100.0 * (count - len(times)) / count


def measure_rr(row, secs, out):
    p = run(nsx(row.sender, sys.executable, PROBE, "rr-client", row.target, RR_PORT, secs),
            timeout=secs + 30)
    d = json.loads(p.stdout)
    out["rr_tps"] = d["tps"]
    out["rr_p50_us"] = d["p50_us"]
    out["rr_p99_us"] = d["p99_us"]


def measure_rep(row, cfg):
    out = {}
    if row.kind == "sluice":
        out["startup_s"] = restart_agent(row)
    for streams in (1, 4):
        for reverse in (False, True):
            measure_tcp(row, cfg.secs, streams, reverse, out)
    measure_udp(row, cfg.udp_secs, out)
    measure_ping(row, cfg.pings, out)
    measure_rr(row, cfg.rr_secs, out)
    return out


def measure_final(row, cfg):
    """Once per row after the repetitions: peak RSS, and for Sluice the idle-connection test."""
    out = {}
    total = 0.0
    for k, pid in row.procs.items():
        hwm = status_kib(pid, "VmHWM") / 1024
        out[f"peak_rss_mib_{k}"] = hwm
        total += hwm
    if row.procs:
        out["peak_rss_mib"] = total
    if row.kind == "sluice" and cfg.idle_conns:
        out.update(idle_connections(row, cfg.idle_conns))
    return out


def idle_connections(row, n):
    server = spawn(nsx(row.receiver, sys.executable, PROBE, "idle-server", row.target, IDLE_PORT),
                   stdout=subprocess.PIPE)
    if read_line(server, 10) != "listening":
        raise RuntimeError("idle-connection server did not start")
    conn, agent = row.procs["connector"], row.procs["agent"]
    out = {"connector_rss_base_mib": status_kib(conn, "VmRSS") / 1024,
           "agent_rss_base_mib": status_kib(agent, "VmRSS") / 1024}
    client = spawn(nsx(row.sender, sys.executable, PROBE, "idle-client", row.target, IDLE_PORT, n),
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = read_line(client, 120)
        if not line:
            raise RuntimeError(f"idle-client did not report within 120 s")
        d = json.loads(line)
        time.sleep(1.0)  # let both ends settle
        out.update({
            "idle_conns_requested": n,
            "idle_conns_opened": d["opened"],
            "idle_conns_open_s": d["seconds"],
            "connector_rss_idle_mib": status_kib(conn, "VmRSS") / 1024,
            "agent_rss_idle_mib": status_kib(agent, "VmRSS") / 1024,
        })
    finally:
        try:
            client.stdin.write(b"\n")
            client.stdin.close()
        except OSError:
            pass
        try:
            client.wait(30)
        except subprocess.TimeoutExpired:
            pass
        stop(client)
        stop(server)
    return out


# ---------------------------------------------------------------- aggregation and output

RATIOS = [("tcp1_gbps", "tcp1_x_veth"), ("tcp1_rev_gbps", "tcp1_rev_x_veth"),
          ("tcp4_gbps", "tcp4_x_veth"), ("tcp4_rev_gbps", "tcp4_rev_x_veth"),
          ("rr_tps", "rr_x_veth")]


def add_ratios(rep, base):
    for field, ratio in RATIOS:
        if field in rep and base.get(field):
            rep[ratio] = rep[field] / base[field]
    if "rtt_ms" in rep and "rtt_ms" in base:
        rep["rtt_added_ms"] = rep["rtt_ms"] - base["rtt_ms"]


def summarize(row, run_info):
    d = {"name": row.name}
    if row.skipped:
        d["skipped"] = row.skipped
    if row.error:
        d["error"] = row.error
    for k in ("tcp1_gbps", "tcp4_gbps", "rtt_ms"):
        d.setdefault(k, None)
    keys = []
    for rep in row.reps:
        keys += [k for k in rep if k not in keys]
    for k in keys:
        vals = [rep[k] for rep in row.reps if rep.get(k) is not None]
        if vals:
            d[k] = statistics.median(vals)
            d[f"{k}_range"] = [min(vals), max(vals)]
    d.update(row.final)
    if row.base == "sluice-direct" and d.get("cpu_s_per_gb_relay", 0) > 0.2 * d.get("cpu_s_per_gb_agent", 1):
        # On a direct path the relay only sees keepalives: its CPU per GB should be near 0.
        d["warning"] = (f"the relay used {d['cpu_s_per_gb_relay']:.2f} CPU s/GB: the traffic "
                        "probably went through the relay, not a direct path")
        log(f"{row.name}: {d['warning']}")
    d["reps"] = len(row.reps)
    d["info"] = dict(row.info, sender_ns=row.sender, receiver_ns=row.receiver, target=row.target,
                     processes=sorted(row.procs))
    d["per_rep"] = row.reps
    d["run"] = run_info
    return d


def add_cross_ratios(rows):
    """Sluice rows against boringtun, repetition by repetition (issue 6 states its targets so)."""
    bt = next((d for d in rows if d["name"] == "boringtun" and d.get("per_rep")), None)
    for d in rows:
        if not d["name"].startswith("sluice") or not d.get("per_rep") or not bt:
            continue
        pairs = list(zip(d["per_rep"], bt["per_rep"]))
        if len(d["per_rep"]) != len(bt["per_rep"]):
            pairs = [(d, bt)]  # a repetition failed: compare the medians
        for field, key in (("tcp1_gbps", "tcp1_x_boringtun"), ("tcp4_gbps", "tcp4_x_boringtun")):
            vals = [a[field] / b[field] for a, b in pairs if a.get(field) and b.get(field)]
            if vals:
                d[key] = statistics.median(vals)
                d[f"{key}_range"] = [min(vals), max(vals)]


def ab_ratio(a, b):
    """a / b, or None where either is missing or not positive (e.g. an added RTT of 0)."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b


def add_ab_ratios(rows):
    """Each B row (--sluice-b) against its A row, repetition by repetition: the two ran back to
    back in each repetition. Written into the B row as a_over_b_<field> (median), its _range and
    a_over_b_per_rep; peak RSS is read once after the repetitions, so it has one ratio."""
    by = {d["name"]: d for d in rows}
    for b_name, (a_name, _) in B_ROWS.items():
        a, b = by.get(a_name), by.get(b_name)
        if not a or not b or not a.get("per_rep") or not b.get("per_rep"):
            continue
        # Repetitions are appended in order and a row stops at its first failure, so the i-th
        # entries of both lists are the same repetition.
        pairs = list(zip(a["per_rep"], b["per_rep"]))
        per_rep = [{} for _ in pairs]
        for _, field, _ in AB_METRICS:
            if field == "peak_rss_mib":
                r = ab_ratio(a.get(field), b.get(field))
                if r is not None:
                    b[f"a_over_b_{field}"] = r
                continue
            vals = []
            for i, (ra, rb) in enumerate(pairs):
                r = ab_ratio(ra.get(field), rb.get(field))
                if r is not None:
                    per_rep[i][field] = r
                    vals.append(r)
            if vals:
                b[f"a_over_b_{field}"] = statistics.median(vals)
                b[f"a_over_b_{field}_range"] = [min(vals), max(vals)]
        b["a_over_b_reps"] = len(pairs)
        b["a_over_b_per_rep"] = per_rep


def ab_lines(rows):
    """The A/B section: each figure of each A row over its B row (empty without B rows)."""
    by = {d["name"]: d for d in rows}
    if not any(n in by for n in B_ROWS):
        return []
    m = (rows[0].get("run") or {}).get("machine") or {}
    out = [f"A/B: A = --sluice {m.get('sluice_binary', '?')} (sha256 {m.get('sluice_sha256', '?')}), "
           f"B = --sluice-b {m.get('sluice_b_binary', '?')} (sha256 {m.get('sluice_b_sha256', '?')})",
           "  ratio A/B within each repetition, median (min-max over repetitions); > 1: A's "
           "figure is higher (better for tcp and rr tx/s, worse for rtt, cpu s/GB and rss MiB)"]
    for b_name, (a_name, _) in B_ROWS.items():
        a, b = by.get(a_name), by.get(b_name)
        missing = [(n, d) for n, d in ((a_name, a), (b_name, b)) if not d or not d.get("per_rep")]
        if missing:
            why = "; ".join(f"{n}: " + ("not in --only" if not d else d.get("skipped")
                                        or d.get("error") or "no data") for n, d in missing)
            out.append(f"  {a_name}: A/B not measured ({why})")
            continue
        lines = []
        for label, field, unit in AB_METRICS:
            r = b.get(f"a_over_b_{field}")
            rng = b.get(f"a_over_b_{field}_range")
            s = f"  {a_name} {label}: A/B {fmt(r, 2)}"
            if field == "peak_rss_mib":
                s += " (read once)"
            elif rng and b.get("a_over_b_reps", 0) > 1:
                s += f" ({fmt(rng[0], 2)}-{fmt(rng[1], 2)})"
            lines.append((s, f"A {fmt(a.get(field))}  B {fmt(b.get(field))} {unit}"))
        w = max(len(s) for s, _ in lines)
        out += [f"{s.ljust(w)}   {ab}" for s, ab in lines]
        n = b.get("a_over_b_reps", 0)
        if n != max(len(a["per_rep"]), len(b["per_rep"])):
            out.append(f"  {a_name}: only {n} repetition(s) measured both rows")
    return out


def targets_lines(rows):
    """Issue 6's targets for this pass, checked against this run."""
    by = {d["name"]: d for d in rows}
    bt, relay, direct = by.get("boringtun", {}), by.get("sluice-relay", {}), by.get("sluice-direct", {})

    def verdict(ok):
        return "met" if ok else "MISSED"
    out = ["issue 6 targets (ratios within each repetition, medians):"]
    for d, need in ((direct, 2.0), (relay, 1.0)):
        name = d.get("name") or ("sluice-direct" if need == 2.0 else "sluice-relay")
        r = d.get("tcp1_x_boringtun")
        what = f"  {name}: single-stream TCP (up) >= {need:g}x boringtun: "
        out.append(what + (f"{r:.2f}x  {verdict(r >= need)}" if r is not None else
                           f"not measured ({d.get('skipped') or d.get('error') or 'no boringtun row'})"))
    for d in (relay, direct):
        if d.get("rtt_added_ms") is not None and bt.get("rtt_added_ms") is not None:
            out.append(f"  {d['name']}: added RTT over veth <= boringtun's ({bt['rtt_added_ms']:.3f} ms): "
                       f"{d['rtt_added_ms']:.3f} ms  {verdict(d['rtt_added_ms'] <= bt['rtt_added_ms'])}")
    for d in (relay, direct):
        if d.get("connector_rss_idle_mib") is not None:
            out.append(f"  {d['name']}: connector RSS with {d.get('idle_conns_opened')} idle TCP flows "
                       f"< 64 MiB: {d['connector_rss_idle_mib']:.1f} MiB  "
                       f"{verdict(d['connector_rss_idle_mib'] < 64)}")
    return out


def fmt(v, digits=None):
    if v is None:
        return "-"
    if digits is None:
        a = abs(v)
        digits = 3 if a < 1 else 2 if a < 10 else 1 if a < 1000 else 0
    return f"{v:.{digits}f}"


# (header, field, digits): the one table.
COLUMNS = [
    ("tcp1 up", "tcp1_gbps", None), ("tcp1 down", "tcp1_rev_gbps", None),
    ("tcp4 up", "tcp4_gbps", None), ("tcp4 down", "tcp4_rev_gbps", None),
    ("tcp1 xveth", "tcp1_x_veth", 3), ("tcp4 xveth", "tcp4_x_veth", 3),
    ("udp loss%", "udp_loss_pct", 2), ("rtt ms", "rtt_ms", 3), ("+rtt ms", "rtt_added_ms", 3),
    ("rr tx/s", "rr_tps", 0), ("rr xveth", "rr_x_veth", 2),
    ("cpu s/GB", "cpu_s_per_gb", 2), ("rss MiB", "peak_rss_mib", 1),
]
SLUICE_COLUMNS = [
    ("tcp1 up x boringtun", "tcp1_x_boringtun", 2),
    ("start->1st byte s", "startup_s", 3),
    ("cpu s/GB up agent/relay/conn", ("cpu_s_per_gb_agent", "cpu_s_per_gb_relay",
                                      "cpu_s_per_gb_connector"), 2),
    ("cpu s/GB down agent/relay/conn", ("cpu_s_per_gb_rev_agent", "cpu_s_per_gb_rev_relay",
                                        "cpu_s_per_gb_rev_connector"), 2),
    ("peak RSS MiB agent/relay/conn", ("peak_rss_mib_agent", "peak_rss_mib_relay",
                                       "peak_rss_mib_connector"), 1),
    ("conn RSS MiB base/1000 idle", ("connector_rss_base_mib", "connector_rss_idle_mib"), 1),
]


def cell(d, field, digits, ranges):
    if isinstance(field, tuple):
        return "/".join(fmt(d.get(f), digits) for f in field)
    v = d.get(field)
    s = fmt(v, digits)
    r = d.get(f"{field}_range")
    if ranges and r and d.get("reps", 0) > 1 and fmt(r[0], digits) != fmt(r[1], digits):
        s += f" ({fmt(r[0], digits)}-{fmt(r[1], digits)})"
    return s


def table_lines(rows, markdown=False):
    """The main table (and a second one for the Sluice processes), as text or markdown."""
    out = []
    heads = ["row"] + [h for h, _, _ in COLUMNS]
    body = []
    for d in rows:
        if d.get("skipped") or (d.get("error") and not d.get("reps")):
            why = f"skipped: {d['skipped']}" if d.get("skipped") else f"failed: {d['error']}"
            body.append([d["name"], why])
            continue
        body.append([d["name"]] + [cell(d, f, dg, markdown) for _, f, dg in COLUMNS])
        if not markdown and d.get("reps", 0) > 1:
            body.append([""] + [
                "" if isinstance(f, tuple) or not d.get(f"{f}_range")
                or fmt(d[f"{f}_range"][0], dg) == fmt(d[f"{f}_range"][1], dg) else
                f"{fmt(d[f'{f}_range'][0], dg)}-{fmt(d[f'{f}_range'][1], dg)}"
                for _, f, dg in COLUMNS])
    out += render(heads, body, markdown)
    srows = [d for d in rows if d["name"].startswith("sluice") and d.get("reps")]
    if srows:
        out.append("")
        heads = ["sluice row"] + [h for h, _, _ in SLUICE_COLUMNS]
        body = [[d["name"]] + [cell(d, f, dg, True) for _, f, dg in SLUICE_COLUMNS] for d in srows]
        out += render(heads, body, markdown)
    return out


def render(heads, body, markdown):
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for b in body:
            if len(b) == 2 and len(heads) > 2:
                b = b + [""] * (len(heads) - 2)
            lines.append("| " + " | ".join(b) + " |")
        return lines
    widths = [max([len(heads[i])] + [len(b[i]) for b in body if len(b) == len(heads)])
              for i in range(len(heads))]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    for b in body:
        if len(b) != len(heads):
            lines.append(b[0].ljust(widths[0]) + "  " + b[1])
        else:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(b, widths))))
    return lines


def legend(cfg, run_info):
    m = run_info["machine"]
    ov = run_info["build_overlap_pct"]
    return [
        f"{run_info['date']}  commit {m['git_head']}{' (dirty tree)' if m['git_dirty'] else ''}  "
        f"{m['nproc']} cpus ({m['cpu_model']}), kernel {m['kernel']}, rmem_max {m['rmem_max']}",
        f"{cfg.reps} repetition(s): median" + (" (min-max)" if cfg.reps > 1 else "") +
        f"; iperf3 {cfg.secs}s per TCP test, UDP {UDP_RATE}bit/s offered ({UDP_LEN}-byte payloads, "
        f"{cfg.udp_secs}s, iperf3 -w {UDP_SOCKBUF}), {cfg.pings} pings at 20 ms, "
        f"request/response {cfg.rr_secs}s",
        "up = sender ns -> receiver ns (agent -> service), down = iperf3 -R; Gbit/s; xveth = ratio "
        "to veth in the same repetition; cpu s/GB and rss = the tunnel's processes (tcp1 up; "
        "kernel rows: -)",
        (f"a compiler ran during {ov:.0f}% of the run ({', '.join(run_info['build_processes_seen'])}): "
         "expect noise" if ov > 0 else "no compiler ran during the run"),
    ]


def write_csv(rows, path):
    fields = ["name", "status"]
    for d in rows:
        for k, v in d.items():
            if k in ("name", "per_rep", "run", "info", "skipped", "error", "a_over_b_per_rep"):
                continue
            if k.endswith("_range"):
                for suffix in ("_min", "_max"):
                    if k[:-6] + suffix not in fields:
                        fields.append(k[:-6] + suffix)
            elif k not in fields:
                fields.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for d in rows:
            flat = {"name": d["name"],
                    "status": ("skipped: " + d["skipped"]) if d.get("skipped") else
                    ("error: " + d["error"]) if d.get("error") else
                    ("warning: " + d["warning"]) if d.get("warning") else "ok"}
            for k, v in d.items():
                if k.endswith("_range") and isinstance(v, list):
                    flat[k[:-6] + "_min"], flat[k[:-6] + "_max"] = v
                elif isinstance(v, (int, float)) or v is None:
                    flat[k] = v
            w.writerow(flat)


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_svg(rows, path, subtitle):
    """Grouped bar chart: iperf3 TCP 1 and 4 streams, each direction, per row; log scale."""
    series = [("tcp1_gbps", "TCP 1 stream, up", "#1f77b4"),
              ("tcp1_rev_gbps", "TCP 1 stream, down", "#9ecae1"),
              ("tcp4_gbps", "TCP 4 streams, up", "#d62728"),
              ("tcp4_rev_gbps", "TCP 4 streams, down", "#f4a3a3")]
    vals = [v for d in rows for f, _, _ in series
            for v in [d.get(f)] + list(d.get(f"{f}_range") or []) if v]
    lo = 10 ** math.floor(math.log10(min(vals))) if vals else 0.01
    hi = 10 ** math.ceil(math.log10(max(vals))) if vals else 100
    W, H = max(960, 90 + 145 * len(rows)), 470  # wider beyond 6 rows (the B rows)
    left, right, top, bottom = 70, 20, 70, 90
    pw, ph = W - left - right, H - top - bottom
    def y(v):
        return top + ph - ph * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W/2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">'
         'iperf3 TCP throughput through each tunnel (Gbit/s, log scale)</text>',
         f'<text x="{W/2}" y="40" text-anchor="middle" fill="#555">{esc(subtitle)}</text>']
    dec = lo
    while dec <= hi * 1.0001:
        for m in (1, 2, 5):
            v = dec * m
            if v > hi * 1.0001:
                break
            yy = y(v)
            s.append(f'<line x1="{left}" x2="{W-right}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     f'stroke="{"#ccc" if m == 1 else "#eee"}"/>')
            if m == 1 or (math.log10(hi) - math.log10(lo)) <= 3:
                s.append(f'<text x="{left-6}" y="{yy+4:.1f}" text-anchor="end">{v:g}</text>')
        dec *= 10
    s.append(f'<text x="18" y="{top+ph/2}" transform="rotate(-90 18 {top+ph/2})" '
             'text-anchor="middle">Gbit/s</text>')
    gw = pw / max(1, len(rows))
    bw = min(34, (gw - 24) / len(series))
    for i, d in enumerate(rows):
        gx = left + i * gw
        cx = gx + gw / 2
        s.append(f'<text x="{cx:.1f}" y="{top+ph+18}" text-anchor="middle" '
                 f'font-weight="bold">{esc(d["name"])}</text>')
        if d.get("tcp1_x_veth") and d["name"] != "veth":
            s.append(f'<text x="{cx:.1f}" y="{top+ph+34}" text-anchor="middle" fill="#555">'
                     f'{d["tcp1_x_veth"]:.3f}× veth (tcp1 up)</text>')
        if d.get("skipped") or not d.get("reps"):
            why = (d.get("skipped") or d.get("error") or "no data").split(" (")[0]
            words, line, lines = why.split(), "", []
            for w_ in words:
                if len(line) + len(w_) > 22:
                    lines.append(line)
                    line = w_
                else:
                    line = f"{line} {w_}".strip()
            lines.append(line)
            for j, l in enumerate(["skipped:" if d.get("skipped") else "failed:"] + lines[:4]):
                s.append(f'<text x="{cx:.1f}" y="{top+ph/2-20+j*15:.1f}" text-anchor="middle" '
                         f'fill="#888" font-size="11">{esc(l)}</text>')
            continue
        x0 = cx - bw * len(series) / 2
        for j, (f, _, color) in enumerate(series):
            v = d.get(f)
            if not v:
                continue
            x = x0 + j * bw
            s.append(f'<rect x="{x+1:.1f}" y="{y(v):.1f}" width="{bw-2:.1f}" '
                     f'height="{top+ph-y(v):.1f}" fill="{color}"/>')
            r = d.get(f"{f}_range")
            if r and d.get("reps", 0) > 1:
                xm = x + bw / 2
                s.append(f'<line x1="{xm:.1f}" x2="{xm:.1f}" y1="{y(r[0]):.1f}" y2="{y(r[1]):.1f}" '
                         'stroke="black"/>')
                for rv in r:
                    s.append(f'<line x1="{xm-3:.1f}" x2="{xm+3:.1f}" y1="{y(rv):.1f}" '
                             f'y2="{y(rv):.1f}" stroke="black"/>')
            top_y = min(y(v), y(r[1]) if r else y(v))
            s.append(f'<text x="{x+bw/2:.1f}" y="{top_y-4:.1f}" text-anchor="middle" '
                     f'font-size="10">{fmt(v)}</text>')
    s.append(f'<line x1="{left}" x2="{W-right}" y1="{top+ph}" y2="{top+ph}" stroke="black"/>')
    s.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top+ph}" stroke="black"/>')
    lx = left
    for _, label, color in series:
        s.append(f'<rect x="{lx}" y="{H-28}" width="12" height="12" fill="{color}"/>')
        s.append(f'<text x="{lx+16}" y="{H-18}">{esc(label)}</text>')
        lx += 30 + 7 * len(label)
    s.append(f'<text x="{W-right}" y="{H-18}" text-anchor="end" fill="#555">'
             'median, whiskers min–max</text>')
    s.append("</svg>")
    Path(path).write_text("\n".join(s) + "\n")


# ---------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Sluice beside WireGuard implementations in network namespaces "
                    "(see bench/README.md).")
    ap.add_argument("--quick", action="store_true",
                    help="1 repetition, 2 s runs, 20 pings (under about a minute)")
    ap.add_argument("--reps", type=int, help="repetitions (default 3; --quick: 1)")
    ap.add_argument("--secs", type=float, help="seconds per iperf3 TCP test (default 10; --quick: 2)")
    ap.add_argument("--sluice", default=str(REPO / "target" / "release" / "sluice"),
                    help="sluice binary (default: target/release/sluice); it is copied first")
    ap.add_argument("--sluice-b", metavar="PATH",
                    help="a second sluice binary (e.g. the previous build), also copied first: "
                         "adds the rows sluice-relay-b and sluice-direct-b, each measured right "
                         "after its A row, and prints the ratio A/B of each figure")
    ap.add_argument("--only", help="comma-separated rows to run (veth is always measured; "
                                   "with --sluice-b also sluice-relay-b, sluice-direct-b)")
    ap.add_argument("--direct-lab-args", default=DIRECT_LAB_ARGS,
                    help="`sluice lab up` options that make the agent use a direct path; "
                         "enables the sluice-direct row")
    ap.add_argument("--relay-lab-args", default=RELAY_LAB_ARGS,
                    help="extra `sluice lab up` options for the sluice-relay row")
    ap.add_argument("--idle-conns", type=int, default=1000,
                    help="idle TCP connections held through the Sluice tunnel while the "
                         "connector's RSS is read (0: skip; default 1000)")
    ap.add_argument("--no-install", action="store_true",
                    help="do not install missing tools (wireguard-tools, wireguard-go, iperf3 "
                         "with apt-get, boringtun-cli with cargo); rows missing one are skipped")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (bench/results)")
    ap.add_argument("--report", metavar="JSON",
                    help="measure nothing: print the table of an earlier run's JSON and redraw "
                         "its .md and .svg next to it")
    a = ap.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.secs = a.secs or (2 if a.quick else 10)
    a.secs = int(a.secs) if float(a.secs).is_integer() else a.secs
    a.udp_secs = 1 if a.quick else a.secs
    a.rr_secs = 1 if a.quick else min(a.secs, 5)
    a.pings = 20 if a.quick else 50
    if a.reps < 1 or a.secs < 1:
        ap.error("--reps and --secs must be at least 1")
    return a


def row_order(cfg):
    """ROW_ORDER, with each B row (--sluice-b) right after its A row."""
    order = []
    for name in ROW_ORDER:
        order.append(name)
        if cfg.sluice_b:
            order += [b for b, (a, _) in B_ROWS.items() if a == name]
    return order


def check_only(cfg):
    only = set(cfg.only.split(",")) if cfg.only else None
    if only:
        unknown = only - set(ROW_ORDER) - set(B_ROWS)
        if unknown:
            raise SystemExit(f"compare.py: unknown row(s) {', '.join(sorted(unknown))}; "
                             f"rows: {', '.join(row_order(cfg))}")
        need_b = sorted(only & set(B_ROWS))
        if need_b and not cfg.sluice_b:
            raise SystemExit(f"compare.py: row(s) {', '.join(need_b)} need --sluice-b PATH")
    return only


def build_rows(cfg, tools):
    only = check_only(cfg)
    rows = []
    for name in row_order(cfg):
        if only and name != "veth" and name not in only:
            continue
        row = Row(name)
        rows.append(row)
        try:
            if name == "veth":
                setup_veth(row)
            elif name == "kernel-wireguard":
                ok, why = kernel_wireguard()
                if not ok:
                    row.skipped = (f"no wireguard module in this kernel (`ip link add type "
                                   f"wireguard` in a scratch namespace: {why})")
                else:
                    setup_wireguard(row, tools)
            elif name in ("boringtun", "wireguard-go"):
                setup_wireguard(row, tools)
            elif row.kind == "sluice":
                # A B row is its A row with the other binary and a lab of its own.
                b = name in B_ROWS
                row.binary = State.sluice_b if b else State.sluice
                if cfg.sluice_b:
                    row.info["sluice_binary"] = cfg.sluice_b if b else cfg.sluice
                if row.base == "sluice-relay":
                    row.lab = B_ROWS[name][1] if b else RELAY_LAB
                    row.lab_args = shlex.split(cfg.relay_lab_args or "")
                    setup_sluice(row)
                elif cfg.direct_lab_args is None:
                    row.skipped = DIRECT_SKIP
                else:
                    row.lab = B_ROWS[name][1] if b else DIRECT_LAB
                    row.lab_args = shlex.split(cfg.direct_lab_args)
                    setup_sluice(row)
        except RuntimeError as e:
            if name == "veth":
                raise
            row.error = str(e)
            log(f"{name}: setup failed: {e}")
        if row.skipped:
            log(f"{name}: skipped: {row.skipped}")
        elif not row.error:
            log(f"{name}: ready ({row.sender} -> {row.target} in {row.receiver})")
    return rows


def benchmark(cfg):
    if os.geteuid() != 0:
        raise SystemExit("compare.py: run as root (it creates network namespaces)")
    src = Path(cfg.sluice)
    if not src.is_file() or not os.access(src, os.X_OK):
        raise SystemExit(f"compare.py: no sluice binary at {src}: build it with scripts/setup.sh "
                         "(cargo build --release --locked --bin sluice) or pass --sluice PATH")
    src_b = Path(cfg.sluice_b) if cfg.sluice_b else None
    if src_b and (not src_b.is_file() or not os.access(src_b, os.X_OK)):
        raise SystemExit(f"compare.py: no sluice binary at {src_b} (--sluice-b)")
    check_only(cfg)
    State.lab_sluice = str(src)
    State.lab_sluice_b = str(src_b) if src_b else None
    cleanup(quiet=True)  # leftovers of an interrupted run
    tools = ensure_tools(not cfg.no_install)
    State.tmp = tempfile.mkdtemp(prefix="sluice-bench.")
    State.sluice = str(Path(State.tmp) / "sluice")
    shutil.copy2(src, State.sluice)
    if src_b:
        State.sluice_b = str(Path(State.tmp) / "sluice-b")
        shutil.copy2(src_b, State.sluice_b)
    watch = BuildWatch()
    watch.start()
    started = datetime.datetime.now().astimezone()
    machine = machine_info(tools, src, src_b)
    log(f"sluice {src} (sha256 {machine['sluice_sha256']}), commit {machine['git_head']}"
        f"{' + uncommitted changes' if machine['git_dirty'] else ''}; "
        f"{cfg.reps} rep(s) x {cfg.secs}s")
    if src_b:
        log(f"sluice B {src_b} (sha256 {machine['sluice_b_sha256']}): rows "
            f"{', '.join(B_ROWS)}, each right after its A row")
    rows = build_rows(cfg, tools)
    live = [r for r in rows if not r.skipped and not r.error]
    for rep in range(cfg.reps):
        base = None
        for row in live:
            if row.error:
                continue
            log(f"rep {rep + 1}/{cfg.reps}: {row.name}")
            try:
                res = measure_rep(row, cfg)
            except RuntimeError as e:
                if row.name == "veth":
                    raise
                row.error = str(e)
                log(f"{row.name}: failed: {e}")
                continue
            if row.name == "veth":
                base = res
            add_ratios(res, base)
            row.reps.append(res)
            log(f"  tcp1 {res['tcp1_gbps']:.3f}/{res['tcp1_rev_gbps']:.3f}  "
                f"tcp4 {res['tcp4_gbps']:.3f}/{res['tcp4_rev_gbps']:.3f} Gbit/s  "
                f"rtt {res['rtt_ms']:.3f} ms  rr {res['rr_tps']:.0f}/s"
                + (f"  start {res['startup_s']:.3f}s" if "startup_s" in res else ""))
    for row in live:
        if row.reps and not row.error:
            try:
                row.final = measure_final(row, cfg)
            except RuntimeError as e:
                row.error = str(e)
                log(f"{row.name}: failed: {e}")
    watch.stopped.set()
    ended = datetime.datetime.now().astimezone()
    machine["loadavg_end"] = os.getloadavg()[0]
    run_info = {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((ended - started).total_seconds(), 1),
        "mode": "quick" if cfg.quick else "full",
        "reps": cfg.reps, "secs": cfg.secs, "udp_secs": cfg.udp_secs, "rr_secs": cfg.rr_secs,
        "pings": cfg.pings, "udp_rate": UDP_RATE, "udp_len": UDP_LEN,
        "udp_iperf3_sockbuf": UDP_SOCKBUF,
        "command": " ".join(["bench/compare.py"] + sys.argv[1:]),
        **watch.summary(),
        "machine": machine,
    }
    summaries = [summarize(r, run_info) for r in rows]
    add_cross_ratios(summaries)
    add_ab_ratios(summaries)
    return summaries, run_info, started


def write_results(cfg, rows, run_info, started):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S") + ("-quick" if cfg.quick else "")
    for name in (stamp, "latest"):
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
        write_csv(rows, out / f"{name}.csv")
        write_report(cfg, rows, run_info, out / name)
    return out / stamp


def write_report(cfg, rows, run_info, stem):
    m = run_info["machine"]
    subtitle = (f"{run_info['date'][:16].replace('T', ' ')} · commit {m['git_head']}"
                f" · {m['nproc']} vCPUs, {m['kernel']} · median of {cfg.reps} × {cfg.secs} s")
    ab = ab_lines(rows)
    md = (["```"] + legend(cfg, run_info) + ["```", ""] + table_lines(rows, markdown=True)
          + ["", "```"] + (ab + [""] if ab else []) + targets_lines(rows) + ["```"])
    write_svg(rows, f"{stem}.svg", subtitle)
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")


def report(path):
    rows = json.loads(Path(path).read_text())
    add_cross_ratios(rows)
    add_ab_ratios(rows)
    run_info = rows[0]["run"]
    cfg = argparse.Namespace(reps=run_info["reps"], secs=run_info["secs"],
                             udp_secs=run_info["udp_secs"], rr_secs=run_info["rr_secs"],
                             pings=run_info["pings"], quick=run_info["mode"] == "quick")
    stem = Path(path).with_suffix("")
    write_report(cfg, rows, run_info, stem)
    print("\n".join(legend(cfg, run_info)) + "\n")
    print("\n".join(table_lines(rows)))
    print()
    if ab_lines(rows):
        print("\n".join(ab_lines(rows)))
        print()
    print("\n".join(targets_lines(rows)))
    print(f"\nredrawn: {stem}.md, {stem}.svg")
    return 0


def main(argv):
    cfg = parse_args(argv)
    if cfg.report:
        return report(cfg.report)
    lock = open("/run/sluice-bench-compare.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("compare.py: another run is going on (lock /run/sluice-bench-compare.lock)")

    def on_signal(signum, _frame):
        raise Interrupted(signum)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        rows, run_info, started = benchmark(cfg)
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        code = 128 + e.signum
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        log(f"error: {e}")
        code = 1
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        cleanup()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    if code:
        return code
    stem = write_results(cfg, rows, run_info, started)
    print()
    print("\n".join(legend(cfg, run_info)))
    print()
    print("\n".join(table_lines(rows)))
    print()
    if ab_lines(rows):
        print("\n".join(ab_lines(rows)))
        print()
    print("\n".join(targets_lines(rows)))
    for d in rows:
        if d.get("warning"):
            print(f"warning: {d['name']}: {d['warning']}")
    print()
    print(f"results: {stem}.{{json,csv,md,svg}} and {stem.parent}/latest.{{json,csv,md,svg}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
