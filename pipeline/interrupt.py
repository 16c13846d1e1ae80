"""Graceful stops on Ctrl-C and SIGTERM for the commands that record runs (train, sweep).

Python's own Ctrl-C raises KeyboardInterrupt wherever the main thread happens to be. Inside a
garbage-collector or weakref callback (SQLAlchemy's, for one) it is printed as "Exception ignored"
and lost, so the run goes on; inside a database call it can leave a record half-written. So the
first SIGINT or SIGTERM here only records the request, and the loops that take time (every training
step, every trial of a worker) call `raise_if_stop_requested()`, which raises KeyboardInterrupt
where every record can still be closed cleanly. A second signal raises at once, except inside
`shielded()`, where the end of a run is being recorded. Hand-written: neither Python nor the
libraries we use offer a deferred stop.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None
_repeat_interrupts = True
_shield_depth = 0


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _request_stop(signum: int, frame: object) -> None:
    global _requested
    if _requested is not None and _repeat_interrupts and _shield_depth == 0:
        raise _interrupt(signum)
    _requested = _requested or signum


def stop_requested() -> bool:
    """True once a stop signal arrived inside `stop_on_signals()`: the `should_stop` callback
    that the stages take."""
    return _requested is not None


def raise_if_stop_requested() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived inside `stop_on_signals()`."""
    if _requested is not None:
        raise _interrupt(_requested)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Inside, a repeated stop signal is only recorded: for the few writes that record how a run
    ended, so that it is never left RUNNING (or closed as FINISHED by MLflow at exit)."""
    global _shield_depth
    _shield_depth += 1
    try:
        yield
    finally:
        _shield_depth -= 1


@contextlib.contextmanager
def stop_on_signals(repeat_interrupts: bool = True) -> Iterator[None]:
    """Inside, the first SIGINT or SIGTERM (a scheduler's or `kill`'s stop) is a request that the
    next `raise_if_stop_requested()` turns into KeyboardInterrupt, so the running trial and MLflow
    run are recorded as interrupted, never left RUNNING. A repeated signal interrupts at once if
    `repeat_interrupts` (a user pressing Ctrl-C twice); worker processes, which get both the
    terminal's SIGINT and their parent's SIGTERM, pass False. Main thread only (Python's rule)."""
    global _requested, _repeat_interrupts
    _requested, _repeat_interrupts = None, repeat_interrupts
    previous = {signum: signal.signal(signum, _request_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested, _repeat_interrupts = None, True
