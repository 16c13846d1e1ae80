"""The study's storage and its one-time preparation (base model, bounds, parent run, reference trial).

Optuna's RDB storage is the distributed engine: workers on this or other machines share one
storage, and heartbeats turn a trial whose process died into FAIL and retry it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.config import ConfigError, ExperimentConfig, SNNConfig, differing_keys, flatten
from pipeline.data import Dataset
from pipeline.evaluate import evaluate
from pipeline.front import (
    ATTR_BASE,
    ATTR_BOUNDS,
    ATTR_CONFIG,
    ATTR_PARENT_RUN,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    ATTR_SCHEMA,
    DIRECTIONS,
    OBJECTIVE_NAMES,
    SCHEMA_VERSION,
    BaseRecord,
    SearchBounds,
    StudyRecord,
)
from pipeline.model import build_model
from pipeline.run import ensure_base_model
from pipeline.sweep.space import PARAM_MEANINGS, resolve_bounds, resolve_target_bounds
from pipeline.tracking import TAG_ROLE, Tracker
from pipeline.train import EpochStats

# Heartbeats, stale-trial retries and metric names are marked experimental; we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# Keys a resumed study may change: how long it runs, how it watches its workers, where this
# machine keeps its files and computes, its sampler seed (each machine of a team needs its own),
# the budgets a report quotes and how members are checked as spiking networks. Everything else
# defines what the trials mean.
RESUMABLE_KEYS = frozenset({
    "study.n_trials", "study.max_consecutive_failures", "study.heartbeat_interval",
    "study.grace_period", "study.seed", "study.confirm_seeds", "data.root", "data.verify_checksums",
    "device",
    "report.budgets", *(f"snn.{f.name}" for f in dataclasses.fields(SNNConfig)),
})


class StudyNotFoundError(LookupError):
    """No study of that name in the storage."""


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


def load_study(name: str, storage_url: str) -> optuna.Study:
    """An existing study, for reading (report, export)."""
    try:
        return optuna.load_study(study_name=name, storage=storage_url)
    except KeyError:
        raise StudyNotFoundError(f"no study named '{name}' in {storage_url}: run `synops sweep` "
                                 "with this config first") from None


@dataclass(frozen=True)
class PreparedStudy:
    """What every worker shares: the study, its record and its MLflow experiment."""

    study: optuna.Study
    record: StudyRecord
    experiment_id: str


def check_resumable(record: StudyRecord, config: ExperimentConfig) -> None:
    """Refuse to resume with a config that would change what the study's trials mean (a new
    validation split, say, would choose the front on the base model's training images)."""
    changed = differing_keys(record.config.to_dict(), config.to_dict(), RESUMABLE_KEYS)
    if changed:
        stored, current = flatten(record.config.to_dict()), flatten(config.to_dict())
        details = "; ".join(f"{k}: study has {stored.get(k)!r}, config has {current.get(k)!r}"
                            for k in changed)
        raise ConfigError("config", f"study '{record.name}' was created with another config "
                          f"({details}). Only {', '.join(sorted(RESUMABLE_KEYS))} may change on "
                          "resume: restore those values, or give the new config another `name`")


