"""Server faults during a study shared by worker processes: a real PostgreSQL and `mlflow server` on
loopback (started here, as in tests/test_distributed.py), each restarted while three workers run
trials; lease holders paused (SIGSTOP) for longer than the grace period; an artifact store that is
full. Each study must still end with `n_trials` distinct COMPLETE trials, nothing RUNNING, one
parent run, one base model per variant and one confirmation per front member and seed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.config import load_config
from pipeline.front import CONFIRM_RESULT_PREFIX, study_bases
from pipeline.retry import ServerUnavailableError, ServerWait
from pipeline.services import (
    Services,
    free_port,
    restart_mlflow,
    restart_postgres,
)
from pipeline.sweep.lease import _key_digest, lease_name
from pipeline.sweep.storage import open_storage
from pipeline.sweep.workers import run_sweep
from pipeline.tracking import Tracker
from tests.conftest import (
    EXPERIMENTS,
    make_idx_dataset,
    next_session_ended,
    postgres_missing,
    running_services,
    server_storage,
    smoke_overrides,
)

# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = pytest.mark.xdist_group(__name__)

N_TRIALS = 6
HEARTBEAT, GRACE = 1, 5  # seconds: study.heartbeat_interval and study.grace_period of the workers;
# a worker waiting for a restarted server reconnects within 2 s, its heartbeat then due: 5 s leaves
# room for two busy cores
PAUSE = 2 * GRACE  # a paused lease holder stays stopped this long
DOWNTIME = 2  # seconds each server stays down
WORKERS = 3
MLFLOW_WORKERS = 1  # the MLflow server's: one starts in ~20 s on two busy cores, two in ~30 s
STUDY_TIMEOUT = 400  # seconds for a whole study of three workers

needs_postgres = pytest.mark.skipif(
    postgres_missing() is not None,
    reason="PostgreSQL is not installed here (CI's .ci/run installs Debian's postgresql)")


@pytest.fixture(scope="module")
def servers() -> Iterator[Services]:
    """Both servers, for the module's tests."""
    with running_services("synops-faults-", mlflow_workers=MLFLOW_WORKERS) as services:
        yield services


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated images every worker reads (each study's workers share it, read-only)."""
    return make_idx_dataset(tmp_path_factory.mktemp("faults-data"), train=1200, test=200)


class Machines:
    """`WORKERS` worker processes (`synops sweep` on the smoke config), each in a folder of its own
    with its own log, sharing only the two servers' URLs and the data."""

    def __init__(self, services: Services, name: str, data_root: Path, folder: Path) -> None:
        self.services, self.name = services, name
        sets = {"name": name, "data.root": str(data_root), "data.verify_checksums": "false",
                "data.val_size": "100", "study.n_trials": str(N_TRIALS),
                "study.heartbeat_interval": str(HEARTBEAT), "study.grace_period": str(GRACE)}
        self.command = [sys.executable, "-m", "pipeline", "sweep", "--quiet",
                        "--config", str(EXPERIMENTS / "smoke.toml"),
                        "--storage", services.worker_storage_url, "--tracking-uri", services.tracking_uri,
                        *[f"--set={k}={v}" for k, v in sets.items()]]
        self.folders = [folder / f"machine-{i}" for i in range(WORKERS)]
        self.processes: list[subprocess.Popen] = []
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> Machines:
        self.storage = self.stack.enter_context(server_storage(self.services.storage_url))
        env = os.environ | {"OMP_NUM_THREADS": "1", "PGPASSFILE": str(self.services.pgpass_file)}
        for folder in self.folders:
            folder.mkdir(parents=True)
            with open(folder / "sweep.log", "w") as log:
                self.processes.append(subprocess.Popen(self.command, cwd=folder, env=env, stdout=log,
                                                       stderr=subprocess.STDOUT))
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:  # never left running
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                process.wait()
        self.stack.close()

    def output(self) -> str:
        return "\n".join(f"--- {folder.name}\n{(folder / 'sweep.log').read_text()}"
                         for folder in self.folders)

    def wait(self) -> list[int]:
        """Every worker's exit code, once all have exited."""
        deadline = time.monotonic() + STUDY_TIMEOUT
        for process in self.processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the workers did not finish: {self.output()[-8000:]}") from None
        return [p.returncode for p in self.processes]

    def until(self, what: str, condition: Callable[[], object]) -> object:
        """Poll `condition` until it returns something true, and return that; fails the test if
        the workers all exit or it takes too long."""
        deadline = time.monotonic() + STUDY_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(KeyError):  # the study does not exist yet
                found = condition()
                if found:
                    return found
            if all(p.poll() is not None for p in self.processes):
                raise AssertionError(f"the workers exited before {what}: {self.output()[-8000:]}")
            time.sleep(0.1)
        raise AssertionError(f"not seen in time: {what}: {self.output()[-8000:]}")

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.storage)


