"""The study: real Optuna and MLflow stores in temporary folders, generated data, a tiny net."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.front import study_bases
from pipeline.inputs import load_inputs
from pipeline.sweep import objective, workers
from pipeline.sweep.workers import run_sweep
from pipeline.tracking import PublishError
from tests.conftest import EXPERIMENTS, smoke_overrides
from tests.conftest import prepare as prepare_in

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


def prepare(config, stores: Stores):
    return prepare_in(config, stores.storage, stores.tracking)


def smoke(idx_root: Path, **overrides: object):
    return load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root) | overrides)


def sweep(config, stores: Stores) -> optuna.Study:
    return run_sweep(config, stores.storage, stores.tracking, progress=False, echo=lambda line: None)


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
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags["synops.role"] in ("trial", "reference")}
    assert len(children) == N_TRIALS
    confirmed = [r for r in runs if r.data.tags["synops.role"] == "confirmation"]
    assert len(confirmed) == len(study.best_trials)  # smoke.toml: one more seed per front member
    assert "confirm trial" in result.output
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
    config = smoke(idx_root)
    prepared = prepare(config, stores)
    prepared.study.enqueue_trial({"penalty_strength": 1e300, "target_position": 0.0, "penalty": "mse"})
    study = sweep(config, stores)
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
               "--set=study.confirm_seeds=0", "--set=train.max_batches=0", "--set=train.epochs=30"]


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
    assert "TrainingStopped: stop requested" in victim.user_attrs["fail_reason"]
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
    config = smoke(idx_root, **{"study.sampler": sampler, "study.n_trials": 3, "study.grid_points": 2})
    study = sweep(config, stores)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 3
    tried = [t.params for t in complete if t.params]
    assert len({tuple(sorted(p.items())) for p in tried}) == len(tried) == 2
    if sampler == "grid":
        assert all(p["penalty_strength"] in (0.3, pytest.approx(30.0)) for p in tried)


def test_resuming_with_a_config_that_changes_the_study_is_refused(idx_root: Path, stores: Stores) -> None:
    first = CliRunner().invoke(main, sweep_args(idx_root, stores, "--set=study.n_trials=1"))
    assert first.exit_code == 0, first.output
    changed = CliRunner().invoke(main, sweep_args(idx_root, stores, "--set=data.split_seed=1",
                                                  "--set=train.lr=0.002"))
    assert changed.exit_code == 2, changed.output
    assert "data.split_seed" in changed.output and "train.lr" in changed.output
    assert len(stores.study().trials) == 1
    longer = CliRunner().invoke(main, sweep_args(idx_root, stores, "--set=study.n_trials=2"))
    assert longer.exit_code == 0, longer.output
    assert len(stores.study().get_trials(states=(TrialState.COMPLETE,))) == 2


def test_a_study_stored_before_training_precision_existed_resumes_in_float32(
        idx_root: Path, stores: Stores) -> None:
    """Such a study trained in float32: resuming it under "auto" (bfloat16 on some CPUs) would mix
    precisions in one front, so it is refused, naming the key; in float32 it resumes."""
    first = CliRunner().invoke(main, sweep_args(idx_root, stores, "--set=study.n_trials=1"))
    assert first.exit_code == 0, first.output
    study = stores.study()
    older = study.user_attrs["config"]
    for stage in ("train", "pretrain"):
        del older[stage]["precision"]
    study.set_user_attr("config", older)
    mixed = CliRunner().invoke(main, sweep_args(idx_root, stores, '--set=train.precision="auto"'))
    assert mixed.exit_code == 2 and "train.precision: study has 'float32'" in mixed.output
    assert len(stores.study().trials) == 1
    resumed = CliRunner().invoke(main, sweep_args(idx_root, stores, "--set=study.n_trials=2"))
    assert resumed.exit_code == 0, resumed.output
    assert len(stores.study().get_trials(states=(TrialState.COMPLETE,))) == 2


@pytest.mark.parametrize("assignment", [
    "study.space.target_synops=[0.0, 1000.0]",  # resolves below 1.05 x the input-layer floor
    "study.space.lr=[0.0, 1e-3]",
    "study.space.epochs=[4, 2]",
    "study.space.penalty_strength=[0.3, inf]",
])
def test_a_search_space_that_fails_every_trial_is_refused_before_any_training(
    assignment: str, idx_root: Path, stores: Stores
) -> None:
    result = CliRunner().invoke(main, sweep_args(idx_root, stores, f"--set={assignment}"))
    assert result.exit_code == 2, result.output
    assert assignment.split("=")[0] in result.output
    client = MlflowClient(stores.tracking)
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_a_sweep_stops_after_too_many_failures_in_a_row_and_keeps_what_finished(
    idx_root: Path, stores: Stores
) -> None:
    # Every fine-tuning trial diverges (an enormous mse weight); the reference trial finishes first.
    args = sweep_args(idx_root, stores, "--set=study.n_trials=6",
                      "--set=study.max_consecutive_failures=2", '--set=study.space.penalties=["mse"]',
                      "--set=study.space.penalty_strength=[1e300, 1e300]")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "2 trials failed in a row" in result.output and "DivergedError" in result.output
    study = stores.study()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    parent = MlflowClient(stores.tracking).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FAILED"


def test_a_resumed_study_does_not_repeat_its_first_proposals(idx_root: Path, stores: Stores) -> None:
    config = smoke(idx_root, **{"study.sampler": "random", "study.n_trials": 3})
    sweep(config, stores)
    sweep(smoke(idx_root, **{"study.sampler": "random", "study.n_trials": 5}), stores)
    tried = [tuple(sorted(t.params.items())) for t in stores.study().trials if t.params]
    assert len(tried) == 4 and len(set(tried)) == 4


def test_a_failed_reference_trial_is_queued_again(idx_root: Path, stores: Stores) -> None:
    config = smoke(idx_root)
    study = prepare(config, stores).study
    reference = study.ask()  # the queued tutorial recipe, as a worker would take it
    assert reference.user_attrs["reference"] == "tutorial"
    study.tell(reference, state=TrialState.FAIL)
    sweep(config, stores)
    finished = stores.study().get_trials(states=(TrialState.COMPLETE,))
    assert sum(1 for t in finished if t.user_attrs.get("reference")) == 1


def test_runs_compare_in_the_mlflow_ui_and_the_parent_carries_the_study_summary(
    idx_root: Path, stores: Stores
) -> None:
    sweep(smoke(idx_root), stores)
    client = MlflowClient(stores.tracking)
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = stores.runs()
    (parent,) = [r for r in runs if r.data.tags["synops.role"] == "study"]
    trials = [r for r in runs if r.data.tags["synops.role"] == "trial"]
    assert len(trials) == N_TRIALS - 1
    for run in trials:
        searched = {"search.penalty_strength", "search.target_position", "search.penalty",
                    "search.spikes_per_pixel"}
        assert searched <= set(run.data.params)
        assert not any(k.startswith("study.") for k in run.data.params)
        assert float(run.data.params["train.target_synops"]) > 0
    trained = study_bases(stores.study()).values()
    assert trained  # each base model's resolved target range, on the study's run
    for base in trained:
        resolved = parent.data.params[f"study.base.{base.variant.slug}.target_synops"]
        low, high = resolved.strip("()[]").split(",")
        assert 0 < float(low) < float(high)
    assert parent.data.metrics["finished_trials"] == N_TRIALS
    assert parent.data.metrics["failed_trials"] == 0
    assert parent.data.metrics["front_size"] >= 1
    history = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert len(history) == N_TRIALS and [m.value for m in history] == sorted(m.value for m in history)
    study = stores.study()
    assert study.metric_names == ["val_accuracy", "val_synops_mean"]  # what optuna-dashboard shows
    assert "penalty_strength" in study.user_attrs["searched_parameters"]
    front = sorted(t.number for t in study.best_trials)
    assert parent.data.tags["synops.front_trials"] == ",".join(map(str, front))
    note = parent.data.tags["mlflow.note.content"]
    assert all(f"| {n}" in note for n in front) and "Knee: trial" in note
    filtered = client.search_runs([experiment.experiment_id],
                                  f"tags.`synops.front_trials` = '{','.join(map(str, front))}'")
    assert [r.info.run_id for r in filtered] == [parent.info.run_id]


def test_the_parent_run_is_closed_even_when_publishing_the_front_fails(
    idx_root: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workers, "publish_front", full_disk)
    with pytest.raises(PublishError, match="could not be published.*No space left"):
        sweep(smoke(idx_root, **{"study.n_trials": 2}), stores)
    study = stores.study()
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2  # the trials are kept
    parent = MlflowClient(stores.tracking).get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"


def test_a_sweep_refuses_a_checkpoint_it_would_ignore(idx_root: Path, stores: Stores) -> None:
    result = CliRunner().invoke(main, sweep_args(idx_root, stores, "--set=train.init_from='x.pt'"))
    assert result.exit_code == 2 and "train.init_from" in result.output


def test_a_study_whose_base_checkpoint_is_lost_stops_with_the_run_to_restore(
    idx_root: Path, stores: Stores, tmp_path: Path
) -> None:
    config = smoke(idx_root, **{"study.n_trials": 2, "study.confirm_seeds": 0})
    sweep(config, stores)
    (base,) = study_bases(stores.study()).values()  # the searched trial's (the reference has none)
    base_run = base.run_id
    (checkpoint,) = (tmp_path / "artifacts").rglob(f"{base_run}/artifacts/model/state_dict.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated
    result = CliRunner().invoke(main, sweep_args(idx_root, stores, "--set=study.n_trials=3"))
    assert result.exit_code == 1, result.output
    assert base_run in result.output and "cannot be read" in result.output


def test_a_single_worker_sweep_loads_the_data_once(
    idx_root: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[object] = []

    def counted(config: object):
        loads.append(config)
        return load_inputs(config)

    monkeypatch.setattr(workers, "load_inputs", counted)
    sweep(smoke(idx_root, **{"study.n_trials": 2}), stores)
    assert len(loads) == 1


def test_without_a_terminal_a_sweep_logs_plain_timestamped_lines(idx_root: Path, stores: Stores) -> None:
    args = [a for a in sweep_args(idx_root, stores) if a != "--quiet"]
    done = subprocess.run(cli_process(args), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "\x1b" not in output and "\r" not in output  # no progress bars, no cursor moves
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
    trial_lines = [line for line in done.stdout.splitlines() if re.match(stamp + "trial ", line)]
    assert len(trial_lines) == N_TRIALS
    assert re.search(f"^{stamp}confirm trial ", done.stdout, re.MULTILINE)
    trained = study_bases(stores.study()).values()
    assert trained  # each base model is trained by the first trial needing it, its epochs logged
    for base in trained:
        assert re.search(rf"^\S+ \S+ base model \({base.variant.label}\) epoch 1/1: ", done.stdout,
                         re.MULTILINE)
    assert ":lease:" not in output


def test_each_encoding_trains_one_base_model_shared_by_its_trials_and_by_a_resume(
    idx_root: Path, stores: Stores
) -> None:
    config = smoke(idx_root, **{"study.n_trials": 4, "study.confirm_seeds": 0})
    prepared = prepare(config, stores)
    for encoding in (15, 15, 255):
        prepared.study.enqueue_trial({"spikes_per_pixel": encoding})
    sweep(config, stores)

    def bases() -> dict[str, str]:
        return {r.info.run_id: r.data.params["data.spikes_per_pixel"] for r in stores.runs()
                if r.data.tags["synops.role"] == "base"}

    trained = bases()
    assert sorted(trained.values()) == ["15", "255"]  # the second trial of 15 trained none
    study = stores.study()
    recorded = {b.variant.spikes_per_pixel: b for b in study_bases(study).values()}
    assert {k: b.run_id for k, b in recorded.items()} == {int(v): run for run, v in trained.items()}
    assert recorded[15].test.input_layer_synops < recorded[255].test.input_layer_synops / 10
    for run in stores.runs():
        if run.data.tags["synops.role"] == "trial":
            encoding = int(run.data.params["data.spikes_per_pixel"])
            assert run.data.tags["synops.base_run_id"] == recorded[encoding].run_id
            low, high = recorded[encoding].target_synops
            assert low <= float(run.data.params["train.target_synops"]) <= high
    assert sum(t.user_attrs["variant"]["spikes_per_pixel"] == 15 for t in study.trials) == 2

    prepared = prepare(smoke(idx_root, **{"study.n_trials": 6, "study.confirm_seeds": 0}), stores)
    prepared.study.enqueue_trial({"spikes_per_pixel": 15})
    sweep(smoke(idx_root, **{"study.n_trials": 6, "study.confirm_seeds": 0}), stores)
    assert bases() == trained  # resuming with the same config trains no base model again
    assert len(stores.study().get_trials(states=(TrialState.COMPLETE,))) == 6


def test_a_trial_failed_by_another_worker_meanwhile_does_not_stop_this_worker(
    idx_root: Path, stores: Stores
) -> None:
    """Another worker that took this one's trial for dead (a late heartbeat) fails it while it
    still trains: Optuna then refuses the finished trial's result, and the sweep goes on."""
    config = smoke(idx_root, **{"train.epochs": 25, "study.confirm_seeds": 0})
    prepare(config, stores)
    failed: list[int] = []

    def fail_one_running_trial() -> None:
        storage = optuna.storages.RDBStorage(stores.storage)
        deadline = time.monotonic() + 120
        while not failed and time.monotonic() < deadline:
            study = optuna.load_study(study_name="smoke", storage=storage)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if "mlflow_run_id" in trial.user_attrs and trial.params:
                    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                    failed.append(trial.number)
                    break
            time.sleep(0.05)

    lines: list[str] = []
    other = threading.Thread(target=fail_one_running_trial)
    other.start()
    run_sweep(config, stores.storage, stores.tracking, progress=False, echo=lines.append)
    other.join()
    (number,) = failed
    study = stores.study()
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == N_TRIALS
    assert any(f"trial {number}: another worker took this trial for dead" in line for line in lines)
    run = MlflowClient(stores.tracking).get_run(study.trials[number].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "another worker" in run.data.tags["synops.failure_reason"]


def test_the_first_trial_starts_at_the_cheapest_variant_and_no_model_is_trained_to_prepare(
    idx_root: Path, stores: Stores
) -> None:
    config = smoke(idx_root, **{"study.starter_trial": True, "study.n_trials": 2,
                                "study.confirm_seeds": 0})
    study = sweep(config, stores)
    first, second = study.trials[:2]
    # the lowest input-layer floor of the space (15 spikes per pixel, not 255), mid-range penalty
    assert first.params["spikes_per_pixel"] == 15 and not first.user_attrs.get("reference")
    low, high = config.study.space.penalty_strength
    assert first.params["penalty_strength"] == pytest.approx((low * high) ** 0.5)
    assert first.params["target_position"] == 0.5
    assert second.user_attrs.get("reference") == "tutorial"  # the tutorial's recipe comes after it
    runs = sorted(stores.runs(), key=lambda r: r.info.start_time)
    roles = [r.data.tags["synops.role"] for r in runs]
    assert roles[0] == "study"  # preparing the study trains nothing
    bases = [r for r in runs if r.data.tags["synops.role"] == "base"]
    assert [r.data.params["data.spikes_per_pixel"] for r in bases] == ["15"]  # the one its trials need


def test_a_trial_dominated_by_far_after_an_epoch_is_pruned_and_counts_towards_the_study(
    idx_root: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any accuracy, at twice the SynOps of a finished trial or more: the 255-spike trial after the
    # 15-spike one (its input layer alone needs ~17x the SynOps) is dominated by far.
    monkeypatch.setattr(objective, "PRUNE_MARGINS", (-1.0, 2.0))
    config = smoke(idx_root, **{"study.prune_dominated": True, "study.n_trials": 2,
                                "study.confirm_seeds": 0, "study.reference_trial": False,
                                "train.epochs": 3})
    prepared = prepare(config, stores)
    for encoding in (15, 255):
        prepared.study.enqueue_trial({"spikes_per_pixel": encoding})
    study = sweep(config, stores)
    first, second = study.trials
    assert first.state == TrialState.COMPLETE and second.state == TrialState.PRUNED
    reason = second.user_attrs["pruned"]
    assert reason.startswith("after epoch 1 of 3") and "dominated by far by trial 0" in reason
    assert len(study.trials) == 2  # the pruned trial counts towards study.n_trials
    run = MlflowClient(stores.tracking).get_run(second.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and reason in run.data.tags["synops.failure_reason"]
    assert len(run.data.metrics.get("epoch_val_accuracy") and
               MlflowClient(stores.tracking).get_metric_history(run.info.run_id, "epoch_val_accuracy")) == 1
    assert "trial   1 pruned: spikes_per_pixel=255" in workers.trial_line(second)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two cores to pin a process to one of them")
def test_a_sweep_pinned_to_one_core_computes_on_one_thread() -> None:
    """`taskset -c 0 synops sweep` (or a container's cpuset) must not start a thread per core of
    the machine: two threads on one core run slower than one."""
    core = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{core}}}); "
            "from pipeline.sweep.workers import usable_cores; print(usable_cores())")
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == "1"
