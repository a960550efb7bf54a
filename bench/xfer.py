#!/usr/bin/env python3
"""Checksummed TCP transfers for bench/fault_matrix.py, run inside the lab's namespaces.

  xfer.py serve HOST PORT
      Serves transfers (one thread per connection). A request is 17 bytes:
      `[b'D' | b'U'][len: u64 BE][seed: u64 BE]`. `D`: the server sends the first `len` bytes
      of the stream of `seed` and closes; a client that half-closes its side (shutdown(SHUT_WR))
      asks it to stop early, and it then closes cleanly after the chunk in hand (no reset).
      `U`: the server reads to EOF and answers the SHA-256 (32 bytes) of what it read.
      Prints "listening" once it accepts connections.
  xfer.py get HOST PORT LEN SEED [--rate BYTES_PER_S] [--max-secs S] [--connect-timeout S]
                                 [--timeout S] [--progress S]
      Downloads: reads at most `--rate` bytes a second until a line "hurry" arrives on stdin
      (or stdin ends; then as fast as it can), and half-closes after `--max-secs` (the server
      stops; what arrived so far is still checked). `--timeout`: the socket's (default 60 s);
      `--progress S`: a line `progress MONOTONIC_TIME BYTES` every S seconds while bytes come.
      Prints one JSON object last (below).
  xfer.py put HOST PORT LEN SEED [--rate ...] [--max-secs S]
      Uploads `LEN` bytes (or fewer after `--max-secs`), half-closes and reads the server's
      SHA-256 of what it received.
  xfer.py digest LEN SEED
      Prints the SHA-256 of the first LEN bytes of the stream of SEED.

The stream of a seed: 64 KiB chunks; chunk k is the 8-byte big-endian k followed by 65,528
bytes of a 1 MiB random block (random.Random(seed)) at offset (k mod 16) * 64 KiB + 8. Any
byte lost, duplicated, corrupted or moved changes the SHA-256 of a prefix.

The JSON of get/put: `bytes` (moved), `sha256` (of what this side received or the server
received), `expected` (of the first `bytes` bytes of the stream), `intact` (both equal),
`complete` (all LEN bytes), `error` (null, or e.g. "reset: [Errno 104] Connection reset by peer"),
`reset` (the error was a TCP reset), `t_connect`, `t_first`, `t_end` (CLOCK_MONOTONIC seconds,
the same clock in every namespace), `secs`, `mbps`, `mbps_unpaced` (rate over the part read
after "hurry", or over everything when never paced), `max_gap_s` and `gaps`: every interval of
at least 0.2 s with no byte received, as [start, end] monotonic times.

Python 3 standard library only.
"""
import hashlib
import json
import random
import select
import socket
import struct
import sys
import threading
import time

CHUNK = 64 * 1024
BLOCK_CHUNKS = 16
GAP = 0.2


class Stream:
    """The deterministic byte stream of a seed, produced chunk by chunk."""

    def __init__(self, seed):
        self.block = random.Random(seed).randbytes(CHUNK * BLOCK_CHUNKS)

    def chunk(self, k):
        off = (k % BLOCK_CHUNKS) * CHUNK
        return struct.pack(">Q", k) + self.block[off + 8:off + CHUNK]

    def prefix_digest(self, n):
        h = hashlib.sha256()
        k = 0
        while n > 0:
            c = self.chunk(k)
            h.update(c[:n])
            n -= len(c)
            k += 1
        return h.hexdigest()


def serve_one(conn):
    with conn:
        try:
            conn.settimeout(120)
            hdr = b""
            while len(hdr) < 17:
                b = conn.recv(17 - len(hdr))
                if not b:
                    return
                hdr += b
            mode = hdr[:1]
            n, seed = struct.unpack(">QQ", hdr[1:])
            if mode == b"D":
                st = Stream(seed)
                conn.setblocking(True)
                k = 0
                while n > 0:
                    # The client half-closed: it wants no more (checked between chunks).
                    r, _, _ = select.select([conn], [], [], 0)
                    if r and conn.recv(1, socket.MSG_PEEK) == b"":
                        break
                    c = st.chunk(k)[:n]
                    conn.sendall(c)
                    n -= len(c)
                    k += 1
                conn.shutdown(socket.SHUT_WR)
                # Wait for the client's FIN so our close sends no reset.
                conn.settimeout(30)
                while conn.recv(65536):
                    pass
            elif mode == b"U":
                h = hashlib.sha256()
                while True:
                    b = conn.recv(1 << 20)
                    if not b:
                        break
                    h.update(b)
                conn.sendall(h.digest())
        except OSError:
            pass


