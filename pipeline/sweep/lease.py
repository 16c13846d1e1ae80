"""Exactly-once work among workers on one or several machines: a lease is a lock that the database
server (PostgreSQL) or this machine's kernel (SQLite) holds for a live process and drops when that
process dies, so no clock, heartbeat or grace period decides who holds it.

- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on a 64-bit key hashed from
  the lease's name, taken on a connection of the lease's own that stays open for the lease's life.
  The server releases it when that session ends: at once when the holder's process dies (its
  kernel closes the connection); after about a minute when the holder's machine or network is gone
  (TCP keepalive, set for the session: `SERVER_SETTINGS`); never while the holder is merely paused
  (a stopped process's kernel still answers keepalives, so nobody takes over a live holder).
- SQLite, one machine by definition: `flock` on `<database>.lease-<name>-<hash>.lock` beside the
  database file, released by the kernel when the process dies. The file is created when first
  needed and never deleted, since deleting a lock file lets a worker that opened it before and one
  that opens the new file both hold "the" lock. (SQLite on a network file system is unsupported by
  SQLite itself.)
- Any other storage (MySQL, an in-memory SQLite, a storage that is no RDB storage) is refused with
  `LeaseUnsupportedError`: it offers no lock here that dies with its holder.

Fencing: a lock can be lost while its holder works on (PostgreSQL: the session was ended by an
administrator, a server restart or a network cut longer than keepalive allows; SQLite: the lock
file was removed or replaced). `Lease.verify()` then raises `LeaseLostError`; callers call it right
before they record work done under the lease and record nothing when it raises. The window left is
the time between `verify()` returning and the record being written: a holder that stalls exactly
there for longer than the server needs to drop its session (about a minute, for a vanished
machine) may still record after another worker took over. Optuna writes through its own
connections, so the record cannot be made conditional on the lock within one transaction.
A server restart ends every session: each holder's `verify()` then raises `LeaseLostError` (the
lock is free and another worker may take it at once), and whoever holds the lease next checks
whether the work was recorded and does it if not; workers that were only waiting for a lease
reconnect (waiting for the server, `pipeline.retry.ServerWait`) and wait on.

A process forked while holding a lease (not one started by `subprocess`/spawn: those inherit no
descriptor) shares its lock, which then lives until both have exited.

Hand-written: neither Optuna, SQLAlchemy nor the standard library offers a lease; this is a thin
layer over PostgreSQL's advisory locks and the kernel's `flock`.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy.engine import URL

from pipeline.errors import EXIT_BAD_INPUT, PipelineError
from pipeline.retry import ServerWait, first_line

POLL_SECONDS = 0.25  # between tries while another worker holds the lease
LEASE_MARK = ":lease:"
KEY_PERSONALISATION = b"synops-lease"  # hashes lease names apart from any other use of blake2b
FILE_NAME_CHARS = 100  # of the lease's name in its lock file's name (a hash keeps names apart)
# Set on the lease's PostgreSQL session where the server knows them: the server ends a session
# whose peer has been silent for 30 + 3 * 10 s (a machine or network gone; a paused process still
# answers), and never for being idle (a server-wide idle_session_timeout would end the lease).
SERVER_SETTINGS = {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10",
                   "tcp_keepalives_count": "3", "idle_session_timeout": "0"}
# libpq's options for the lease's own connection (psycopg and psycopg2 use libpq): connecting
# gives up after 10 s, and a query to a server that went silent fails after 60 s instead of the
# kernel's ~15 min of retransmissions, so `verify()` answers.
LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg2"})
LIBPQ_OPTIONS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
                 "keepalives_interval": 10, "keepalives_count": 3, "tcp_user_timeout": 60_000}
# pg_locks shows a bigint advisory key as its high and low 32 bits (objsubid 1), per database.
OUR_LOCK = ("l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = :high"
            " AND l.objid::bigint = :low"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")
SET_IF_KNOWN = sqlalchemy.text("SELECT set_config(name, :value, false) FROM pg_settings WHERE name = :name")
TRY_LOCK = sqlalchemy.text("SELECT pg_try_advisory_lock(:key)")
STILL_HELD = sqlalchemy.text(f"SELECT EXISTS (SELECT 1 FROM pg_locks l WHERE {OUR_LOCK}"
                             " AND l.pid = pg_backend_pid())")
HELD_BY = sqlalchemy.text("SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a"
                          f" ON a.pid = l.pid WHERE {OUR_LOCK}")


class LeaseTimeoutError(PipelineError, TimeoutError):
    """Another worker held the lease, alive, for longer than this worker would wait."""


class LeaseLostError(PipelineError):
    """This worker no longer holds its lease: another may be doing the same work, so the result of
    this one must not be recorded."""


class LeaseUnsupportedError(PipelineError, ValueError):
    """The storage offers no lock that dies with its holder: leases need a SQLite file or
    PostgreSQL."""

    exit_code = EXIT_BAD_INPUT


def lease_name(study_name: str, what: str) -> str:
    """The name of the study's lease on `what` (e.g. `prepare`): unique per study and task."""
    return f"{study_name}{LEASE_MARK}{what}"


