"""Sweep stage: an Optuna study over the SynOps penalty that traces the accuracy-vs-SynOps front.

Objectives: maximise validation accuracy, minimise mean validation SynOps per sample (the test
set is logged for every trial, never used to choose). Every trial fine-tunes the study's shared
unpenalised base model; the tutorial's own recipe runs once as a tagged reference trial. Optuna's
RDB storage is the distributed engine: workers on this or other machines share one storage, and
heartbeats turn a trial whose process died into FAIL and retry it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from pipeline import tracking
from pipeline.config import ConfigError, ExperimentConfig
from pipeline.data import load_dataset
from pipeline.experiment import ensure_base_model, final_metrics, run_tracked
from pipeline.interrupt import raise_if_stop_requested, shielded, stop_on_signals
from pipeline.memory import keep_freed_memory
from pipeline.train import MSE_SCALE

# Heartbeats and stale-trial retries are marked experimental; they are what we rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
DIRECTIONS = ("maximize", "minimize")  # validation accuracy, validation SynOps per sample
# The tutorial's recipe (seed-synops-tutorial.txt): from scratch, 2 epochs, constant Adam 1e-3.
TUTORIAL_RECIPE = {"epochs": 2, "batch_size": 512, "lr": 1e-3, "schedule": "constant",
                   "penalty": "mse", "penalty_weight": 1e-5, "target_synops": 4e7}
FLOOR_MARGIN = 1.05  # the lowest target searched sits this far above the input-layer floor

ATTR_REFERENCE = "reference"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_FAILURE = "fail_reason"
ATTR_METRICS = "metrics"
ATTR_SECONDS = "seconds"
ATTR_SURPLUS = "surplus"


def resolve_storage(explicit: str | None = None) -> str:
    """`--storage`, else the project's SQLite file next to the MLflow store."""
    return explicit or DEFAULT_STORAGE


def open_storage(url: str, config: ExperimentConfig) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose worker died is failed and retried."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # workers wait for SQLite's write lock
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=config.study.heartbeat_interval,
        grace_period=config.study.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
    )


class WorkerError(RuntimeError):
    """A sweep worker process ended with an error."""


class _WithoutInterruptTracebacks(logging.Filter):
    """Optuna logs each failed trial with its traceback; for Ctrl-C that is one screenful per
    worker of noise, since the CLI reports the interruption and the trial and run record it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is KeyboardInterrupt)


_OPTUNA_TRIAL_LOGGER = logging.getLogger("optuna.study._optimize")
_OPTUNA_TRIAL_LOGGER.addFilter(_WithoutInterruptTracebacks())


@dataclass(frozen=True)
class SearchBounds:
    """The resolved search space, fixed when the study is created and kept in its user attrs."""

    penalty_strength: tuple[float, float]
    target_synops: tuple[float, float]
    penalties: tuple[str, ...]
    epochs: tuple[int, int] | None
    lr: tuple[float, float] | None
    input_layer_synops: float
    base_val_synops: float
    base_run_id: str

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> SearchBounds:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in attrs.items()}
        return cls(**values)


def resolve_bounds(config: ExperimentConfig, base_run_id: str, floor: float, base_synops: float
                   ) -> SearchBounds:
    """Bounds from the config; target bounds of 0 are measured: just above the input-layer floor
    (SynOps that no training can remove) up to the unpenalised base model's SynOps."""
    space = config.study.space
    low, high = space.target_synops
    return SearchBounds(
        penalty_strength=tuple(space.penalty_strength),
        target_synops=(low or floor * FLOOR_MARGIN, high or base_synops),
        penalties=tuple(space.penalties),
        epochs=tuple(space.epochs) if space.epochs else None,
        lr=tuple(space.lr) if space.lr else None,
        input_layer_synops=floor,
        base_val_synops=base_synops,
        base_run_id=base_run_id,
    )


