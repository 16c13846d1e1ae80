"""A worker process for tests/test_lease.py, so that leases are raced, paused and killed by real
processes: `python -m tests.lease_worker race NAME LOG ROUNDS` or `... hold NAME`, with the storage
URL in the environment (LEASE_URL: not on a command line, where `ps` would show its password)."""

from __future__ import annotations

import os
import random
import sys
import time

from pipeline.sweep.lease import lease

URL_VARIABLE = "LEASE_URL"
HOLD_SECONDS = 0.02  # inside the lease, between its start and end marks
GAP_SECONDS = 0.05  # at most, between one release and the next try: lets the other worker in
STALL_ROUND = 1  # the round in which the holder stalls, as in a long garbage collection
STALL_SECONDS = 2.5  # longer than the old grace period (1 s here) and its poll (1 s)
WAIT_SECONDS = 60


def mark(log: str, what: str) -> None:
    """Append one line to the shared log in a single write, so lines of two workers never mix."""
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{what} {os.getpid()}\n".encode())
    finally:
        os.close(descriptor)


def stall(seconds: float) -> None:
    """Keep the interpreter busy without letting this process's other threads run, as a long
    garbage collection does."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(2 * seconds)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    finally:
        sys.setswitchinterval(switch_interval)


def race(url: str, name: str, log: str, rounds: int) -> None:
    """Once a line arrives on stdin (all racers are ready), take the lease `rounds` times, marking
    the log when inside it; stall once while holding it."""
    print("ready", flush=True)
    sys.stdin.readline()
    for number in range(rounds):
        with lease(url, name, timeout=WAIT_SECONDS) as held:
            mark(log, "start")
            time.sleep(HOLD_SECONDS)
            if number == STALL_ROUND:
                stall(STALL_SECONDS)
            held.verify()
            mark(log, "end")
        time.sleep(random.uniform(0, GAP_SECONDS))


def hold(url: str, name: str) -> None:
    """Take the lease, say `held`, keep it until a line arrives on stdin, then verify that it is
    still held, say `verified` and release it."""
    with lease(url, name, timeout=WAIT_SECONDS) as held:
        print("held", flush=True)
        sys.stdin.readline()
        held.verify()
        print("verified", flush=True)


if __name__ == "__main__":
    command, lease_name, *rest = sys.argv[1:]
    if command == "race":
        race(os.environ[URL_VARIABLE], lease_name, rest[0], int(rest[1]))
    else:
        hold(os.environ[URL_VARIABLE], lease_name)
