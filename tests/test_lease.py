"""The lease that makes shared work happen once: real SQLite storages, threads as workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.study import StudyDirection

from pipeline.sweep.lease import ATTR_HEARTBEAT, LeaseTimeoutError, lease, lease_name


def storage(folder: Path) -> optuna.storages.RDBStorage:
    """Each worker opens its own connection to the shared file, as processes would."""
    return optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}",
                                      engine_kwargs={"connect_args": {"timeout": 60}})


def test_workers_started_together_do_the_work_one_at_a_time_and_once(tmp_path: Path) -> None:
    storage(tmp_path)  # the tables exist before the race, as after `prepare_study`
    done: list[int] = []
    inside, most_inside = [0], [0]
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(number: int) -> None:
        mine = storage(tmp_path)
        start.wait()
        with lease(mine, "s:lease:prepare", heartbeat_interval=0.2, grace_period=5, timeout=60):
            with lock:
                inside[0] += 1
                most_inside[0] = max(most_inside[0], inside[0])
            if not done:  # the check every holder makes: did another do it already?
                time.sleep(0.5)
                done.append(number)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(done) == 1 and most_inside[0] == 1
    assert "s:lease:prepare" not in {s.study_name for s in optuna.get_all_study_summaries(
        storage(tmp_path))}  # released: no lease study left behind


def test_a_lease_whose_holder_died_is_taken_over(tmp_path: Path) -> None:
    shared = storage(tmp_path)
    dead = shared.create_new_study([StudyDirection.MINIMIZE], lease_name("s", "base-7"))
    shared.set_study_user_attr(dead, ATTR_HEARTBEAT, time.time() - 60)  # its last beat, long ago
    started = time.monotonic()
    with lease(storage(tmp_path), lease_name("s", "base-7"), 0.2, grace_period=5, timeout=30):
        waited = time.monotonic() - started
    assert waited < 5


def test_waiting_on_a_live_holder_is_bounded_with_a_clear_error(tmp_path: Path) -> None:
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lease(storage(tmp_path), "s:lease:confirm", 0.2, grace_period=2, timeout=30):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(30)
    lines: list[str] = []
    try:
        # longer than the grace period: the holder's heartbeat keeps the lease its own
        with pytest.raises(LeaseTimeoutError, match="study.wait_timeout"), lease(
                storage(tmp_path), "s:lease:confirm", 0.2, grace_period=2, timeout=4,
                on_wait=lines.append):
            pass
    finally:
        release.set()
        thread.join()
    assert lines == ["waiting for another worker to finish 's:lease:confirm'"]
    with lease(storage(tmp_path), "s:lease:confirm", 0.2, grace_period=2, timeout=5):
        pass  # free again once released
