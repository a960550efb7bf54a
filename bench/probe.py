#!/usr/bin/env python3
"""Small network probes that bench/compare.py runs inside the benchmark's namespaces.

  probe.py rr-server HOST PORT           1-byte echo server (one thread per connection)
  probe.py rr-client HOST PORT SECONDS   1-byte ping-pong on one TCP connection for SECONDS;
                                          prints JSON: transactions, seconds, tps, p50_us, p99_us
  probe.py idle-server HOST PORT         accepts connections and holds them open
  probe.py idle-client HOST PORT N       opens N TCP connections and holds them; prints JSON
                                          (opened, failed, seconds) once they are open, then
                                          waits for a line (or EOF) on stdin before closing them

Python 3 standard library only.
"""
import json
import resource
import selectors
import socket
import sys
import threading
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def listen(host, port, backlog=4096):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


def rr_serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            b = conn.recv(1)
            if not b:
                return
            conn.sendall(b)


def rr_server(host, port):
    s = listen(host, port)
    print("listening", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=rr_serve, args=(conn,), daemon=True).start()


def rr_client(host, port, secs):
    c = socket.create_connection((host, port), timeout=5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    clock = time.perf_counter
    t0 = clock()
    end = t0 + secs
    now = t0
    while now < end:
        c.send(b"x")
        if c.recv(1) != b"x":
            raise SystemExit("rr-client: connection closed")
        t = clock()
        lat.append(t - now)
        now = t
    elapsed = now - t0
    c.close()
    lat.sort()
    n = len(lat)
    print(json.dumps({
        "transactions": n,
        "seconds": elapsed,
        "tps": n / elapsed,
        "p50_us": lat[n // 2] * 1e6,
        "p99_us": lat[min(n - 1, int(n * 0.99))] * 1e6,
    }), flush=True)


def idle_server(host, port):
    raise_nofile()
    s = listen(host, port)
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    print("listening", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is s:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
            else:
                try:
                    data = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()


def idle_client(host, port, n):
    raise_nofile()
    socks, failed = [], 0
    t0 = time.monotonic()
    for _ in range(n):
        try:
            socks.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            failed += 1
    print(json.dumps({"opened": len(socks), "failed": failed,
                      "seconds": time.monotonic() - t0}), flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()


def main(argv):
    if len(argv) < 3:
        raise SystemExit(__doc__)
    mode, host, port = argv[0], argv[1], int(argv[2])
    if mode == "rr-server":
        rr_server(host, port)
    elif mode == "rr-client":
        rr_client(host, port, float(argv[3]))
    elif mode == "idle-server":
        idle_server(host, port)
    elif mode == "idle-client":
        idle_client(host, port, int(argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass
