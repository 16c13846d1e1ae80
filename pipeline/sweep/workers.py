"""The sweep's loop: workers run trials until the study has `n_trials` finished ones, print a line
per trial, and keep the study's parent MLflow run up to date with the front."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from pipeline.config import TUTORIAL_RECIPE, ExperimentConfig
from pipeline.errors import PipelineError
from pipeline.evaluate import Evaluation
from pipeline.figures import pareto_png
from pipeline.front import (
    ATTR_FAILURE,
    ATTR_INFEASIBLE,
    ATTR_PRUNED,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    ATTR_SECONDS,
    ATTR_SURPLUS,
    ATTR_TARGET,
    ATTR_TEST,
    ATTR_VAL,
    ATTR_VARIANT,
    ATTR_WORKER_STARTS,
    StudyRecord,
    front_table,
    hypervolume,
    hypervolume_reference,
    parent_run_tags,
    study_bases,
    study_counts,
    trials_frame,
)
from pipeline.inputs import load_inputs
from pipeline.interrupt import raise_if_stop_requested, shielded, stop_on_signals, stop_requested
from pipeline.memory import keep_freed_memory
from pipeline.retry import connection_lost, first_line
from pipeline.sweep.bases import BaseTraining
from pipeline.sweep.confirm import confirm_front
from pipeline.sweep.deployment import deploy_front
from pipeline.sweep.lease import lease, lease_name
from pipeline.sweep.objective import TrialRunner, VariantBases
from pipeline.sweep.space import make_sampler, plan_study, sampler_seed
from pipeline.sweep.storage import PreparedStudy, close_orphaned_runs, open_storage, prepare_study
from pipeline.tracking import PublishError, Tracker
from pipeline.train import EpochStats, epoch_line
from pipeline.variants import Variant


class WorkerError(PipelineError, RuntimeError):
    """A sweep worker process ended with an error."""


class TooManyFailuresError(PipelineError, RuntimeError):
    """`study.max_consecutive_failures` trials in a row failed: something is wrong beyond one trial."""


class _WithoutInterruptTracebacks(logging.Filter):
    """Optuna logs each failed trial with its traceback; for Ctrl-C that is one screenful per
    worker of noise, since the CLI reports the interruption and the trial and run record it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is KeyboardInterrupt)


logging.getLogger("optuna.study._optimize").addFilter(_WithoutInterruptTracebacks())


def trial_line(trial: FrozenTrial) -> str:
    """One human line for a finished trial: number, params, val/test accuracy and SynOps, time."""
    variant = trial.user_attrs.get(ATTR_VARIANT)
    where = f" [{Variant.from_record(variant).label}]" if variant else ""
    if trial.user_attrs.get(ATTR_REFERENCE):
        recipe = TUTORIAL_RECIPE
        params = (f"tutorial recipe{where} (from scratch, {recipe.penalty} {recipe.penalty_weight:g} -> "
                  f"{recipe.target_synops:g}, {recipe.epochs} epochs)")
    else:
        resolved = {k: trial.user_attrs[k] for k in (ATTR_TARGET,) if k in trial.user_attrs}
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in (trial.params | resolved).items()) + where
    if ATTR_PRUNED in trial.user_attrs:
        return f"trial {trial.number:3d} pruned: {params} | {trial.user_attrs[ATTR_PRUNED]}"
    if trial.state != TrialState.COMPLETE:
        reason = trial.user_attrs.get(ATTR_FAILURE, "process died or was interrupted")
        return f"trial {trial.number:3d} {trial.state.name}: {params} | {reason}"
    if ATTR_INFEASIBLE in trial.user_attrs:
        why = trial.user_attrs[ATTR_INFEASIBLE]
        return f"trial {trial.number:3d} infeasible, not trained: {params} | {why}"
    val = Evaluation.from_record(trial.user_attrs[ATTR_VAL])
    test = Evaluation.from_record(trial.user_attrs[ATTR_TEST])
    return (f"trial {trial.number:3d} | {params} | val {val.accuracy:.2%} {val.synops_mean:.3g} | "
            f"test {test.accuracy:.2%} {test.synops_mean:.3g} | "
            f"{trial.user_attrs.get(ATTR_SECONDS, math.nan):.0f} s")


def publish_front(prepared: PreparedStudy, tracker: Tracker, with_metrics: bool = True) -> None:
    """Log the current front (front.csv, pareto.png) and, `with_metrics`, the study's summary
    metrics at the latest trial's step (finished and failed trials, front size, hypervolume) to
    the study's parent run."""
    study, record = prepared.study, prepared.record
    frame = trials_frame(study)
    if frame.empty:
        return
    front = front_table(frame)
    counts = study_counts(study)
    parent = tracker.run(record.parent_run_id)
    latest = int(frame["trial"].max())
    points = list(zip(frame["val_accuracy"], frame["val_synops_mean"], strict=True))
    if with_metrics:
        parent.log_metrics({
            "finished_trials": counts.finished, "failed_trials": counts.failed,
            "front_size": len(front), "hypervolume": hypervolume(points, hypervolume_reference(record)),
        }, step=latest)
    with tempfile.TemporaryDirectory() as tmp:
        front.to_csv(Path(tmp) / "front.csv", index=False)
        pareto_png(frame, study.study_name, Path(tmp) / "pareto.png", study_bases(study))
        parent.log_folder(Path(tmp))
    parent.set_tags(parent_run_tags(study, frame, with_report=tracker.has_artifact(
        record.parent_run_id, "report/index.html")))


def _publish_or_warn(prepared: PreparedStudy, tracker: Tracker, with_metrics: bool = True) -> str | None:
    """Publish the front (`publish_front`); if that fails (a full artifact store), warn on stderr
    and return the reason, so that the trials go on: the sweep publishes once more when they are
    done and fails if that fails too (`run_sweep`). None when it was published."""
    try:
        publish_front(prepared, tracker, with_metrics)
    except Exception as err:  # noqa: BLE001 - whatever it is, the trials go on; the caller decides
        reason = f"{type(err).__name__}: {err}"
        print(f"warning: could not publish the front to MLflow ({reason}); the trials go on and the "
              "sweep tries again when they are done", file=sys.stderr)
        return reason
    return None


def base_epoch_echo(echo: Callable[[str], None], config: ExperimentConfig
                    ) -> Callable[[Variant, EpochStats], None]:
    """Log lines for a base model's epochs, where there are no progress bars."""
    epochs = config.pretrain.epochs if config.pretrain else 0
    return lambda variant, stats: echo(f"base model ({variant.label}) {epoch_line(stats, epochs)}")


def _finished_meanwhile(study: optuna.Study, number: int | None) -> bool:
    return number is not None and study.trials[number].state.is_finished()


def _superseded(study: optuna.Study, number: int, tracker: Tracker,
                echo: Callable[[str], None]) -> None:
    """Record that trial `number` of this worker was failed by another worker meanwhile."""
    reason = ("another worker took this trial for dead (its heartbeat came too late) and failed "
              "it; a retry of it is queued")
    echo(f"trial {number}: {reason}")
    run_id = study.trials[number].user_attrs.get(ATTR_RUN_ID)
    if run_id:
        tracker.close(run_id, "FAILED", reason)


def worker_training(config: ExperimentConfig, prepared: PreparedStudy, tracker: Tracker,
                    progress: bool, echo: Callable[[str], None]) -> BaseTraining:
    """How this worker trains a base model it is the first to need."""
    return BaseTraining(tracker, prepared.experiment_id, progress, stop_requested,
                        None if progress else base_epoch_echo(echo, config), echo)


def claim_worker_number(config: ExperimentConfig, prepared: PreparedStudy) -> int:
    """A number no other worker of this study has had, on this machine or another: the same
    command started on every machine must not propose the same trials."""
    study = config.study
    with lease(prepared.storage, lease_name(config.name, "workers"), study.wait_timeout,
               should_stop=stop_requested) as held:
        number = prepared.study.user_attrs.get(ATTR_WORKER_STARTS, 0)
        held.verify()
        prepared.study.set_user_attr(ATTR_WORKER_STARTS, number + 1)
    return number


def run_worker(config: ExperimentConfig, prepared: PreparedStudy, bases: VariantBases,
               on_trial: Callable[[FrozenTrial], None] | None = None, progress: bool = False,
               echo: Callable[[str], None] = print) -> None:
    """Run trials until the study has `n_trials` finished ones. Safe to run in several processes
    (or on several machines sharing one RDB storage and one MLflow server): each seeds its
    sampler with a worker number of its own. Base models of further variants are trained when a
    trial first needs one (`bases`).

    A server that restarts is waited for (the storage and the tracker wait, bounded); when the
    database connection is cut under a trial's start or end, the trial is read back and recorded
    as its objective ended, never left RUNNING. Raises `TooManyFailuresError`
    after `study.max_consecutive_failures` of its trials failed in a row, and
    `ServerUnavailableError` when a server did not come back in time (the trial it cut short is
    failed with that reason when the database can still record it).
    """
    study, tracker = prepared.study, bases.training.tracker
    study.sampler = make_sampler(config, prepared.record.bounds,
                                 sampler_seed(config.study.seed, claim_worker_number(config, prepared)))
    for base in study_bases(study).values():  # one that cannot be read stops the worker before any trial
        bases.state(base.variant)
    runner = TrialRunner(config, prepared, bases, progress, stop_requested)
    failed_in_a_row: list[FrozenTrial] = []

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get(ATTR_SURPLUS):
            return
        if trial.state == TrialState.COMPLETE:
            failed_in_a_row.clear()
            _publish_or_warn(prepared, tracker)
        elif ATTR_PRUNED in trial.user_attrs:
            failed_in_a_row.clear()
        elif trial.state == TrialState.FAIL:
            failed_in_a_row.append(trial)
        if on_trial is not None:
            on_trial(trial)

    def finished() -> int:
        return study_counts(study).finished

    def open_slots() -> int:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return config.study.n_trials - finished() - len(running)

    def settle_cut_trial(err: Exception) -> None:
        """The database connection was cut under a step that is not repeated (a trial's creation
        or its final state: a server restart ended the session). The trial this worker ran last,
        if the storage still shows it RUNNING, ended here: recorded COMPLETE with the values its
        objective returned (finished work is kept), else FAIL, and reported as any finished
        trial. Reading it back waits for the server (`ServerUnavailableError` if it does not
        return)."""
        number = runner.trial_number
        trial = study.trials[number] if number is not None else None
        echo(f"the connection to the study's database was cut ({first_line(err)}); reconnected")
        if trial is None or trial.state != TrialState.RUNNING:
            return  # recorded before the cut, or taken for dead by another worker
        if runner.values is not None:
            study.tell(number, runner.values, skip_if_finished=True)
        else:
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        after_trial(study, study.trials[number])

    grid = study.sampler if isinstance(study.sampler, optuna.samplers.GridSampler) else None
    while finished() < config.study.n_trials and not (grid and grid.is_exhausted(study)):
        raise_if_stop_requested()
        if len(failed_in_a_row) >= config.study.max_consecutive_failures:
            last = failed_in_a_row[-1]
            raise TooManyFailuresError(
                f"{len(failed_in_a_row)} trials failed in a row (study.max_consecutive_failures), "
                f"the last, trial {last.number}: {last.user_attrs.get(ATTR_FAILURE, 'no reason')}. "
                "Finished trials are kept; fix the cause and re-run to continue")
        try:
            if open_slots() > 0:
                try:
                    study.optimize(runner, n_trials=1, catch=(Exception,), callbacks=[after_trial])
                except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                    # Optuna refuses the result of a trial that is already finished ("Cannot tell
                    # a FAIL trial"): another worker took it for dead (its heartbeat came too
                    # late) and failed it, and queued a retry. This worker goes on with the study.
                    if not _finished_meanwhile(study, runner.trial_number):
                        raise
                    _superseded(study, runner.trial_number, tracker, echo)
                if runner.unavailable is not None:  # its trial failed with the reason
                    raise runner.unavailable
                continue
            # Every open slot is taken by a running trial: wait, in case its worker died and the
            # heartbeat turns it into a retry this worker should run.
            time.sleep(config.study.heartbeat_interval)
            optuna.storages.fail_stale_trials(study)
        except Exception as err:
            if not connection_lost(err):
                raise
            settle_cut_trial(err)



def _worker_process(config: ExperimentConfig, storage_url: str, tracking_uri: str,
                    threads: int, worker: int) -> None:
    keep_freed_memory()
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracker = Tracker(tracking_uri)
    storage = open_storage(storage_url, config)
    study = optuna.load_study(study_name=config.name, storage=storage)
    prepared = PreparedStudy(study, storage, StudyRecord.load(study), tracker.experiment(config.name))
    # The parent reports the interruption; the worker only records its trial.
    with stop_on_signals(repeat_interrupts=False), contextlib.suppress(KeyboardInterrupt):
        try:
            echo = functools.partial(print, f"worker {worker}:")
            bases = VariantBases(config, prepared, load_inputs(config),
                                 worker_training(config, prepared, tracker, False, echo))
            run_worker(config, prepared, bases, echo=echo)
        except PipelineError as err:  # too many failures, a lease, a server that did not come back
            print(f"worker {worker}: {err}", file=sys.stderr)
            sys.exit(3)