def complete(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def training(study: optuna.Study) -> bool:
    """Whether a fine-tuning trial is running, its MLflow run opened."""
    return any(t.params and "mlflow_run_id" in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def lease_holders(services: Services) -> dict[int, int]:
    """The leases held now: advisory lock key (a signed 64-bit number, as the lease takes it) ->
    its holder's process id (the application name a lease sets is `host:pid`)."""
    with psycopg.connect(host=services.host, port=services.postgres_port, user="synops",
                         password=services.password, dbname="optuna", autocommit=True) as connection:
        rows = connection.execute(
            "SELECT (l.classid::bigint << 32) | l.objid::bigint, a.application_name FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
        ).fetchall()
    return {key: int(holder.rsplit(":", 1)[1]) for key, holder in rows if ":" in holder}


def lease_key(study: str, what: str) -> int:
    """The advisory lock key of a study's lease on `what` (pg_locks shows its two halves)."""
    return int.from_bytes(_key_digest(lease_name(study, what)), "big", signed=True)


def holder_of(services: Services, keys: set[int]) -> int | None:
    """The process id of the worker holding one of the leases `keys`, or None."""
    return next((pid for key, pid in lease_holders(services).items() if key in keys), None)


def base_leases(study: str) -> set[int]:
    """The keys of the study's leases on its base models (smoke.toml: two encodings)."""
    return {lease_key(study, f"base-spikes_per_pixel={s}") for s in (255, 15)}


def check_the_study(services: Services, name: str, output: str) -> optuna.Study:
    """What every study must hold at its end, whatever happened to its servers and workers."""
    final = optuna.load_study(study_name=name, storage=services.storage_url)
    trials = final.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == N_TRIALS, output[-8000:]
    params = [json.dumps(t.params, sort_keys=True) for t in done]
    assert len(set(params)) == len(params)  # distinct: no proposal finished twice
    assert [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
    assert sum(1 for t in done if t.user_attrs.get("reference")) == 1

    client = MlflowClient(services.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    roles = Counter(r.data.tags.get("synops.role") for r in runs)
    assert [(r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"] == []
    (parent,) = [r for r in runs if r.data.tags.get("synops.role") == "study"]
    assert parent.info.status == "FINISHED"
    bases = [r for r in runs if r.data.tags.get("synops.role") == "base"]
    assert sorted(r.info.run_id for r in bases) == sorted(b.run_id for b in study_bases(final).values())
    assert roles["base"] == len({b.variant for b in study_bases(final).values()})  # one per variant
    assert "base-unusable" not in roles
    for trial in done:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert (run.info.status, run.data.tags["mlflow.parentRunId"]) == ("FINISHED", parent.info.run_id)
    confirmations = [r for r in runs if r.data.tags.get("synops.role") == "confirmation"]
    pairs = Counter((r.data.tags["synops.confirms_trial"], r.data.tags["synops.seed"]) for r in confirmations)
    assert confirmations and max(pairs.values()) == 1, pairs  # no duplicate confirmation
    recorded = [k for k in final.user_attrs if k.startswith(CONFIRM_RESULT_PREFIX)]
    assert len(recorded) == len(confirmations)
    assert all(r.info.status == "FINISHED" for r in confirmations)

    logs = [output, *(p.read_text(errors="replace") for p in Path(services.folder).rglob("*.log"))]
    assert not any(services.password in log for log in logs)
    return final


@pytest.mark.slow
@needs_postgres
def test_a_study_survives_restarts_of_postgres_and_of_the_mlflow_server(
    servers: Services, data_root: Path, tmp_path: Path
) -> None:
    """PostgreSQL (Optuna's storage, the leases and MLflow's backend store) is stopped for
    `DOWNTIME` s and started again on its port while a worker trains a base model under its
    lease, and later the MLflow server, while trials train: the workers wait for the servers,
    the lease is taken again (its work recorded once), and the study ends as if nothing had
    happened: no trial failed, none taken for dead, no traceback."""
    name = "faults-restart"
    with Machines(servers, name, data_root, tmp_path) as machines:
        machines.until("a worker trains a base model, and none prepares the study", lambda: (
            (held := lease_holders(servers)) and set(held) <= base_leases(name)))
        restart_postgres(Path(servers.folder), downtime=DOWNTIME, echo=lambda line: None)
        after = complete(machines.study())
        machines.until("another trial finishes and one trains",
                       lambda: complete(s := machines.study()) > after and training(s))
        restart_mlflow(Path(servers.folder), downtime=DOWNTIME, mlflow_workers=MLFLOW_WORKERS)
        codes = machines.wait()
        output = machines.output()
    assert codes == [0] * WORKERS, output[-8000:]
    final = check_the_study(servers, name, output)
    assert [t.number for t in final.trials if t.state != TrialState.COMPLETE] == [], output[-8000:]
    assert "Traceback" not in output, output[-8000:]
    assert "the Optuna storage at" in output and "does not answer" in output  # the restart was seen


@pytest.mark.slow
@needs_postgres
def test_lease_holders_paused_past_the_grace_period_keep_their_leases(
    servers: Services, data_root: Path, tmp_path: Path
) -> None:
    """The worker training a base model and then the one confirming the front are stopped
    (SIGSTOP) for twice the grace period while holding their lease: nobody takes it over, the
    others wait, and after SIGCONT the study holds one base per variant and no confirmation
    twice."""
    name = "faults-pause"
    with Machines(servers, name, data_root, tmp_path) as machines:
        for what, keys in (("a base model's lease", base_leases(name)),
                           ("the confirmation lease", {lease_key(name, "confirm")})):
            pid = machines.until(f"a worker holds {what}", lambda keys=keys: holder_of(servers, keys))
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(PAUSE)
                assert pid in lease_holders(servers).values()  # still its lease
            finally:
                os.kill(pid, signal.SIGCONT)
        codes = machines.wait()
        output = machines.output()
    assert codes == [0] * WORKERS, output[-8000:]
    check_the_study(servers, name, output)


@pytest.mark.slow
def test_a_full_artifact_store_fails_the_trial_with_its_reason_and_the_study_goes_on(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logging a checkpoint fails with ENOSPC twice (the disk is full, then space is freed): those
    trials are FAILED with the reason, their runs too, and the study goes on to `n_trials`."""
    full = {"left": 2}
    log_artifact = LocalArtifactRepository.log_artifact

    def fill_up(self: LocalArtifactRepository, local_file: str, artifact_path: str | None = None) -> None:
        run_id = Path(self.artifact_dir).parent.name  # <experiment>/<run>/artifacts
        if (Path(local_file).name == "state_dict.pt" and full["left"]
                and MlflowClient(tracking).get_run(run_id).data.tags["synops.role"] == "trial"):
            full["left"] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        log_artifact(self, local_file, artifact_path)

    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", fill_up)
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(data_root) | {"study.confirm_seeds": 0})
    study = run_sweep(config, storage, tracking, progress=False, echo=lambda line: None)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == config.study.n_trials
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 2
    client = MlflowClient(tracking)
    for trial in failed:
        assert "No space left on device" in trial.user_attrs["fail_reason"]
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert "No space left on device" in run.data.tags["synops.failure_reason"]
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []


@pytest.mark.slow
@needs_postgres
def test_a_worker_that_saw_no_outage_takes_no_trial_for_dead_while_the_database_restarted(
    servers: Services,
) -> None:
    """A running trial's heartbeat is held up for longer than the grace period by a PostgreSQL
    restart. A worker that connects only after the restart (it saw no outage) must not fail that
    trial while the server has been up for less than the grace period: its worker had no chance to
    heartbeat. Once that has passed with no heartbeat, the trial is dead and is failed."""
    grace = GRACE
    config = load_config(EXPERIMENTS / "smoke.toml", {"name": "faults-fresh-eyes",
                                                      "study.heartbeat_interval": 1,
                                                      "study.grace_period": grace})
    holder = open_storage(servers.storage_url, config)
    study = optuna.create_study(study_name=config.name, storage=holder, directions=["maximize", "minimize"])
    trial = study.ask()
    holder.record_heartbeat(trial._trial_id)
    holder.engine.dispose()  # the holder falls silent, as a worker cut off by the restart
    restart_postgres(Path(servers.folder), downtime=grace + 1, echo=lambda line: None)

    fresh = open_storage(servers.storage_url, config)
    try:
        seen = optuna.load_study(study_name=config.name, storage=fresh)
        optuna.storages.fail_stale_trials(seen)
        assert seen.get_trials(deepcopy=False)[0].state == TrialState.RUNNING
        time.sleep(grace + 1)
        optuna.storages.fail_stale_trials(seen)
        assert seen.get_trials(deepcopy=False)[0].state == TrialState.FAIL
    finally:
        fresh.engine.dispose()


@needs_postgres
def test_a_session_the_server_ends_while_it_is_opened_costs_the_storage_nothing(
    servers: Services,
) -> None:
    """A PostgreSQL shutting down for a restart can end a new session right after the driver
    connected, while SQLAlchemy sets it up: the storage takes that as the lost connection it is,
    and a harmless operation runs again on a new session (seen first on a lease, whose worker
    died of it)."""
    storage = open_storage(servers.storage_url, load_config(EXPERIMENTS / "smoke.toml"))
    try:
        before = storage.get_all_studies()
        storage.engine.dispose()  # the next operation opens a new session
        with next_session_ended("connect") as ended:
            assert storage.get_all_studies() == before
    finally:
        storage.engine.dispose()
    assert ended == ["connect"]


def test_a_database_that_stays_down_is_waited_for_then_named_without_its_password() -> None:
    """Connections wait for a refusing database server up to the bound, then fail with
    `ServerUnavailableError` naming it (password redacted), and later ones fail at once."""
    url = f"postgresql+psycopg://synops:secret-pw@127.0.0.1:{free_port('127.0.0.1')}/optuna"
    told: list[str] = []
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    ServerWait("the Optuna storage", url, timeout=1.5, on_wait=told.append).attach(engine)
    try:
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError) as down:
            engine.connect()
        assert 1.5 <= time.monotonic() - started < 10
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            engine.connect()
        assert time.monotonic() - started < 1  # the bound is spent: no second wait
    finally:
        engine.dispose()
    assert "the Optuna storage at postgresql+psycopg://synops:***@127.0.0.1:" in str(down.value)
    assert "Connection refused" in str(down.value)
    assert len(told) == 1 and "waiting up to 2 s" in told[0]
    assert not any("secret-pw" in text for text in [str(down.value), *told])


def test_a_tracking_server_that_does_not_answer_is_named_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When MLflow's own retries give up on a server that gives no answer (none here: no retries),
    the call fails with `ServerUnavailableError` naming the server, its password redacted."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port("127.0.0.1")
    with pytest.raises(ServerUnavailableError) as down:
        Tracker(f"http://someone:secret-pw@127.0.0.1:{port}")
    assert f"the MLflow tracking server at http://someone:***@127.0.0.1:{port} does not answer" \
        in str(down.value)
    assert "secret-pw" not in str(down.value)