def holder() -> str:
    """Who holds a lease (in its SQLite lock file, or as PostgreSQL's application_name) or runs a
    trial, for people reading them: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease(abc.ABC):
    """A lease this worker holds for the `with lease(...)` block. Call `verify()` right before
    recording work done under it."""

    def __init__(self, name: str, where: str) -> None:
        self.name = name
        self.where = where  # the database or lock file, password redacted

    @abc.abstractmethod
    def verify(self) -> None:
        """Check that this worker still holds the lease, for the caller about to record its work.

        Raises `LeaseLostError` when the lock is gone: another worker may hold it and do the same
        work, so this worker must not record its result."""

    @abc.abstractmethod
    def _try_take(self) -> bool:
        """Take the lock if it is free: whether this worker holds it now."""

    @abc.abstractmethod
    def _held_by(self) -> str | None:
        """Who holds the lock, when that can be read: for the message of a wait that timed out."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Let the lock go (whether or not it was taken or is still held)."""

    def _lost(self, why: str) -> LeaseLostError:
        return LeaseLostError(f"this worker lost the lease '{self.name}' ({why}); another worker may "
                              "be doing the same work, so its result must not be recorded")


def _key_digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=8, person=KEY_PERSONALISATION).digest()


class _AdvisoryLease(Lease):
    """PostgreSQL's session-level advisory lock, on a connection (and engine) of its own."""

    def __init__(self, name: str, url: URL, timeout: float) -> None:
        super().__init__(name, url.render_as_string(hide_password=True))
        self._key = int.from_bytes(_key_digest(name), "big", signed=True)
        self._halves = {"high": (self._key >> 32) & 0xFFFFFFFF, "low": self._key & 0xFFFFFFFF}
        options = LIBPQ_OPTIONS if url.get_driver_name() in LIBPQ_DRIVERS else {}
        # AUTOCOMMIT: the session holds the lock, never an open transaction.
        self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                                isolation_level="AUTOCOMMIT", connect_args=options)
        # Connecting waits (up to the lease's timeout) for a server that restarts meanwhile.
        ServerWait("the lease's database", self.where, timeout).attach(self._engine)
        self._connection: sqlalchemy.Connection | None = None
        self._ended: str | None = None  # why the session ended, once `verify` found out

    def _try_take(self) -> bool:
        try:
            if self._connection is None:
                self._connection = self._engine.connect()
                for setting, value in (SERVER_SETTINGS | {"application_name": holder()}).items():
                    self._connection.execute(SET_IF_KNOWN, {"name": setting, "value": value})
            return bool(self._connection.execute(TRY_LOCK, {"key": self._key}).scalar())
        except sqlalchemy.exc.DBAPIError as err:
            if not err.connection_invalidated:
                raise
            # The server ended this session (a restart) while it waited, or while it was being
            # opened (`ended_while_opened`): nothing was held on it, so the next try waits on a
            # new one.
            self._close()
            return False

    def verify(self) -> None:
        """Check that this worker still holds the lease: its session is alive and pg_locks shows
        the lock granted to it.

        Raises `LeaseLostError` when the session ended (the connection fails) or the lock is gone."""
        if self._ended is not None:
            raise self._lost(self._ended)
        try:
            held = self._connection.execute(STILL_HELD, self._halves).scalar()
        except sqlalchemy.exc.SQLAlchemyError as err:
            self._ended = f"its session on {self.where} ended: {first_line(err)}"
            raise self._lost(self._ended) from err
        if not held:
            raise self._lost(f"{self.where} no longer shows its lock")

    def _held_by(self) -> str | None:
        if self._connection is None:
            return None
        return self._connection.execute(HELD_BY, self._halves).scalar()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()  # ending the session releases the lock
            self._connection = None

    def _release(self) -> None:
        self._close()
        self._engine.dispose()


