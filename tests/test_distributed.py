"""One study on several machines: a real PostgreSQL and `mlflow server` on loopback, started and
stopped here, and worker processes in separate folders that share nothing but the two URLs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pipeline.front import study_bases
from pipeline.services import Services
from tests.conftest import (
    EXPERIMENTS,
    make_idx_dataset,
    postgres_missing,
    running_services,
    server_storage,
)

ROOT = Path(__file__).resolve().parent.parent
N_TRIALS = 6
MLFLOW_WORKERS = 1  # the MLflow server's: each one more costs seconds of start-up on two busy cores


# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = [
    pytest.mark.xdist_group(__name__),
    pytest.mark.skipif(
        postgres_missing() is not None,
        reason="PostgreSQL is not installed here (CI's .ci/run installs Debian's postgresql)"),
]


@pytest.fixture(scope="module")
def servers() -> Iterator[Services]:
    """Both servers, for the module's tests."""
    with running_services("synops-services-", mlflow_workers=MLFLOW_WORKERS) as services:
        yield services


@pytest.fixture
def storage(servers: Services) -> Iterator[optuna.storages.RDBStorage]:
    """The test's own reader of the servers' Optuna storage."""
    with server_storage(servers.storage_url) as reader:
        yield reader


def machine_command(services: Services, *command: str) -> list[str]:
    sets = {"data.root": "data", "data.verify_checksums": "false", "data.max_train_samples": "0",
            "data.val_size": "100", "train.max_batches": "0", "study.n_trials": str(N_TRIALS),
            "study.heartbeat_interval": "1", "study.grace_period": "4"}
    return [sys.executable, "-m", "pipeline", *command, "--config", str(EXPERIMENTS / "smoke.toml"),
            "--storage", services.worker_storage_url, "--tracking-uri", services.tracking_uri,
            *[f"--set={k}={v}" for k, v in sets.items()]]


def machine(folder: Path) -> Path:
    """A folder of its own, with its own copy of the data (the same generated images)."""
    make_idx_dataset(folder / "data", train=2400, test=200)
    return folder


def kill_one_mid_trial(study_of: callable, workers: dict[int, subprocess.Popen]) -> int:
    """SIGKILL the worker running a fine-tuning trial that has started training; its number."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for trial in study_of().get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = int(trial.user_attrs.get("worker", "x:0").rsplit(":", 1)[1])
            if "mlflow_run_id" in trial.user_attrs and pid in workers and trial.params:
                workers[pid].send_signal(signal.SIGKILL)
                return trial.number
        time.sleep(0.05)
    raise AssertionError("no worker was seen training a trial")


def test_three_machines_started_together_share_one_study_one_base_and_one_parent(
    servers: Services, storage: optuna.storages.RDBStorage, tmp_path: Path
) -> None:
    folders = [machine(tmp_path / f"machine-{i}") for i in range(3)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PGPASSFILE": str(servers.pgpass_file)}

    def study() -> optuna.Study:
        return optuna.load_study(study_name="smoke", storage=storage)

    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(folder / "sweep.log", "w")) for folder in folders]
        processes = [subprocess.Popen(machine_command(servers, "sweep", "--quiet"), cwd=folder,
                                      env=env, stdout=log, stderr=subprocess.STDOUT)
                     for folder, log in zip(folders, logs, strict=True)]
        stack.callback(lambda: [p.kill() for p in processes])  # never left running
        while True:  # the study exists once the first worker has created it
            try:
                study()
                break
            except KeyError:
                time.sleep(0.2)
        killed = kill_one_mid_trial(study, {p.pid: p for p in processes})
        codes = [p.wait(timeout=600) for p in processes]
    output = "\n".join((folder / "sweep.log").read_text() for folder in folders)
    assert sorted(codes) == [-signal.SIGKILL, 0, 0], output[-6000:]

    final = study()
    trials = final.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS, output[-6000:]
    params = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(params)) == len(params)  # distinct: no two workers ran the same proposal
    assert next(t for t in trials if t.number == killed).state == TrialState.FAIL
    assert any(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed for t in complete)
    assert sum(1 for t in complete if t.user_attrs.get("reference")) == 1
    assert len({t.user_attrs["worker"] for t in complete}) >= 2  # the work was shared
    assert not [s.study_name for s in optuna.get_all_study_summaries(storage)
                if ":lease:" in s.study_name]

    client = MlflowClient(servers.tracking_uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    roles = [r.data.tags.get("synops.role") for r in runs]
    encodings = {t.user_attrs["variant"]["spikes_per_pixel"] for t in complete
                 if not t.user_attrs.get("reference")}
    bases = [r for r in runs if r.data.tags.get("synops.role") == "base"]
    assert sorted(int(r.data.params["data.spikes_per_pixel"]) for r in bases) \
        == sorted(encodings | {255})  # one base model per encoding, trained by one machine
    assert {b.run_id for b in study_bases(final).values()} == {r.info.run_id for r in bases}
    (parent,) = [r for r in runs if r.data.tags.get("synops.role") == "study"]
    assert roles.count("study") == 1
    for trial in complete:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    assert parent.info.status == "FINISHED"
    assert "View run" not in output  # MLflow's per-run links through a server are kept quiet

    reader = machine(tmp_path / "reader")  # a fourth machine: only the two URLs, no shared files
    done = subprocess.run(machine_command(servers, "report") + ["--out", "report"], cwd=reader,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("index.html", "pareto.png", "front.csv", "layers.png"):
        assert (reader / "report" / name).is_file()
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in logged  # written back through the server's artifact proxy
