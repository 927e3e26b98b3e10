#!/usr/bin/env python3
"""The DNS bench's upstream resolver (`cargo xtask bench --only dns`): the stand-in for
the host's resolver that agentd's resolver forwards allowed names to.

Usage: dns_upstream.py ADDR PORT TTL

Answers over UDP on ADDR:PORT: an A query for allowed.test with 192.0.2.2 (TTL seconds),
any other type of allowed.test with no records (NOERROR), any other name with NXDOMAIN.
Prints "ready" once bound; runs until killed.
"""
import socket
import struct
import sys

NAMES = {b"allowed.test": socket.inet_aton("192.0.2.2")}


def main():
    addr, port, ttl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print("ready", flush=True)
    while True:
        q, peer = s.recvfrom(4096)
        try:
            i, labels = 12, []
            while q[i]:
                labels.append(q[i + 1:i + 1 + q[i]])
                i += 1 + q[i]
            qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
        except (IndexError, struct.error):
            continue
        question = q[12:i + 5]
        ip = NAMES.get(b".".join(labels).lower())
        if ip is not None and qtype == 1:
            flags, answers = 0x8180, 1
            record = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, ttl, 4) + ip
        else:
            flags, answers, record = (0x8180 if ip else 0x8183), 0, b""
        header = q[:2] + struct.pack(">HHHHH", flags, 1, answers, 0, 0)
        s.sendto(header + question + record, peer)


if __name__ == "__main__":
    main()