class _FileLease(Lease):
    """The kernel's `flock` on a lock file beside the SQLite database."""

    def __init__(self, name: str, database: Path) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:FILE_NAME_CHARS]
        self.path = database.with_name(f"{database.name}.lease-{safe}-{_key_digest(name).hex()}.lock")
        super().__init__(name, str(self.path))
        self._descriptor: int | None = None

    def _try_take(self) -> bool:
        if self._descriptor is None:
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not self._still_the_file():  # removed or replaced while this worker waited on it
            self._release()  # the next try opens the file that is there now
            return False
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, holder().encode(), 0)
        return True

    def _still_the_file(self) -> bool:
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(self._descriptor)
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def verify(self) -> None:
        """Check that this worker still holds the lease. The kernel keeps the lock as long as this
        process lives, so the one way to lose it is the lock file being removed or replaced (a new
        file would let another worker in).

        Raises `LeaseLostError` when the lock file is no longer the one this worker locked."""
        if not self._still_the_file():
            raise self._lost(f"its lock file {self.path} was removed or replaced")

    def _held_by(self) -> str | None:
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or None
        return None

    def _release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the file releases its lock
            self._descriptor = None


def _storage_url(storage: BaseStorage | str) -> URL:
    """The SQLAlchemy URL of an RDB storage or storage URL; never shown with its password."""
    if isinstance(storage, RDBStorage):
        return storage.engine.url
    if not isinstance(storage, str):
        raise LeaseUnsupportedError(f"a lease needs a SQLite file or PostgreSQL, not a "
                                    f"{type(storage).__name__}")
    try:
        return sqlalchemy.engine.make_url(storage)
    except sqlalchemy.exc.ArgumentError:  # its message quotes the URL, password and all
        raise LeaseUnsupportedError("the storage URL cannot be read (not shown: it may hold a "
                                    "password); a lease needs a SQLite file or PostgreSQL") from None


def _lease_for(storage: BaseStorage | str, name: str, timeout: float) -> Lease:
    url = _storage_url(storage)
    if url.get_backend_name() == "postgresql":
        return _AdvisoryLease(name, url, timeout)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return _FileLease(name, Path(url.database).resolve())
    raise LeaseUnsupportedError(f"no lease on the storage {url.render_as_string(hide_password=True)}: "
                                "a lease needs a SQLite file or PostgreSQL, whose locks die with "
                                "their holder (a shared study needs PostgreSQL)")


@contextlib.contextmanager
def lease(storage: BaseStorage | str, name: str, timeout: float,
          on_wait: Callable[[str], None] | None = None,
          should_stop: Callable[[], bool] = lambda: False) -> Iterator[Lease]:
    """Hold the lease `name` on `storage` (an Optuna RDB storage, or its URL) for the block, so
    that one worker at a time does the work it guards; yields the `Lease`, whose `verify()` the
    block calls right before recording its work. Waits, polling, while another live worker holds
    it; `on_wait` gets one line when this worker starts waiting. Work done under a lease must still
    check whether an earlier holder already did it.

    Raises `LeaseTimeoutError` after `timeout` seconds of waiting, KeyboardInterrupt when
    `should_stop()` turns true while waiting, `LeaseUnsupportedError` for a storage other than a
    SQLite file or PostgreSQL, `ServerUnavailableError` when PostgreSQL refuses connections for
    `timeout` seconds (a server that restarts meanwhile is waited for: a waiting worker holds
    nothing, so it reconnects and waits on), and the database's other errors."""
    held = _lease_for(storage, name, timeout)
    try:
        deadline = time.monotonic() + timeout
        told = False
        while not held._try_take():
            if should_stop():
                raise KeyboardInterrupt(f"stop requested while waiting for {name}")
            if time.monotonic() > deadline:
                by = held._held_by()
                raise LeaseTimeoutError(
                    f"waited {timeout:.0f} s for another worker{f' ({by})' if by else ''} to finish "
                    f"'{name}'; it still holds the lease on {held.where}: raise study.wait_timeout, "
                    "or look at that worker's log")
            if on_wait is not None and not told:
                on_wait(f"waiting for another worker to finish '{name}'")
                told = True
            time.sleep(POLL_SECONDS)
        yield held
    finally:
        held._release()