def serve(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def parse_opts(argv):
    o = {"rate": 0.0, "max_secs": 0.0, "connect_timeout": 5.0, "timeout": 60.0,
         "progress": 0.0}
    i = 0
    while i < len(argv):
        key = argv[i].lstrip("-").replace("-", "_")
        if key not in o:
            raise SystemExit(f"xfer.py: unknown option {argv[i]}")
        o[key] = float(argv[i + 1])
        i += 2
    return o


class Hurry(threading.Thread):
    """Sets `now` when a line "hurry" (or EOF) comes on stdin."""

    def __init__(self):
        super().__init__(daemon=True)
        self.now = threading.Event()
        self.at = None

    def run(self):
        for line in sys.stdin:
            if line.strip() == "hurry":
                break
        self.at = time.monotonic()
        self.now.set()


def result(n_total, got, digest, expected, err, reset, t, gaps, unpaced):
    t_connect, t_first, t_end = t
    secs = max(t_end - t_connect, 1e-9)
    ub, ut = unpaced
    return {
        "bytes": got, "len": n_total, "sha256": digest, "expected": expected,
        "intact": digest == expected, "complete": got == n_total,
        "error": err, "reset": reset,
        "t_connect": t_connect, "t_first": t_first, "t_end": t_end,
        "secs": secs, "mbps": got * 8 / secs / 1e6,
        "mbps_unpaced": (ub * 8 / ut / 1e6) if ut > 0.05 else None,
        "max_gap_s": max((b - a for a, b in gaps), default=0.0),
        "gaps": gaps,
    }


def error_of(e):
    reset = isinstance(e, ConnectionResetError) or getattr(e, "errno", None) == 104
    return (("reset: " if reset else "") + f"{type(e).__name__}: {e}"), reset


def get(host, port, n, seed, o):
    hurry = Hurry()
    hurry.start()
    paced = o["rate"] > 0
    if not paced:
        hurry.now.set()
        hurry.at = time.monotonic()
    h = hashlib.sha256()
    got, gaps, err, reset = 0, [], None, False
    t_connect = time.monotonic()
    t_first = None
    last = t_connect
    closed_write = False
    unpaced_from = None  # (time, bytes) when the unpaced part began
    try:
        s = socket.create_connection((host, port), timeout=o["connect_timeout"])
        s.settimeout(o["timeout"])
        s.sendall(b"D" + struct.pack(">QQ", n, seed))
        next_progress = time.monotonic()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        t0 = time.monotonic()
        while True:
            if paced and not hurry.now.is_set():
                due = t0 + got / o["rate"]
                wait = due - time.monotonic()
                if wait > 0:
                    hurry.now.wait(wait)
            if unpaced_from is None and hurry.now.is_set():
                unpaced_from = (time.monotonic(), got)
            if o["max_secs"] and not closed_write and time.monotonic() - t0 > o["max_secs"]:
                s.shutdown(socket.SHUT_WR)
                closed_write = True
            k = s.recv_into(buf, CHUNK if not paced or hurry.now.is_set() else 16384)
            now = time.monotonic()
            if now - last >= GAP:
                gaps.append([last, now])
            last = now
            if k == 0:
                break
            if t_first is None:
                t_first = now
            h.update(view[:k])
            got += k
            if o["progress"] and now >= next_progress:
                print(f"progress {now:.3f} {got}", flush=True)
                next_progress = now + o["progress"]
        s.close()
    except OSError as e:
        err, reset = error_of(e)
        now = time.monotonic()
        if now - last >= GAP:
            gaps.append([last, now])
    t_end = time.monotonic()
    if err is None and got < n and not closed_write:
        err = f"closed early: {got} of {n} bytes"
    ub, ut = 0, 0.0
    if unpaced_from:
        ub, ut = got - unpaced_from[1], t_end - unpaced_from[0]
    expected = Stream(seed).prefix_digest(got)
    return result(n, got, h.hexdigest(), expected, err, reset, (t_connect, t_first, t_end),
                  gaps, (ub, ut))


def put(host, port, n, seed, o):
    st = Stream(seed)
    hurry = Hurry()
    hurry.start()
    paced = o["rate"] > 0
    if not paced:
        hurry.now.set()
    sent, err, reset, digest = 0, None, False, None
    t_connect = time.monotonic()
    t_first = None
    try:
        s = socket.create_connection((host, port), timeout=o["connect_timeout"])
        s.settimeout(o["timeout"])
        s.sendall(b"U" + struct.pack(">QQ", n, seed))
        t0 = time.monotonic()
        k = 0
        while sent < n:
            if paced and not hurry.now.is_set():
                wait = t0 + sent / o["rate"] - time.monotonic()
                if wait > 0:
                    hurry.now.wait(wait)
            if o["max_secs"] and time.monotonic() - t0 > o["max_secs"]:
                break
            c = st.chunk(k)[:n - sent]
            s.sendall(c)
            if t_first is None:
                t_first = time.monotonic()
            sent += len(c)
            k += 1
        s.shutdown(socket.SHUT_WR)
        d = b""
        while len(d) < 32:
            b = s.recv(32 - len(d))
            if not b:
                break
            d += b
        digest = d.hex() if len(d) == 32 else None
        if digest is None:
            err = "no digest from the server"
        s.close()
    except OSError as e:
        err, reset = error_of(e)
    t_end = time.monotonic()
    expected = st.prefix_digest(sent)
    return result(n, sent, digest, expected, err, reset, (t_connect, t_first, t_end), [],
                  (sent, t_end - t_connect) if not paced else (0, 0.0))


def main(argv):
    cmd = argv[0] if argv else ""
    if cmd == "serve":
        serve(argv[1], int(argv[2]))
    elif cmd in ("get", "put"):
        o = parse_opts(argv[5:])
        f = get if cmd == "get" else put
        print(json.dumps(f(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), o)), flush=True)
    elif cmd == "digest":
        print(Stream(int(argv[2])).prefix_digest(int(argv[1])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
