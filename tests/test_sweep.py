"""The study: real Optuna and MLflow stores in temporary folders, generated data, a tiny net."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.sweep import prepare_study, run_sweep
from tests.conftest import EXPERIMENTS, smoke_overrides

N_TRIALS = load_config(EXPERIMENTS / "smoke.toml").study.n_trials
ROOT = Path(__file__).resolve().parent.parent


class Stores:
    """An Optuna storage and an MLflow store in one temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.storage = f"sqlite:///{folder / 'optuna.db'}"
        self.tracking = f"sqlite:///{folder / 'mlflow.db'}"

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="smoke", storage=self.storage)

    def runs(self) -> list:
        client = MlflowClient(self.tracking)
        experiment = client.get_experiment_by_name("smoke")
        return client.search_runs([experiment.experiment_id])


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    return Stores(tmp_path)


def sweep_args(idx_root: Path, stores: Stores, *extra: str) -> list[str]:
    sets = [f"--set={k}={str(v).lower() if isinstance(v, bool) else repr(v).replace(chr(39), chr(34))}"
            for k, v in smoke_overrides(idx_root).items()]
    return ["sweep", "--config", str(EXPERIMENTS / "smoke.toml"), "--storage", stores.storage,
            "--tracking-uri", stores.tracking, "--quiet", *sets, *extra]


def states(study: optuna.Study) -> list[str]:
    return sorted(t.state.name for t in study.trials)


def test_a_sweep_links_every_trial_to_its_run_and_resumes_without_redoing(
    idx_root: Path, stores: Stores
) -> None:
    result = CliRunner().invoke(main, sweep_args(idx_root, stores), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = stores.study()
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == N_TRIALS == len(study.trials)
    assert sum(1 for t in complete if t.user_attrs.get("reference") == "tutorial") == 1
    runs = stores.runs()
    (parent,) = [r for r in runs if r.data.tags["synops.role"] == "study"]
    assert parent.data.tags["synops.storage"] == stores.storage
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) == N_TRIALS
    for trial in complete:
        child = children[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["trial_number"] == str(trial.number)
        assert child.info.status == "FINISHED"
        assert {"test_accuracy", "val_synops_mean", "test_synops_p95"} <= set(child.data.metrics)
    artifacts = {a.path for a in MlflowClient(stores.tracking).list_artifacts(parent.info.run_id)}
    assert {"front.csv", "pareto.png"} <= artifacts
    assert "trial   0" in result.output and "tutorial recipe" in result.output

    again = CliRunner().invoke(main, sweep_args(idx_root, stores), catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert len(stores.study().trials) == N_TRIALS
    assert len(stores.runs()) == len(runs)


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(
    idx_root: Path, stores: Stores
) -> None:
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root))
    prepared = prepare_study(config, stores.storage, stores.tracking, progress=False)
    low = prepared.bounds.target_synops[0]
    prepared.study.enqueue_trial({"penalty_strength": 1e300, "target_synops": low, "penalty": "hinge"})
    study = run_sweep(config, stores.storage, stores.tracking, quiet=True, echo=lambda line: None)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == N_TRIALS
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert "DivergedError" in failed.user_attrs["fail_reason"]
    run = MlflowClient(stores.tracking).get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "loss became" in run.data.tags["synops.failure_reason"]


def cli_process(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def start_and_wait_for_a_running_trial(args: list[str], stores: Stores) -> subprocess.Popen:
    """Start a sweep process and return it once a fine-tuning trial is RUNNING with its run."""
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        try:
            running = stores.study().get_trials(states=(TrialState.RUNNING,))
        except (KeyError, optuna.exceptions.StorageInternalError):
            continue  # the study is not created yet
        if any(t.number >= 1 and "mlflow_run_id" in t.user_attrs for t in running):
            return process
    process.kill()
    raise AssertionError(f"no trial was seen running: {process.communicate()[0][-3000:]}")


SLOW_TRIALS = ["--set=study.heartbeat_interval=1", "--set=study.grace_period=2",
               "--set=train.max_batches=0", "--set=train.epochs=100"]


def test_a_killed_sweep_resumes_and_marks_the_killed_trial_failed(
    idx_root: Path, stores: Stores
) -> None:
    args = cli_process(sweep_args(idx_root, stores, *SLOW_TRIALS))
    process = start_and_wait_for_a_running_trial(args, stores)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    (victim,) = stores.study().get_trials(states=(TrialState.RUNNING,))
    time.sleep(3)  # let the heartbeat go stale

    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, timeout=400)
    study = stores.study()
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == N_TRIALS
    assert study.trials[victim.number].state == TrialState.FAIL
    assert not study.get_trials(states=(TrialState.RUNNING,))
    killed_run = MlflowClient(stores.tracking).get_run(victim.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in stores.runs())


def test_an_interrupted_sweep_records_the_running_trial_and_keeps_finished_work(
    idx_root: Path, stores: Stores
) -> None:
    # Trials long enough that the signal cannot land after the running trial's last step.
    args = cli_process(sweep_args(idx_root, stores, *SLOW_TRIALS, "--set=train.epochs=5000"))
    process = start_and_wait_for_a_running_trial(args, stores)
    process.send_signal(signal.SIGTERM)  # what Ctrl-C does, as a scheduler would send it
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output[-3000:]
    assert "interrupted" in output
    study = stores.study()
    (victim,) = study.get_trials(states=(TrialState.FAIL,))
    assert "KeyboardInterrupt" in victim.user_attrs["fail_reason"]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert all(t.state == TrialState.COMPLETE for t in study.trials[: victim.number])
    client = MlflowClient(stores.tracking)
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.status == "KILLED"


def test_two_workers_finish_exactly_n_trials_with_distinct_params(
    idx_root: Path, stores: Stores
) -> None:
    args = cli_process(sweep_args(idx_root, stores, "--workers", "2",
                                  "--set=train.max_batches=0", "--set=train.epochs=5"))
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    study = stores.study()
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == N_TRIALS
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.FAIL))
    params = [tuple(sorted(t.params.items())) for t in complete if t.params]
    assert len(set(params)) == len(params) == N_TRIALS - 1
    assert done.stdout.count("trial ") >= N_TRIALS


@pytest.mark.parametrize("sampler", ["nsga2", "random", "grid"])
def test_every_sampler_runs_a_study(sampler: str, idx_root: Path, stores: Stores) -> None:
    overrides = smoke_overrides(idx_root) | {"study.sampler": sampler, "study.n_trials": 3,
                                             "study.grid_points": 2}
    config = load_config(EXPERIMENTS / "smoke.toml", overrides)
    study = run_sweep(config, stores.storage, stores.tracking, quiet=True, echo=lambda line: None)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    tried = [t.params for t in complete if t.params]
    assert len({tuple(sorted(p.items())) for p in tried}) == len(tried) == 2
    if sampler == "grid":
        assert all(p["penalty_strength"] in (0.3, pytest.approx(30.0)) for p in tried)