def close_orphaned_runs(study: optuna.Study, tracker: Tracker) -> None:
    """Mark KILLED the MLflow runs of failed trials whose process died while they were RUNNING."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(ATTR_RUN_ID)
        if run_id and tracker.status(run_id) == "RUNNING":
            tracker.close(run_id, "KILLED", "worker process died (heartbeat expired)")


def ensure_reference_trial(study: optuna.Study, config: ExperimentConfig) -> None:
    """Queue the tutorial's recipe unless a finished, running or queued trial already carries it
    (so one that failed or was interrupted runs again)."""
    if not config.study.reference_trial:
        return
    alive = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    if not any(t.user_attrs.get(ATTR_REFERENCE) for t in study.get_trials(deepcopy=False, states=alive)):
        study.enqueue_trial({}, user_attrs={ATTR_REFERENCE: "tutorial"})


def _searched(bounds: SearchBounds) -> list[str]:
    optional = [k for k in ("epochs", "lr") if getattr(bounds, k)]
    return ["penalty_strength", "target_synops", *(["penalty"] if len(bounds.penalties) > 1 else []),
            *optional]


def _create_record(study: optuna.Study, config: ExperimentConfig, storage_url: str,
                   tracker: Tracker, experiment_id: str, dataset: Callable[[], Dataset], progress: bool,
                   should_stop: Callable[[], bool],
                   on_epoch: Callable[[EpochStats], None] | None) -> StudyRecord:
    """Check the search space, train (or reuse) the base model, open the parent run, and store
    the study's record. The record version is written last: a preparation that dies half-way is
    redone."""
    data = dataset()
    floor = evaluate(build_model(config.model).to(config.device), data.val).input_layer_synops
    resolve_target_bounds(config, floor)  # an empty range is refused before any training
    base = ensure_base_model(config, data, tracker, experiment_id, progress, should_stop, on_epoch)
    bounds = resolve_bounds(config, base.val.input_layer_synops, base.val.synops_mean)
    parent = tracker.start_run(experiment_id, f"study-{config.name}", {
        TAG_ROLE: "study", "synops.study": config.name, "synops.storage": storage_url,
        "synops.sampler": config.study.sampler,
        "synops.base_run_id": base.run_id,
    })
    space = {f"study.space.{k}": v for k, v in bounds.to_record().items()}
    study_params = {k: v for k, v in flatten(config.to_dict()).items() if k.startswith("study.")
                    and not k.startswith("study.space.")}
    parent.log_params(study_params | space | {"study.input_layer_synops": floor})
    record = StudyRecord(config.name, config, bounds,
                         BaseRecord(base.run_id, base.val, base.test), parent.run_id)
    study.set_metric_names(list(OBJECTIVE_NAMES))  # optuna-dashboard labels its plots with them
    study.set_user_attr("objectives", "val_accuracy: accuracy on the validation split (maximised); "
                        "val_synops_mean: mean SynOps per validation sample (minimised)")
    study.set_user_attr("searched_parameters", {k: PARAM_MEANINGS[k] for k in _searched(bounds)})
    study.set_user_attr(ATTR_CONFIG, config.to_dict())
    study.set_user_attr(ATTR_BOUNDS, bounds.to_record())
    study.set_user_attr(ATTR_BASE, record.base.to_record())
    study.set_user_attr(ATTR_PARENT_RUN, parent.run_id)
    study.set_user_attr(ATTR_SCHEMA, SCHEMA_VERSION)
    return record


def prepare_study(config: ExperimentConfig, storage_url: str, tracker: Tracker,
                  dataset: Callable[[], Dataset], progress: bool = True,
                  should_stop: Callable[[], bool] = lambda: False,
                  on_epoch: Callable[[EpochStats], None] | None = None) -> PreparedStudy:
    """Create or resume the study before any worker starts. `dataset` is called only when the
    data is needed (a new study); `on_epoch` receives the base model's epochs if it is trained."""
    if config.pretrain is None:
        raise ConfigError("pretrain", "a sweep fine-tunes a base model: add a [pretrain] table")
    if config.train.init_from:
        raise ConfigError("train.init_from", "a sweep fine-tunes the study's own base model and "
                          "would ignore this checkpoint: remove it (use `synops train` for it)")
    experiment_id = tracker.experiment(config.name)
    study = optuna.create_study(study_name=config.name, storage=open_storage(storage_url, config),
                                directions=DIRECTIONS, load_if_exists=True)
    if ATTR_SCHEMA in study.user_attrs or study.trials:
        record = StudyRecord.load(study)  # StudyFormatError for another version's study
        check_resumable(record, config)
        optuna.storages.fail_stale_trials(study)
        close_orphaned_runs(study, tracker)
        tracker.reopen(record.parent_run_id)
    else:  # new, or a preparation that died before it finished
        unfinished = study.user_attrs.get(ATTR_PARENT_RUN)
        if unfinished and tracker.status(unfinished) == "RUNNING":
            tracker.close(unfinished, "FAILED", "the study's preparation did not finish; redone")
        record = _create_record(study, config, storage_url, tracker, experiment_id, dataset,
                                progress, should_stop, on_epoch)
    ensure_reference_trial(study, config)
    return PreparedStudy(study, record, experiment_id)
