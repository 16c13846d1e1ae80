"""Shared fixtures: a small generated dataset in MNIST's IDX layout and temporary tracking stores."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import optuna
import psycopg
import pytest
import sqlalchemy
import torch

from pipeline.config import load_config
from pipeline.inputs import load_inputs
from pipeline.mnist_files import _write_idx
from pipeline.services import Services, ServicesError, postgres_bin, start_services, stop_services
from pipeline.sweep.space import plan_study
from pipeline.sweep.storage import prepare_study
from pipeline.sweep.workers import run_sweep
from pipeline.tracking import Tracker

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
DATA_ROOT = Path(__file__).resolve().parent.parent / "data"  # where `synops data` puts real MNIST


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one test process per core), each test process and
    the processes it starts compute on one thread: two processes of two threads each would fight
    over two cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def make_idx_dataset(root: Path, train: int = 600, test: int = 200, seed: int = 0) -> Path:
    """Write a learnable 10-class toy dataset as MNIST IDX files under `root/MNIST/raw`.

    Class k lights a 6x6 block at a class-specific place, plus sparse noise, so a small net can
    learn it in a few steps and SynOps vary with the input.
    """
    rng = np.random.default_rng(seed)
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) < 0.05).astype(np.uint8) * rng.integers(0, 120, (n, 28, 28))
        for i, k in enumerate(labels):
            r, c = 2 + 6 * (k // 4), 2 + 6 * (k % 4)
            images[i, r : r + 6, c : c + 6] = 255
        return images.astype(np.uint8), labels

    _write_idx(folder, "train", *draw(train))
    _write_idx(folder, "t10k", *draw(test))
    return root


@pytest.fixture(scope="session")
def idx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder of the generated dataset (shared, read-only by convention)."""
    return make_idx_dataset(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The repository's data folder with real MNIST in it, fetched (offline if torchvision cannot
    reach its servers) and verified by `synops data`, as a user would."""
    from click.testing import CliRunner

    from pipeline.cli import main

    prepared = CliRunner().invoke(main, ["data", "--config", str(EXPERIMENTS / "seed.toml"),
                                         f"--set=data.root='{DATA_ROOT}'"])
    assert prepared.exit_code == 0, prepared.output
    return DATA_ROOT


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in a temporary folder."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def postgres_missing() -> str | None:
    """Why no PostgreSQL server can be started here (no Debian binaries), or None."""
    try:
        postgres_bin(install=False, echo=print)
    except ServicesError as err:
        return str(err)
    return None


def smoke_overrides(idx_root: Path) -> dict[str, object]:
    """Overrides that point experiments/smoke.toml at the generated dataset."""
    return {
        "data.root": str(idx_root),
        "data.verify_checksums": False,
        "data.max_train_samples": 0,
        "data.val_size": 100,
    }


def prepare(config, storage: str, tracking: str):
    """The study of `config` prepared in the given stores, as `synops sweep` prepares it."""
    inputs = load_inputs(config)
    return prepare_study(config, storage, Tracker(tracking), inputs, plan_study(config, inputs))


@pytest.fixture(scope="module")
def study_stores(idx_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[str]]:
    """A smoke study with one failed (diverged) trial and one still running (as if another worker
    were busy with it), and the CLI args that reach it."""
    folder = tmp_path_factory.mktemp("study")
    storage, tracking = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    overrides = smoke_overrides(idx_root) | {"study.n_trials": 6, "train.max_batches": 0}
    config = load_config(EXPERIMENTS / "smoke.toml", overrides)
    prepared = prepare(config, storage, tracking)
    prepared.study.enqueue_trial({"penalty_strength": 1e300, "target_position": 0.0, "penalty": "mse"})
    run_sweep(config, storage, tracking, progress=False, echo=lambda line: None)
    optuna.load_study(study_name="smoke", storage=storage).ask()
    sets = [f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]
    args = ["--config", str(EXPERIMENTS / "smoke.toml"), "--storage", storage,
            "--tracking-uri", tracking, *sets]
    return storage, tracking, args


@contextlib.contextmanager
def server_storage(url: str) -> Iterator[optuna.storages.RDBStorage]:
    """One Optuna storage, with a small pool, for a test's many reads of a study on a server:
    `optuna.load_study(storage=url)` opens a new pool per call, and a test polling every 50 ms
    held 40 of PostgreSQL's 100 connections until its server refused the workers' ones."""
    storage = optuna.storages.RDBStorage(
        url, engine_kwargs={"pool_size": 1, "max_overflow": 1, "pool_pre_ping": True})
    try:
        yield storage
    finally:
        storage.engine.dispose()


@contextlib.contextmanager
def on_every_new_session(event: str, listener: Callable[[psycopg.Connection, object], None]
                         ) -> Iterator[None]:
    """`listener` on SQLAlchemy's pool `event` of every engine, for the block (`first_connect`:
    while a new session reads the server's types, `connect`: while it is set up)."""
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, event, listener)
    try:
        yield
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, event, listener)


@contextlib.contextmanager
def next_session_ended(event: str) -> Iterator[list[str]]:
    """The next database session any engine opens is ended by the server right after the driver
    connected, in SQLAlchemy's pool `event` (`on_every_new_session`), as a PostgreSQL shutting
    down for a restart can end it. Yields the events that ended one."""
    ended: list[str] = []

    def end_the_session(dbapi_connection: psycopg.Connection, record: object) -> None:
        if ended:
            return
        ended.append(event)
        with contextlib.suppress(psycopg.errors.AdminShutdown):  # the server ends it at once
            dbapi_connection.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    with on_every_new_session(event, end_the_session):
        yield ended


@contextlib.contextmanager
def running_services(prefix: str, **options: object) -> Iterator[Services]:
    """PostgreSQL and an MLflow server in a fresh folder under /tmp (PostgreSQL, run as `postgres`
    under root, must be able to enter it), stopped and removed afterwards whatever happened;
    `options` go to `start_services`."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    try:
        yield start_services(folder / "services", install=False, echo=lambda line: None, **options)
    finally:
        stop_services(folder / "services", echo=lambda line: None)
        shutil.rmtree(folder, ignore_errors=True)
