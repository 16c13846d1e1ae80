"""Stop requests (Ctrl-C, SIGTERM) that cannot be lost.

Python raises a signal handler's exception wherever the main thread happens to be. When that is a
garbage-collector or weakref callback (SQLAlchemy and torch both run such callbacks), the
KeyboardInterrupt is printed as "Exception ignored in ..." and dropped, and the run goes on as if
nothing happened. So the handler here also records the request, and long loops (training steps,
a worker's trials) call `raise_if_stop_requested()`, which raises it again. Hand-written: neither
Python nor the libraries offer a signal that survives a swallowed exception.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested: int | None = None


def _request_stop(signum: int, frame: object) -> None:
    global _requested
    _requested = signum
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def raise_if_stop_requested() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived inside `stop_on_signals()`, even one whose
    first KeyboardInterrupt was swallowed."""
    if _requested is not None:
        raise KeyboardInterrupt(f"signal {signal.Signals(_requested).name}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM (a scheduler's or `kill`'s stop) both raise KeyboardInterrupt and
    are remembered, so the running trial and MLflow run are recorded as interrupted, never left
    RUNNING. The previous handlers are restored on exit. Main thread only (Python's rule)."""
    global _requested
    _requested = None
    previous = {signum: signal.signal(signum, _request_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested = None