def make_sampler(config: ExperimentConfig, bounds: SearchBounds, worker: int = 0
                 ) -> optuna.samplers.BaseSampler:
    """The configured sampler; `grid` spans each bound with `grid_points` log-spaced values.

    Worker `i` seeds its sampler with `study.seed + i`: workers with one seed would propose the
    same parameters. TPE's constant liar keeps parallel workers away from running trials.
    """
    seed, study = config.study.seed + worker, config.study
    if study.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if study.sampler == "grid":
        def log_grid(low: float, high: float) -> list[float]:
            steps = study.grid_points - 1
            return [low * (high / low) ** (i / steps) for i in range(study.grid_points)]

        grid: dict[str, list[Any]] = {
            "penalty_strength": log_grid(*bounds.penalty_strength),
            "target_synops": log_grid(*bounds.target_synops),
        }
        if len(bounds.penalties) > 1:
            grid["penalty"] = list(bounds.penalties)
        if bounds.epochs:
            grid["epochs"] = sorted({bounds.epochs[0], bounds.epochs[1]})
        if bounds.lr:
            grid["lr"] = list(bounds.lr)
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def suggest_train_changes(trial: optuna.Trial, bounds: SearchBounds) -> dict[str, Any]:
    """The fine-tuning settings this trial tries.

    The searched `penalty_strength` weighs the squared relative excess ((S - T) / T)^2 for both
    shapes, so one range suits both: it is the hinge weight as is, and for `mse` it is converted
    to the tutorial's scale, weight = strength * 1e7 / T^2.
    """
    strength = trial.suggest_float("penalty_strength", *bounds.penalty_strength, log=True)
    target = trial.suggest_float("target_synops", *bounds.target_synops, log=True)
    penalty = (trial.suggest_categorical("penalty", list(bounds.penalties))
               if len(bounds.penalties) > 1 else bounds.penalties[0])
    weight = strength * MSE_SCALE / target**2 if penalty == "mse" else strength
    changes: dict[str, Any] = {"penalty": penalty, "penalty_weight": weight, "target_synops": target}
    if bounds.epochs:
        changes["epochs"] = trial.suggest_int("epochs", *bounds.epochs)
    if bounds.lr:
        changes["lr"] = trial.suggest_float("lr", *bounds.lr, log=True)
    return changes


def reference_config(config: ExperimentConfig) -> ExperimentConfig:
    """The tutorial's recipe on this study's data and model: from scratch, no base model."""
    train = dataclasses.replace(config.train, **TUTORIAL_RECIPE)
    return dataclasses.replace(config, pretrain=None, train=train)


@dataclass(frozen=True)
class PreparedStudy:
    """Everything workers share: the study, its search bounds and its parent MLflow run."""

    study: optuna.Study
    bounds: SearchBounds
    parent_run_id: str
    experiment_id: str


