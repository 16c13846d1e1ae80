"""Graceful stops on Ctrl-C and SIGTERM for the commands that record runs (train, sweep).

Python's own Ctrl-C raises KeyboardInterrupt wherever the main thread happens to be. Inside a
garbage-collector or weakref callback (SQLAlchemy's, for one) it is printed as "Exception ignored"
and lost, so the run goes on; inside a database call it can leave a connection half-used. So the
first SIGINT or SIGTERM here only records the request, and the loops that take time (every training
step, every trial of a worker) call `raise_if_stop_requested()`, which raises KeyboardInterrupt
where every record can still be closed cleanly. A second signal raises at once. Hand-written:
neither Python nor the libraries we use offer a deferred stop.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _request_stop(signum: int, frame: object) -> None:
    global _requested
    if _requested is not None:
        raise _interrupt(signum)
    _requested = signum


def raise_if_stop_requested() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived inside `stop_on_signals()`."""
    if _requested is not None:
        raise _interrupt(_requested)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, the first SIGINT or SIGTERM (a scheduler's or `kill`'s stop) is a request that the
    next `raise_if_stop_requested()` turns into KeyboardInterrupt, so the running trial and MLflow
    run are recorded as interrupted, never left RUNNING. The previous handlers are restored on
    exit. Main thread only (Python's rule for signal handlers)."""
    global _requested
    _requested = None
    previous = {signum: signal.signal(signum, _request_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested = None
