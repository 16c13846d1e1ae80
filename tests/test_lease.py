"""The lease that makes shared work happen once, on real storages: SQLite files and a PostgreSQL
server started here on loopback, with worker processes that race for it, are paused (SIGSTOP) and
are killed (SIGKILL) while they hold it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy

from pipeline.services import (
    Services,
    _start_postgres,  # PostgreSQL alone: start_services would also start MLflow (~25 s)
    _stop_postgres,
    free_port,
    postgres_bin,
)
from pipeline.sweep.lease import (
    LeaseLostError,
    LeaseTimeoutError,
    LeaseUnsupportedError,
    holder,
    lease,
    lease_name,
)
from tests.conftest import next_session_ended, on_every_new_session, postgres_missing
from tests.lease_worker import URL_VARIABLE

# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = pytest.mark.xdist_group(__name__)

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ROUNDS = 12  # per racing worker
PAUSE_SECONDS = 3  # a holder stopped this long outlived the old lease's grace period (1 s here)
PROMPT_SECONDS = 2  # a lease whose holder died is free within this


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """Optuna's database on a PostgreSQL cluster of its own (under /tmp: as root it runs as
    `postgres`, which must be able to enter the folder), removed afterwards."""
    missing = postgres_missing()
    if missing is not None:
        pytest.skip(f"no PostgreSQL binaries here: {missing}")
    folder = Path(tempfile.mkdtemp(prefix="synops-lease-"))
    folder.chmod(0o755)
    password, port = secrets.token_urlsafe(12), free_port(HOST)
    try:
        _start_postgres(postgres_bin(install=False, echo=print), folder, HOST, port, password)
        yield Services(str(folder), HOST, port, 0, password, mlflow_pid=0).storage_url
    finally:
        _stop_postgres(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The storage URL every worker of a test is given."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A lease of the test's own: PostgreSQL's database is shared by the module's tests."""
    return lease_name("s", request.node.name)


def worker(url: str, *arguments: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.lease_worker", *arguments], cwd=ROOT,
                            env=os.environ | {URL_VARIABLE: url}, text=True, **popen)