def _finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def close_orphaned_runs(study: optuna.Study, client: MlflowClient) -> None:
    """Mark KILLED the MLflow runs of failed trials whose process died while they were RUNNING."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(ATTR_RUN_ID)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, tracking.TAG_FAILURE, "worker process died (heartbeat expired)")
            client.set_terminated(run_id, status="KILLED")


def prepare_study(config: ExperimentConfig, storage_url: str, tracking_uri: str,
                  progress: bool = True) -> PreparedStudy:
    """Create or resume the study before any worker starts: MLflow's schema, the base model, the
    search bounds, the parent run and the reference trial are all set up once, here."""
    client = tracking.init_tracking(tracking_uri)
    experiment = tracking.experiment_id(config.name, tracking_uri)
    storage = open_storage(storage_url, config)
    study = optuna.create_study(study_name=config.name, storage=storage, directions=DIRECTIONS,
                                load_if_exists=True)
    optuna.storages.fail_stale_trials(study)
    close_orphaned_runs(study, client)
    if "search_bounds" in study.user_attrs:
        bounds = SearchBounds.from_attrs(study.user_attrs["search_bounds"])
    else:
        if config.pretrain is None:
            raise ConfigError("pretrain", "a sweep fine-tunes a base model: add a [pretrain] table")
        dataset = load_dataset(config.data).to(config.device)
        base = ensure_base_model(config, dataset, experiment, progress)
        bounds = resolve_bounds(config, base.run_id, base.input_layer_synops, base.val_synops)
        study.set_user_attr("search_bounds", dataclasses.asdict(bounds))
        study.set_user_attr("config", config.to_dict())
    parent_run_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_run_id is None:
        parent = client.create_run(experiment, run_name=f"study-{config.name}", tags={
            tracking.TAG_ROLE: "study", "synops.study": config.name,
            "synops.storage": storage_url, "synops.sampler": config.study.sampler,
        })
        parent_run_id = parent.info.run_id
        client.log_param(parent_run_id, "study.n_trials", config.study.n_trials)
        study.set_user_attr("mlflow_parent_run_id", parent_run_id)
    else:
        client.update_run(parent_run_id, status="RUNNING")
    if config.study.reference_trial and not study.user_attrs.get("reference_enqueued"):
        study.enqueue_trial({}, user_attrs={ATTR_REFERENCE: "tutorial"})
        study.set_user_attr("reference_enqueued", True)
    return PreparedStudy(study, bounds, parent_run_id, experiment)


class TrialRunner:
    """The objective: trains one trial as a child MLflow run and returns its two objectives."""

    def __init__(self, config: ExperimentConfig, prepared: PreparedStudy, progress: bool) -> None:
        self.config = config
        self.prepared = prepared
        self.progress = progress
        self.dataset = load_dataset(config.data).to(config.device)
        self.base_state = tracking.load_checkpoint(prepared.bounds.base_run_id)

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        """True when the study already has `n_trials` finished or earlier running trials."""
        taken = [t for t in self.prepared.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if t.state == TrialState.COMPLETE or t.number < trial.number]
        return len(taken) >= self.config.study.n_trials

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        if self._is_surplus(trial):
            trial.set_user_attr(ATTR_SURPLUS, True)
            raise optuna.TrialPruned("the study already has n_trials trials")
        reference = trial.user_attrs.get(ATTR_REFERENCE) == "tutorial"
        if reference:
            config, init_state = reference_config(self.config), None
        else:
            changes = suggest_train_changes(trial, self.prepared.bounds)
            config = dataclasses.replace(
                self.config, train=dataclasses.replace(self.config.train, **changes))
            init_state = self.base_state
        tags = {
            tracking.TAG_ROLE: "reference" if reference else "trial",
            tracking.PARENT_TAG: self.prepared.parent_run_id,
            "trial_number": str(trial.number),
            "synops.study": self.config.name,
        }
        try:
            result = run_tracked(
                config, self.dataset, self.prepared.experiment_id, tags, init_state,
                run_name=f"{'reference' if reference else 'trial'}-{trial.number}",
                progress=self.progress,
                on_start=lambda run_id: trial.set_user_attr(ATTR_RUN_ID, run_id),
            )
        except BaseException as err:
            with shielded():
                trial.set_user_attr(ATTR_FAILURE, f"{type(err).__name__}: {err}"[:2000])
            raise
        trial.set_user_attr(ATTR_METRICS, final_metrics(result.val, result.test))
        trial.set_user_attr(ATTR_SECONDS, result.seconds)
        return result.val.accuracy, result.val.synops_mean


def trial_line(trial: FrozenTrial) -> str:
    """One human line for a finished trial: number, params, val/test accuracy and SynOps, time."""
    if trial.user_attrs.get(ATTR_REFERENCE):
        params = "tutorial recipe (from scratch, mse 1e-5 -> 4e7, 2 epochs)"
    else:
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in trial.params.items())
    if trial.state != TrialState.COMPLETE:
        reason = trial.user_attrs.get(ATTR_FAILURE, "process died or was interrupted")
        return f"trial {trial.number:3d} {trial.state.name}: {params} | {reason}"
    m = trial.user_attrs[ATTR_METRICS]
    return (f"trial {trial.number:3d} | {params} | val {m['val_accuracy']:.2%} "
            f"{m['val_synops_mean']:.3g} | test {m['test_accuracy']:.2%} "
            f"{m['test_synops_mean']:.3g} | {trial.user_attrs.get(ATTR_SECONDS, math.nan):.0f} s")


def publish_front(prepared: PreparedStudy) -> None:
    """Log the current front (front.csv) and Pareto plot to the study's parent MLflow run."""
    from pipeline.report import front_table, pareto_png, trials_frame

    frame = trials_frame(prepared.study)
    front = front_table(frame)
    if front.empty:
        return
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        front.to_csv(Path(tmp) / "front.csv", index=False)
        pareto_png(frame, prepared.study.study_name, Path(tmp) / "pareto.png")
        for name in ("front.csv", "pareto.png"):
            client.log_artifact(prepared.parent_run_id, str(Path(tmp) / name))


