"""Servers that stop answering for a while: a PostgreSQL restart under Optuna's storage or a lease,
an MLflow tracking server restarted. Workers wait for them, bounded, and then stop with a
`ServerUnavailableError` that names the server (its password never shown).

- A database connection is made through `ServerWait`: while the server refuses connections (it is
  restarting, or down), making one waits, with backoff, for up to a bound shared by every
  connection of the engine and counted from the first refusal; within it the caller never sees
  the outage. SQLAlchemy's `pool_pre_ping` already replaces connections the restart killed.
- An operation whose connection was cut while it ran (the server ended the session under it, or
  ended it while it was being opened: `ended_while_opened`) is told apart by `connection_lost`,
  so that it can be repeated where repeating is harmless (`pipeline.sweep.storage`) and handled
  where it is not (`pipeline.sweep.workers`).
- MLflow's client retries its own HTTP requests (`pipeline.tracking`).

Hand-written: SQLAlchemy's pre-ping reconnects once and fails at once while the server is down,
and neither SQLAlchemy, Optuna nor the standard library waits, bounded, for a database to return.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy
import sqlalchemy.exc

from pipeline.errors import PipelineError
from pipeline.secrets import redact_text, redact_url

FIRST_DELAY = 0.5  # seconds before the second try to connect; doubled after each refusal
MAX_DELAY = 2.0  # between tries: a server back after a restart is reached within this
# SQLSTATE classes of a session the server ended: connection exception, operator intervention.
SESSION_ENDED_SQLSTATES = ("08", "57P")


class ServerUnavailableError(PipelineError, RuntimeError):
    """A server the study needs (its database, the MLflow tracking server) did not answer for as
    long as the pipeline waits; finished trials are kept, and a re-run continues the study."""


def unavailable(what: str, url: str, waited: float, cause: BaseException | str) -> ServerUnavailableError:
    """The error for `what` at `url` (password redacted) that did not answer for `waited` seconds,
    last with `cause` (its first line)."""
    return ServerUnavailableError(
        f"{what} at {redact_url(url)} did not answer for {waited:.0f} s "
        f"(last: {redact_text(first_line(cause), url)}); "
        "finished work is kept: start the server again and re-run the command to continue")


def first_line(cause: BaseException | str) -> str:
    """The first line of an error's message: a database error's cause, not the SQL around it."""
    text = str(getattr(cause, "orig", None) or cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def connection_lost(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is a database connection that was cut
    under an operation (SQLAlchemy found the connection dead: the server restarted or ended the
    session). Whether the operation took effect is unknown; a new connection works once the
    server is back."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def ended_while_opened(context: sqlalchemy.engine.ExceptionContext) -> None:
    """SQLAlchemy's `handle_error` hook: the driver's OperationalError raised before any
    connection was handed out is a disconnect. The driver had connected (a refusal is waited for
    in `ServerWait`), then the server ended the session while SQLAlchemy set it up: a server
    shutting down for a restart does that. Nothing ran on it, so the operation can run on a new
    one; SQLAlchemy, which flags disconnects only on connections it has handed out, would
    otherwise report a plain error that `connection_lost` cannot tell from a failed query.
    Only errors that say the session ended count: the driver's own (no SQLSTATE: the connection
    is lost or closed), SQLSTATE class 08 (connection exception) and 57P (admin or crash
    shutdown, cannot connect now); a query the server refused (a timeout, a full disk) stays
    what it is. A failed pre-ping is SQLAlchemy's own business."""
    error = context.original_exception
    if context.connection is not None or context.is_pre_ping \
            or not isinstance(error, context.dialect.loaded_dbapi.OperationalError):
        return
    state = getattr(error, "sqlstate", None)
    if state is None or state.startswith(SESSION_ENDED_SQLSTATES):
        context.is_disconnect = True


class ServerWait:
    """Makes an engine's new connections wait for a database server that refuses them.

    `attach(engine)` hooks SQLAlchemy's `do_connect`: a connection refused by the server (it is
    down, shutting down or starting up: the driver's `OperationalError`) is tried again after
    0.5, 1, 2, 2, ... s, until `timeout` seconds after the first refusal of the outage; then
    `ServerUnavailableError`, at once for every later connection until one succeeds. The outage
    and its end are told to `on_wait` once each (default: a warning on stderr), and
    `back_within` says whether one ended lately. Thread-safe: a worker's heartbeat thread and its
    main thread share one engine."""

    def __init__(self, what: str, url: str, timeout: float,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.what, self.url, self.timeout = what, url, timeout
        self._tell = on_wait or (lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._back_at: float | None = None  # when the last outage ended

    def back_within(self, seconds: float) -> bool:
        """Whether the server came back from an outage (that this engine saw) in the last
        `seconds`."""
        back_at = self._back_at
        return back_at is not None and time.monotonic() - back_at < seconds

    def attach(self, engine: sqlalchemy.Engine) -> sqlalchemy.Engine:
        """Hook this wait into `engine`'s connections (from now on); returns the engine. A session
        the server ends while SQLAlchemy sets it up counts as a lost connection too
        (`ended_while_opened`)."""
        sqlalchemy.event.listen(engine, "do_connect", self._connect)
        sqlalchemy.event.listen(engine, "handle_error", ended_while_opened)
        return engine

    def _connect(self, dialect: Any, record: Any, cargs: tuple, cparams: dict) -> Any:
        delay = FIRST_DELAY
        while True:
            try:
                connection = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as err:
                now = time.monotonic()
                with self._lock:
                    if self._down_since is None:
                        self._down_since = now
                        self._tell(f"{self.what} at {redact_url(self.url)} does not answer "
                                   f"({redact_text(first_line(err), self.url)}); "
                                   f"waiting up to {self.timeout:.0f} s for it")
                    down_since = self._down_since
                left = down_since + self.timeout - now
                if left <= 0:
                    raise unavailable(self.what, self.url, now - down_since, err) from None
                time.sleep(min(delay, left))
                delay = min(2 * delay, MAX_DELAY)
                continue
            with self._lock:
                if self._down_since is not None:
                    self._tell(f"{self.what} at {redact_url(self.url)} answers again after "
                               f"{time.monotonic() - self._down_since:.0f} s")
                    self._down_since, self._back_at = None, time.monotonic()
            return connection