@contextlib.contextmanager
def holding(url: str, name: str) -> Iterator[subprocess.Popen]:
    """A worker process that holds the lease `name` (until a line on its stdin); never left
    running, not even stopped."""
    child = worker(url, "hold", name, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        child.kill()
        child.wait()


def no_overlap(lines: list[str]) -> None:
    """Each `start` mark is followed by the same worker's `end` before any other mark."""
    inside = None
    for number, line in enumerate(lines):
        what, pid = line.split()
        if what == "start":
            assert inside is None, f"line {number}: {pid} started while {inside} held the lease"
            inside = pid
        else:
            assert inside == pid, f"line {number}: {pid} ended, but {inside} held the lease"
            inside = None


@pytest.mark.slow  # ~8 s: each racer stalls once for 2.5 s while it holds the lease
def test_racing_processes_hold_the_lease_one_at_a_time(url: str, name: str, tmp_path: Path) -> None:
    log = tmp_path / "race.log"
    racers = [worker(url, "race", name, str(log), str(ROUNDS), stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE) for _ in range(2)]
    try:
        assert [racer.stdout.readline() for racer in racers] == ["ready\n"] * 2
        for racer in racers:  # started together, however long each took to import
            racer.stdin.write("go\n")
            racer.stdin.flush()
        codes = [racer.wait(timeout=120) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    assert codes == [0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * 2 * ROUNDS
    no_overlap(lines)
    assert {line.split()[1] for line in lines} == {str(racer.pid) for racer in racers}
    # a lease is no Optuna study: the storage holds none
    assert optuna.get_all_study_summaries(url) == []


def test_a_paused_holder_is_not_taken_over(url: str, name: str) -> None:
    """A holder stopped (a GC pause, a laptop lid, a debugger) for longer than the old grace
    period keeps its lease: the other worker waits, and gets it once the holder has resumed and
    released it; the holder still holds it when it resumes."""
    with holding(url, name) as child:
        os.kill(child.pid, signal.SIGSTOP)
        try:
            with pytest.raises(LeaseTimeoutError) as waited, lease(url, name, timeout=PAUSE_SECONDS):
                pass
        finally:
            os.kill(child.pid, signal.SIGCONT)
        password = sqlalchemy.engine.make_url(url).password
        assert not password or password not in str(waited.value)
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.stdout.readline() == "verified\n"
        assert child.wait(timeout=30) == 0
        with lease(url, name, timeout=PROMPT_SECONDS):
            pass


def test_a_killed_holder_releases_the_lease_at_once(url: str, name: str) -> None:
    with holding(url, name) as child:
        child.send_signal(signal.SIGKILL)
        child.wait()
        started = time.monotonic()
        with lease(url, name, timeout=30):
            waited = time.monotonic() - started
    assert waited < PROMPT_SECONDS


def test_a_holder_whose_database_session_ended_cannot_record(postgres_url: str, name: str) -> None:
    """PostgreSQL ends the holder's session (an administrator, a server restart, a network cut
    that outlived TCP keepalive): `verify` says so, and the lease is free for another worker."""
    admin = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with lease(postgres_url, name, timeout=PROMPT_SECONDS) as held:
            held.verify()
            with admin.connect() as connection:
                ended = connection.execute(sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted")).scalars().all()
            assert ended == [True]
            with lease(postgres_url, name, timeout=PROMPT_SECONDS):
                pass  # free again at once
            with pytest.raises(LeaseLostError, match="must not be recorded") as lost:
                held.verify()
    finally:
        admin.dispose()
    assert sqlalchemy.engine.make_url(postgres_url).password not in str(lost.value)


@pytest.mark.parametrize("event", ["first_connect", "connect"])
def test_a_session_the_server_ends_before_the_lock_is_asked_for_is_opened_again(
        postgres_url: str, name: str, event: str) -> None:
    """A PostgreSQL shutting down (a restart) can end a waiting worker's new session right after
    it connected, while SQLAlchemy sets it up. Nothing is held on it yet: the worker connects
    again and takes the lease, no traceback (seen on a fresh clone: a worker died in
    `claim_worker_number`)."""
    with next_session_ended(event) as ended, lease(postgres_url, name, timeout=PROMPT_SECONDS) as held:
        held.verify()
    assert ended == [event]


def test_a_query_refused_while_a_session_is_opened_is_an_error_not_a_restart(
        postgres_url: str, name: str) -> None:
    """Only a session the server ended counts as one to open again: a query it refused while the
    session was set up (here a statement timeout) is raised at once, not waited out."""
    def cancelled(dbapi_connection: psycopg.Connection, record: object) -> None:
        dbapi_connection.execute("SET statement_timeout = 1")
        dbapi_connection.execute("SELECT pg_sleep(1)")

    started = time.monotonic()
    with on_every_new_session("connect", cancelled), \
            pytest.raises(sqlalchemy.exc.OperationalError, match="statement timeout"), \
            lease(postgres_url, name, timeout=5 * PROMPT_SECONDS):
        pass
    assert time.monotonic() - started < PROMPT_SECONDS


def test_a_holder_whose_lock_file_was_removed_cannot_record(tmp_path: Path, name: str) -> None:
    """On SQLite the kernel holds the lock for the holder's life; removing the lock file is the
    one way to lose it (a new file would let another worker in): `verify` notices."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with lease(url, name, timeout=PROMPT_SECONDS) as held:
        held.verify()
        (lock_file,) = tmp_path.glob("optuna.db.lease-*.lock")
        lock_file.unlink()
        with pytest.raises(LeaseLostError, match="must not be recorded"):
            held.verify()


def storage(folder: Path) -> optuna.storages.RDBStorage:
    """Each worker opens its own connection to the shared file, as processes would."""
    return optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}",
                                      engine_kwargs={"connect_args": {"timeout": 60}})


def test_threads_given_storages_do_the_work_one_at_a_time_and_once(tmp_path: Path) -> None:
    """As the pipeline's callers do: each worker passes its Optuna storage."""
    storage(tmp_path)  # the tables exist before the race, as after `prepare_study`
    done: list[int] = []
    finished: list[int] = []
    inside, most_inside = [0], [0]
    lock = threading.Lock()
    start = threading.Barrier(4)

    def work(number: int) -> None:
        mine = storage(tmp_path)
        start.wait()
        with lease(mine, "s:lease:prepare", timeout=60) as held:
            with lock:
                inside[0] += 1
                most_inside[0] = max(most_inside[0], inside[0])
            if not done:  # the check every holder makes: did another do it already?
                time.sleep(0.5)
                held.verify()
                done.append(number)
            with lock:
                inside[0] -= 1
        finished.append(number)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(finished) == [0, 1, 2, 3]  # no worker failed
    assert len(done) == 1 and most_inside[0] == 1
    assert optuna.get_all_study_summaries(storage(tmp_path)) == []  # a lease is no Optuna study


@contextlib.contextmanager
def held_by_a_thread(url: str, name: str) -> Iterator[None]:
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lease(url, name, timeout=30):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert holding.wait(30)
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_waiting_on_a_live_holder_is_bounded_with_a_clear_error(tmp_path: Path, name: str) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    lines: list[str] = []
    with held_by_a_thread(url, name):
        started = time.monotonic()
        with pytest.raises(LeaseTimeoutError, match="study.wait_timeout") as waited, lease(
                url, name, timeout=2, on_wait=lines.append):
            pass
        assert 2 <= time.monotonic() - started < 4
    assert holder() in str(waited.value)  # who to ask: this process's thread
    assert lines == [f"waiting for another worker to finish '{name}'"]
    with lease(url, name, timeout=PROMPT_SECONDS):
        pass  # free again once released


def test_a_stop_request_ends_the_wait(tmp_path: Path, name: str) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    asked = []

    def should_stop() -> bool:
        asked.append(True)
        return len(asked) > 2

    with held_by_a_thread(url, name), pytest.raises(KeyboardInterrupt, match=name), lease(
            url, name, timeout=30, should_stop=should_stop):
        pass
    assert len(asked) == 3


@pytest.mark.parametrize("unsupported", [
    "mysql+pymysql://synops:s3cret-pw@db.example/optuna",  # no lock that dies with its holder here
    "sqlite://",  # in memory: no other process can share it
    "sqlite:///:memory:",
])
def test_a_storage_without_a_suitable_lock_is_refused_clearly(unsupported: str) -> None:
    with pytest.raises(LeaseUnsupportedError, match="SQLite file or PostgreSQL") as refused, lease(
            unsupported, "s:lease:prepare", timeout=1):
        pass
    assert "s3cret-pw" not in str(refused.value)