def run_sweep(config: ExperimentConfig, storage_url: str, tracking_uri: str, workers: int = 1,
              progress: bool = True, echo: Callable[[str], None] = print) -> optuna.Study:
    """`synops sweep`: prepare the study, run `workers` worker processes until it has `n_trials`
    finished trials, confirm the front with more seeds, and publish the front to MLflow. With
    `progress`, bars and a line per trial; without (a log file), `echo` gets a line per
    base-model epoch, trial and confirmation. The data and networks are loaded and checked first,
    once in this process: a `ConfigError` leaves both stores untouched. Whatever happens, the
    parent run is closed (unless workers elsewhere still run trials). Raises what stopped the
    trials or confirmations (e.g. `ConfirmationError`); after they all finished, `PublishError`
    (exit 1) if the front could not be published to the parent run, finished work kept."""
    inputs = load_inputs(config)
    plan = plan_study(config, inputs)
    tracker = Tracker(tracking_uri)
    prepared = prepare_study(config, storage_url, tracker, inputs, plan, should_stop=stop_requested,
                             on_wait=echo)
    study = prepared.study
    bar = tqdm(total=config.study.n_trials, initial=study_counts(study).finished, desc=config.name,
               unit="trial", disable=not progress)

    def report(trial: FrozenTrial) -> None:
        if not progress:
            echo(trial_line(trial))
            return
        bar.write(trial_line(trial))
        bar.n = study_counts(study).finished
        bar.refresh()

    status = "FAILED"
    line = bar.write if progress else echo
    # This process's base models, read once for its trials and confirmations.
    bases = functools.cache(lambda: VariantBases(
        config, prepared, inputs, worker_training(config, prepared, tracker, progress, line)))
    try:
        if workers == 1:
            torch.set_num_threads(usable_cores())
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            run_worker(config, prepared, bases(), on_trial=report, progress=progress, echo=line)
        else:
            _run_processes(config, storage_url, tracking_uri, workers, study, report)
        if config.study.confirm_seeds and study_counts(study).finished >= config.study.n_trials:
            confirm_front(config, prepared, bases(), progress, stop_requested, line)
        if config.study.constraints.chip and study_counts(study).finished >= config.study.n_trials:
            deploy_front(config, prepared, inputs, tracker, stop_requested, line)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        with shielded():
            try:
                close_orphaned_runs(study, tracker)
                unpublished = _publish_or_warn(prepared, tracker, with_metrics=False)
            finally:
                _close_parent_unless_others_run(prepared, tracker, status)
    if unpublished:  # reached only when nothing else went wrong, which would be the news
        raise PublishError(
            f"the front could not be published to the study's MLflow run {prepared.record.parent_run_id} "
            f"({unpublished}); the trials are kept: fix the cause and re-run `synops sweep` to publish it")
    return study


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (`taskset`, a container's cpuset), not
    every core of the machine, which `os.cpu_count()` counts; threads beyond them only contend."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _close_parent_unless_others_run(prepared: PreparedStudy, tracker: Tracker, status: str) -> None:
    """Close the study's parent run, unless workers elsewhere still run trials of it: the last
    worker to stop closes it (this worker's own trials are all finished by now)."""
    optuna.storages.fail_stale_trials(prepared.study)
    if not prepared.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tracker.close(prepared.record.parent_run_id, status)


def _run_processes(config: ExperimentConfig, storage_url: str, tracking_uri: str, workers: int,
                   study: optuna.Study, report: Callable[[FrozenTrial], None]) -> None:
    """Start worker processes and print their trials as they finish, by polling the storage."""
    threads = max(1, usable_cores() // workers)
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
                          f"(exit codes {crashed}; their messages are above); finished trials "
                          "are kept, re-run to continue")


def _report_new(study: optuna.Study, already: set[int], report: Callable[[FrozenTrial], None]
                ) -> None:
    for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished() and trial.number not in already:
            already.add(trial.number)
            if not trial.user_attrs.get(ATTR_SURPLUS):
                report(trial)