def run_worker(config: ExperimentConfig, storage_url: str, tracking_uri: str, threads: int,
               on_trial: Callable[[FrozenTrial], None] | None = None, progress: bool = False,
               worker: int = 0) -> None:
    """Run trials until the study has `n_trials` finished ones. Safe to run in several processes
    (or on several machines sharing one RDB storage and one MLflow server); `worker` numbers the
    process on this machine."""
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri)
    storage = open_storage(storage_url, config)
    study = optuna.load_study(study_name=config.name, storage=storage)
    bounds = SearchBounds.from_attrs(study.user_attrs["search_bounds"])
    study.sampler = make_sampler(config, bounds, worker)
    prepared = PreparedStudy(study, bounds, study.user_attrs["mlflow_parent_run_id"],
                             tracking.experiment_id(config.name, tracking_uri))
    runner = TrialRunner(config, prepared, progress)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(ATTR_SURPLUS):
            return
        if trial.state == TrialState.COMPLETE:
            publish_front(prepared)
        if on_trial is not None:
            on_trial(trial)

    def open_slots() -> int:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return config.study.n_trials - _finished_count(study) - len(running)

    grid = study.sampler if isinstance(study.sampler, optuna.samplers.GridSampler) else None
    while _finished_count(study) < config.study.n_trials and not (grid and grid.is_exhausted(study)):
        raise_if_stop_requested()
        if open_slots() > 0:
            study.optimize(runner, n_trials=1, catch=(Exception,), callbacks=[after_trial])
            continue
        # Every open slot is taken by a running trial: wait, in case its worker died and the
        # heartbeat turns it into a retry this worker should run.
        time.sleep(config.study.heartbeat_interval)
        optuna.storages.fail_stale_trials(study)


def _worker_process(config: ExperimentConfig, storage_url: str, tracking_uri: str,
                    threads: int, worker: int) -> None:
    keep_freed_memory()
    # The parent reports the interruption; the worker only records its trial.
    with stop_on_signals(repeat_interrupts=False), contextlib.suppress(KeyboardInterrupt):
        run_worker(config, storage_url, tracking_uri, threads, worker=worker)


def run_sweep(config: ExperimentConfig, storage_url: str, tracking_uri: str, workers: int = 1,
              quiet: bool = False, echo: Callable[[str], None] = print) -> optuna.Study:
    """`synops sweep`: prepare the study, run `workers` worker processes until it has `n_trials`
    finished trials, print a line per finished trial, and publish the front to MLflow."""
    prepared = prepare_study(config, storage_url, tracking_uri, progress=not quiet)
    return _run_prepared(config, prepared, storage_url, tracking_uri, workers, quiet, echo)


def _run_prepared(config: ExperimentConfig, prepared: PreparedStudy, storage_url: str,
                  tracking_uri: str, workers: int, quiet: bool, echo: Callable[[str], None]
                  ) -> optuna.Study:
    study = prepared.study
    threads = max(1, (os.cpu_count() or 1) // workers)
    bar = tqdm(total=config.study.n_trials, initial=_finished_count(study), desc=config.name,
               unit="trial", disable=quiet)
    client = MlflowClient(tracking_uri)

    def report(trial: FrozenTrial) -> None:
        if quiet:
            echo(trial_line(trial))
            return
        bar.write(trial_line(trial))
        bar.n = _finished_count(study)
        bar.refresh()

    status = "FAILED"
    try:
        if workers == 1:
            run_worker(config, storage_url, tracking_uri, threads, on_trial=report,
                       progress=not quiet)
        else:
            _run_processes(config, storage_url, tracking_uri, workers, threads, study, report)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        with shielded():
            close_orphaned_runs(study, client)
            publish_front(prepared)
            client.set_terminated(prepared.parent_run_id, status=status)
    return study


def _run_processes(config: ExperimentConfig, storage_url: str, tracking_uri: str, workers: int,
                   threads: int, study: optuna.Study, report: Callable[[FrozenTrial], None]
                   ) -> None:
    """Start worker processes and print their trials as they finish, by polling the storage."""
    already = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_process,
                                 args=(config, storage_url, tracking_uri, threads, worker))
                 for worker in range(workers)]
    for process in processes:
        process.start()
    try:
        while any(p.is_alive() for p in processes):
            time.sleep(2)
            raise_if_stop_requested()
            _report_new(study, already, report)
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the worker records its trial as interrupted
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()  # it did not reach a training step in time; heartbeats retry its trial
        raise
    _report_new(study, already, report)
    crashed = [p.exitcode for p in processes if p.exitcode != 0]
    if crashed:
        raise WorkerError(f"{len(crashed)} of {workers} workers exited with an error "
                          f"(exit codes {crashed}); finished trials are kept, re-run to continue")


def _report_new(study: optuna.Study, already: set[int], report: Callable[[FrozenTrial], None]
                ) -> None:
    for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished() and trial.number not in already:
            already.add(trial.number)
            if not trial.user_attrs.get(ATTR_SURPLUS):
                report(trial)
