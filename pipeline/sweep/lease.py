"""Exactly-once work among workers on several machines: a lease kept in the study's storage.

Optuna has no lock, but creating a study is atomic in every RDB storage (study names are unique),
so a lease is a study of its own, `<study>:lease:<what>`, created by the worker that takes it
and deleted when that worker is done. The holder records a heartbeat in it; a lease whose
heartbeat is older than the grace period belonged to a worker that died, and is taken over by
deleting it by id (only one taker can) and creating it anew. Hand-written: neither Optuna nor
MLflow offers a lease, and the storage is the one system every worker already shares.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage
from optuna.study import StudyDirection

ATTR_HEARTBEAT = "heartbeat"
ATTR_HOLDER = "holder"
POLL_SECONDS = 1.0
LEASE_MARK = ":lease:"


class _WithoutLeaseStudies(logging.Filter):
    """Optuna announces every study it creates; a lease is not one a user needs to hear of."""

    def filter(self, record: logging.LogRecord) -> bool:
        return LEASE_MARK not in record.getMessage()


for _storage_module in ("optuna.storages._rdb.storage", "optuna.storages.journal._storage"):
    logging.getLogger(_storage_module).addFilter(_WithoutLeaseStudies())


class LeaseTimeoutError(TimeoutError):
    """Another worker held the lease, alive, for longer than this worker would wait."""


def lease_name(study_name: str, what: str) -> str:
    return f"{study_name}{LEASE_MARK}{what}"


def holder() -> str:
    """Who holds a lease, for people reading the storage: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _try_take(storage: BaseStorage, name: str, grace_period: float,
              first_seen: dict[int, float]) -> int | None:
    """The new lease's id, or None while a live holder has it. A stale one is deleted."""
    try:
        lease_id = storage.create_new_study([StudyDirection.MINIMIZE], name)
    except DuplicatedStudyError:
        pass
    else:
        storage.set_study_user_attr(lease_id, ATTR_HOLDER, holder())
        storage.set_study_user_attr(lease_id, ATTR_HEARTBEAT, time.time())
        return lease_id
    try:
        held_id = storage.get_study_id_from_name(name)
        beat = storage.get_study_user_attrs(held_id).get(ATTR_HEARTBEAT)
    except KeyError:  # released in between: try again
        return None
    now = time.time()
    # A lease just created has no heartbeat yet: count from when this worker first saw it.
    last = beat if beat is not None else first_seen.setdefault(held_id, now)
    if now - last > grace_period:
        with contextlib.suppress(KeyError):  # another worker took it over first
            storage.delete_study(held_id)
    return None


def _heartbeat(storage: BaseStorage, lease_id: int, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        with contextlib.suppress(Exception):  # a missed beat is retried; the grace period covers it
            storage.set_study_user_attr(lease_id, ATTR_HEARTBEAT, time.time())


@contextlib.contextmanager
def lease(storage: BaseStorage, name: str, heartbeat_interval: float, grace_period: float,
          timeout: float, on_wait: Callable[[str], None] | None = None,
          should_stop: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Hold the lease `name` for the block, waiting while another live worker holds it; raise
    `LeaseTimeoutError` after `timeout` seconds of waiting. `on_wait` gets one line when this
    worker starts waiting; `should_stop` ends the wait with KeyboardInterrupt. Work done under a
    lease must check whether another holder already did it."""
    deadline = time.monotonic() + timeout
    first_seen: dict[int, float] = {}
    told = False
    while (lease_id := _try_take(storage, name, grace_period, first_seen)) is None:
        if should_stop():
            raise KeyboardInterrupt(f"stop requested while waiting for {name}")
        if time.monotonic() > deadline:
            raise LeaseTimeoutError(
                f"waited {timeout:.0f} s for another worker to finish '{name}' (its heartbeat is "
                "still fresh): raise study.wait_timeout, or look at that worker's log")
        if on_wait is not None and not told:
            on_wait(f"waiting for another worker to finish '{name}'")
            told = True
        time.sleep(POLL_SECONDS)
    stop = threading.Event()
    beating = threading.Thread(target=_heartbeat, args=(storage, lease_id, heartbeat_interval, stop),
                               daemon=True, name=f"lease-{name}")
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join()
        with contextlib.suppress(KeyError):  # taken over as stale: nothing left to release
            storage.delete_study(lease_id)
