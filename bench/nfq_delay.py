#!/usr/bin/env python3
"""Delays packets that an iptables rule sends to an NFQUEUE: latency, jitter and reordering
for kernels without netem (this machine's has no sch_netem), for bench/fault_matrix.py.

    nfq_delay.py --queue N [--delay-ms D] [--jitter-ms J [--keep-order]]
                 [--reorder PCT --reorder-ms R]

Binds netfilter queue N in the current network namespace and gives every queued packet its
verdict (accept) after a delay: D ms, plus a uniform random amount in [-J, +J] ms when J is set
(so, as with netem's jitter, packets overtake each other; with --keep-order a packet never
leaves before the one queued ahead of it, as on a real path whose delay varies, or netem's
jitter with a rate); with --reorder, PCT % of the packets
go at once and the others after R ms (netem's `delay R reorder PCT`). Only the packets' ids
cross to user space (NFQNL_COPY_META), and verdicts are sent many to a syscall. Prints "ready"
once bound, runs until SIGTERM or SIGINT, then accepts what it still holds and prints one JSON
line of counters. Use the rule with `--queue-bypass`, so packets pass when nothing listens.

Python 3 standard library only (netlink through a raw socket).
"""
import argparse
import errno
import heapq
import json
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQA_CFG_MASK, NFQA_CFG_FLAGS = 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 1
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
SO_RCVBUFFORCE = 33


def attr(kind, payload):
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def msg(kind, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq,
                       0) + body


def config(sock, queue, attrs, seq):
    sock.send(msg(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
    data = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        err = struct.unpack_from("=i", data, 16)[0]
        if err:
            raise OSError(-err, f"nfqueue config: {errno.errorcode.get(-err, err)}")


class Stop(Exception):
    pass


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queue", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--keep-order", action="store_true",
                    help="jitter without reordering: no packet leaves before an earlier one")
    ap.add_argument("--reorder", type=float, default=0.0, help="percent of packets not delayed")
    ap.add_argument("--reorder-ms", type=float, default=5.0)
    ap.add_argument("--maxlen", type=int, default=200000)
    a = ap.parse_args(argv)

    def on_signal(_s, _f):
        raise Stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind((0, 0))
    config(sock, a.queue, [attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0,
                                                          socket.htons(socket.AF_INET)))], 1)
    config(sock, a.queue, [attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))], 2)
    config(sock, a.queue, [attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", a.maxlen))], 3)
    config(sock, a.queue, [attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)),
                           attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_FAIL_OPEN))], 4)
    sock.setblocking(False)
    print("ready", flush=True)

    delay, jitter = a.delay_ms / 1000, a.jitter_ms / 1000
    reorder, reorder_delay = a.reorder / 100, a.reorder_ms / 1000
    rnd = random.Random()
    held = []  # heap of (release time, seq, packet id)
    seq = 0
    last_release = 0.0
    stats = {"packets": 0, "enobufs": 0, "max_held": 0}
    vhead = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(a.queue))
    vtype = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
    vlen = 16 + 4 + 12

    # One verdict message: netlink header, nfgenmsg, NFQA_VERDICT_HDR {verdict, id}.
    prefix = (struct.pack("=IHHII", vlen, vtype, NLM_F_REQUEST, 0, 0) + vhead
              + struct.pack("=HH", 12, NFQA_VERDICT_HDR) + struct.pack(">I", NF_ACCEPT))

    def verdicts(ids):
        out = bytearray()
        for pid in ids:
            out += prefix
            out += struct.pack(">I", pid)
            if len(out) > 60000:
                sock.send(out)
                out = bytearray()
        if out:
            sock.send(out)

    buf = bytearray(1 << 20)
    try:
        while True:
            now = time.monotonic()
            timeout = max(0.0, held[0][0] - now) if held else 1.0
            r, _, _ = select.select([sock], [], [], timeout)
            if r:
                for _ in range(64):
                    try:
                        n = sock.recv_into(buf)
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno == errno.ENOBUFS:
                            stats["enobufs"] += 1
                            continue
                        raise
                    now = time.monotonic()
                    off = 0
                    while off + 16 <= n:
                        length, kind = struct.unpack_from("=IH", buf, off)
                        if length < 16:
                            break
                        if kind & 0xff == NFQNL_MSG_PACKET:
                            # First attribute after nfgenmsg is NFQA_PACKET_HDR in practice;
                            # walk the attributes to be sure.
                            p = off + 20
                            end = off + length
                            pid = None
                            while p + 4 <= end:
                                alen, atype = struct.unpack_from("=HH", buf, p)
                                if alen < 4:
                                    break
                                if atype & 0x7fff == NFQA_PACKET_HDR:
                                    pid = struct.unpack_from(">I", buf, p + 4)[0]
                                    break
                                p += (alen + 3) & ~3
                            if pid is not None:
                                stats["packets"] += 1
                                if reorder:
                                    d = 0.0 if rnd.random() < reorder else reorder_delay
                                else:
                                    d = delay + (rnd.uniform(-jitter, jitter) if jitter else 0.0)
                                release = now + max(0.0, d)
                                if a.keep_order:
                                    release = max(release, last_release)
                                    last_release = release
                                seq += 1
                                heapq.heappush(held, (release, seq, pid))
                        off += (length + 3) & ~3
            stats["max_held"] = max(stats["max_held"], len(held))
            now = time.monotonic()
            due = []
            while held and held[0][0] <= now:
                due.append(heapq.heappop(held)[2])
            if due:
                verdicts(due)
    except Stop:
        pass
    finally:
        try:
            verdicts([h[2] for h in held])
        except OSError:
            pass
        print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
