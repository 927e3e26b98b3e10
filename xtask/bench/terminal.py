#!/usr/bin/env python3
"""The agent's terminal relay, measured (`cargo xtask bench --only terminal`).

Usage: terminal.py ROUNDS MIB -- CMD...

Runs CMD (an `agentd run ... -- python3 -c AGENT` command line, or AGENT itself for the
baseline) as the foreground job of a new session on a pseudo-terminal this script owns,
as a user's terminal would, and measures through it:

* keystroke round trips: one byte typed, the agent (in raw mode) writes it back; ROUNDS
  times; the median and p99 in microseconds;
* output throughput: the agent writes MIB mebibytes; MiB/s as read here.

Prints one JSON object. The agent side is AGENT below: pass it as the command's last
argument (`python3 -c "$AGENT"`); `--agent` prints it.
"""
import json
import os
import pty
import sys
import time

AGENT = r"""
import os, sys, tty
tty.setraw(0)
os.write(1, b"<ready>")
while True:
    b = os.read(0, 1)
    if b == b"q":
        break
    if b == b"t":
        n = int(os.read(0, 16).split(b";")[0])
        chunk = b"x" * 65536
        for _ in range(n * 16):
            os.write(1, chunk)
        os.write(1, b"<end>")
        continue
    os.write(1, b)
"""


def read_until(fd, marker, limit=None):
    """Reads from fd until `marker` was read; returns the number of bytes read."""
    got = 0
    tail = b""
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            raise SystemExit(f"terminal.py: end of output before {marker!r}")
        got += len(data)
        tail = (tail + data)[-len(marker) - 1:]
        if marker in tail:
            return got


def main():
    if sys.argv[1:] == ["--agent"]:
        sys.stdout.write(AGENT)
        return
    rounds, mib = int(sys.argv[1]), int(sys.argv[2])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    read_until(fd, b"<ready>")
    lat = []
    for i in range(rounds):
        key = bytes([ord("a") + i % 16])  # a..p: not q (quit) nor t (throughput)
        t = time.perf_counter()
        os.write(fd, key)
        read_until(fd, key)
        lat.append((time.perf_counter() - t) * 1e6)
    lat.sort()
    t = time.perf_counter()
    os.write(fd, b"t%d;" % mib)
    n = read_until(fd, b"<end>")
    elapsed = time.perf_counter() - t
    os.write(fd, b"q")
    # Drain until the job exits (agentd's summary, the terminal restored).
    try:
        while os.read(fd, 1 << 16):
            pass
    except OSError:
        pass
    _, status = os.waitpid(pid, 0)
    print(json.dumps({
        "rtt_median_us": lat[len(lat) // 2],
        "rtt_p99_us": lat[min(len(lat) - 1, len(lat) * 99 // 100)],
        "mib_per_s": n / elapsed / (1 << 20),
        "exit": os.waitstatus_to_exitcode(status),
    }))


if __name__ == "__main__":
    main()
