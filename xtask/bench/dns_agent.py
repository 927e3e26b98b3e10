#!/usr/bin/env python3
"""The DNS bench's agent (`cargo xtask bench --only dns`), run inside an agent as
`python3 -c "$(cat dns_agent.py)" SERVER PORT N TARGET TARGET_PORT`.

1. N lookups of allowed.test (type A) sent to SERVER:PORT over UDP, back to back, each
   as a stub resolver makes one (glibc's does the same): a fresh socket, connect, send
   the query, receive the answer, close. Timed from the socket's creation to its close.
   An answer counts when it has the query's id, NOERROR, and the A record of TARGET_ADDR.
   (agentd's resolver allows an agent 400 queries at once, 200 a second after: N stays
   within the 400.)
2. N TCP connects to TARGET:TARGET_PORT, each on a fresh socket; the connect call timed.

One lookup and one connect first, not timed (the run's first of each pays for cold
caches). Prints one JSON object: the times in microseconds of the lookups and connects
that succeeded, and the others counted by reason.
"""
import json
import socket
import struct
import sys
import time

RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def lookup(server, qid):
    """One A query for allowed.test: None when answered as expected, else why not."""
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    query += b"\x07allowed\x04test\x00" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(5)
        s.connect(server)
        s.send(query)
        reply = s.recv(512)
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
    if len(reply) < 12 or reply[:2] != query[:2]:
        return "bad reply"
    rcode = reply[3] & 0x0F
    if rcode != 0:
        return RCODES.get(rcode, f"rcode {rcode}")
    answers = struct.unpack(">H", reply[6:8])[0]
    if answers != 1 or socket.inet_aton(sys.argv[4]) not in reply[12:]:
        return "no answer"
    return None


def connect(target):
    """One TCP connect: its time in microseconds, or why it failed."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        t = time.perf_counter_ns()
        s.connect(target)
        return (time.perf_counter_ns() - t) / 1e3
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()


def main():
    server = (sys.argv[1], int(sys.argv[2]))
    n = int(sys.argv[3])
    target = (sys.argv[4], int(sys.argv[5]))
    out = {"lookup_us": [], "lookup_failures": {}, "connect_us": [], "connect_failures": {}}

    def failed(kind, why):
        out[kind][why] = out[kind].get(why, 0) + 1

    # Not timed; by name, this lookup admits the address the connects go to.
    warm = lookup(server, 0)
    if warm is not None:
        failed("lookup_failures", warm)
    for i in range(1, n + 1):
        t = time.perf_counter_ns()
        why = lookup(server, i & 0xFFFF)
        us = (time.perf_counter_ns() - t) / 1e3
        if why is None:
            out["lookup_us"].append(us)
        else:
            failed("lookup_failures", why)
    warm = connect(target)
    if isinstance(warm, str):
        failed("connect_failures", warm)
    for _ in range(n):
        r = connect(target)
        if isinstance(r, str):
            failed("connect_failures", r)
        else:
            out["connect_us"].append(r)
    print(json.dumps(out))

if __name__ == "__main__":
    main()
