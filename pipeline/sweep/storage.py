"""The study's storage and its one-time preparation (parent run, record, starter and reference
trials), and the checks that a resumed study still means what it meant.

Optuna's RDB storage is the distributed engine: workers on this or other machines share one
storage, heartbeats turn a trial whose process died into FAIL and retry it, and a lease kept in it
makes the preparation happen once however many workers start together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.trial import TrialState

from pipeline.config import ExperimentConfig, SNNConfig, differing_keys, flatten
from pipeline.errors import ConfigError, PipelineError
from pipeline.front import (
    ATTR_BOUNDS,
    ATTR_CONFIG,
    ATTR_INPUTS,
    ATTR_PARENT_RUN,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    ATTR_SCHEMA,
    DIRECTIONS,
    OBJECTIVE_NAMES,
    SCHEMA_VERSION,
    SearchBounds,
    StudyRecord,
)
from pipeline.inputs import StudyInputs, fingerprint_changes
from pipeline.retry import ServerUnavailableError, ServerWait, connection_lost, first_line
from pipeline.secrets import redact_text, redact_url
from pipeline.sweep.lease import Lease, lease, lease_name
from pipeline.sweep.space import StudyPlan, parameter_meaning, starter_params
from pipeline.tracking import TAG_ROLE, Tracker
from pipeline.variants import Variant, searched_parameters

# Heartbeats, stale-trial retries and metric names are marked experimental; we rely on them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# Keys a resumed study may change: how long it runs, how it watches its workers, where this
# machine keeps its files and computes, its sampler seed (each machine of a team needs its own),
# the budgets a report quotes and how members are checked as spiking networks. Everything else
# defines what the trials mean.
RESUMABLE_KEYS = frozenset({
    "study.n_trials", "study.max_consecutive_failures", "study.heartbeat_interval",
    "study.grace_period", "study.wait_timeout", "study.seed", "study.confirm_seeds",
    "study.confirm_members", "data.root", "data.verify_checksums",
    "device",
    "report.budgets", *(f"snn.{f.name}" for f in dataclasses.fields(SNNConfig)),
})


class StudyNotFoundError(PipelineError, LookupError):
    """No study of that name in the storage."""


def resolve_storage(explicit: str | None = None) -> str:
    """`--storage`, else the project's SQLite file next to the MLflow store."""
    return explicit or DEFAULT_STORAGE


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options per database: SQLite workers wait for its write lock; a server
    database gets a small pool per worker (so many workers do not exhaust its connections) whose
    connections are checked before use (a server restart or idle timeout drops them)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_size": 2, "max_overflow": 2, "pool_pre_ping": True, "pool_recycle": 1800}


STORAGE_ATTEMPTS = 5
STORAGE_NAME = "the Optuna storage"  # how messages name the database server of a study

# RDBStorage's operations that are harmless to run twice (reads; attributes, parameters and
# heartbeats written again with the same value), named as Optuna's `_CachedStorage`, which wraps
# every RDB storage a study uses, calls them (private ones included).
REPEATABLE = (
    "get_all_studies", "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "set_study_user_attr", "set_study_system_attr",
    "get_trial", "get_trial_id_from_study_id_trial_number", "_get_trials", "_get_best_trial_id",
    "_set_trial_param", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "record_heartbeat",
)


def _once_more_if_cut(operation: Callable[..., Any]) -> Callable[..., Any]:
    """`operation`, run once more when a lost connection cut it short."""
    @functools.wraps(operation)
    def repeated(self: optuna.storages.RDBStorage, *args: Any, **kwargs: Any) -> Any:
        try:
            return operation(self, *args, **kwargs)
        except Exception as err:
            if not connection_lost(err):
                raise
            return operation(self, *args, **kwargs)

    return repeated


def _repeating(names: tuple[str, ...]) -> Callable[[type], type]:
    """A class decorator: the class's operations `names` (inherited from `RDBStorage`) run once
    more when a lost connection cut them short."""
    def decorate(cls: type) -> type:
        for name in names:
            setattr(cls, name, _once_more_if_cut(getattr(optuna.storages.RDBStorage, name)))
        return cls

    return decorate


@_repeating((*REPEATABLE, "_get_stale_trial_ids"))
class _RepeatingStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose harmless operations run once more after a lost connection."""


class ReconnectingStorage(_RepeatingStorage):
    """Optuna's RDB storage that rides out a restart of its database server.

    Operations cut short by a lost connection (the restart ended the session under them) run
    once more, on a new connection, where running them twice is harmless (`REPEATABLE`): a
    heartbeat or a trial's attribute is then written as if nothing happened. Creating a study or
    a trial and changing a trial's state are not repeated (a repeat could create a second trial,
    or find its trial already finished): their error reaches the caller (`run_worker` reads the
    trial back). New connections wait for a server that is still down (`server_wait`, set by
    `open_storage`). For `grace_period` after the server came back, no trial is taken for dead:
    the heartbeats of live workers, held up by the same outage, are not all in yet. "Came back"
    is what this worker saw, or, for PostgreSQL, the server's own start time on its own clock: a
    worker that saw no outage (it was idle, or connected after it) would otherwise fail the trials
    of every worker that could not heartbeat while the server was down."""

    server_wait: ServerWait | None = None

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        if self.server_wait is not None and self.server_wait.back_within(grace):
            return []
        if self._server_up_for() < grace:
            return []
        return super()._get_stale_trial_ids(study_id)

    def _server_up_for(self) -> float:
        """Seconds since the database server started, by its own clock (PostgreSQL; infinite for
        other databases, which say nothing of it)."""
        if self.engine.dialect.name != "postgresql":
            return math.inf
        with self.engine.connect() as connection:
            return float(connection.execute(sqlalchemy.text(
                "SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")).scalar_one())


def open_storage(url: str, config: ExperimentConfig) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with heartbeats: a trial whose worker died is failed and retried.

    Workers started together on a new PostgreSQL database all create Optuna's tables at once,
    and all but one can fail on the database's catalogue (a unique violation); creating tables
    that exist is a no-op, so that, and a server not yet accepting connections, is retried
    (`STORAGE_ATTEMPTS` times). Once open, a PostgreSQL storage rides out a server restart
    (`ReconnectingStorage`): new connections wait for the server for up to `study.wait_timeout`
    seconds (`ServerWait`), after which its operations raise `ServerUnavailableError`, and no
    trial is taken for dead while heartbeats resume. Raises `ServerUnavailableError` when the
    storage cannot be opened, naming it with its password redacted."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    attempt, started = 1, time.monotonic()
    while True:
        try:
            storage = ReconnectingStorage(
                url,
                engine_kwargs=engine_options(url),
                heartbeat_interval=config.study.heartbeat_interval,
                grace_period=config.study.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=2),
            )
            break
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
            if attempt == STORAGE_ATTEMPTS:
                cause = redact_text(first_line(err.__cause__ or err), url)
                raise ServerUnavailableError(
                    f"cannot open {STORAGE_NAME} at {redact_url(url)} (tried {attempt} times in "
                    f"{time.monotonic() - started:.0f} s): {cause}") from err
            time.sleep(attempt)
            attempt += 1
    if not url.startswith("sqlite"):
        storage.server_wait = ServerWait(STORAGE_NAME, url, config.study.wait_timeout)
        storage.server_wait.attach(storage.engine)
    return storage


def load_study(name: str, storage_url: str) -> optuna.Study:
    """An existing study, for reading (report, export)."""
    try:
        return optuna.load_study(study_name=name, storage=storage_url)
    except KeyError:
        raise StudyNotFoundError(f"no study named '{name}' in {redact_url(storage_url)}: run `synops sweep` "
                                 "with this config first") from None


@dataclass(frozen=True)
class PreparedStudy:
    """What every worker shares: the study, its storage (for leases), its record and its MLflow
    experiment."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    record: StudyRecord
    experiment_id: str


def check_resumable(record: StudyRecord, config: ExperimentConfig, inputs: StudyInputs) -> None:
    """Refuse to resume with a config that would change what the study's trials mean (a new
    validation split, say, would choose the front on the base model's training images), or
    after the data's arrays or a network's parameter shapes changed underneath the same config."""
    changed = differing_keys(record.config.to_dict(), config.to_dict(), RESUMABLE_KEYS)
    if changed:
        stored, current = flatten(record.config.to_dict()), flatten(config.to_dict())
        details = "; ".join(f"{k}: study has {stored.get(k)!r}, config has {current.get(k)!r}"
                            for k in changed)
        raise ConfigError(changed[0], f"study '{record.name}' was created with another config "
                          f"({details}). Only {', '.join(sorted(RESUMABLE_KEYS))} may change on "
                          "resume: restore those values, or give the new config another `name`")
    drifted = fingerprint_changes(record.fingerprints, inputs.fingerprints)
    if drifted:
        key = "data.source" if drifted[0].startswith("the data") else "model.factory"
        raise ConfigError(key, f"study '{record.name}' cannot resume: {'; '.join(drifted)}. "
                          "Restore them, or give the config another `name` for a new study")


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
    return [*searched_parameters(list(bounds.variants)), "penalty_strength", "target_position",
            *(["penalty"] if len(bounds.penalties) > 1 else []), *optional]


def _create_record(study: optuna.Study, config: ExperimentConfig, storage_url: str,
                   inputs: StudyInputs, plan: StudyPlan, tracker: Tracker, experiment_id: str,
                   held: Lease) -> StudyRecord:
    """Open the parent run, store the study's record and queue the starter trial; no model is
    trained here (each variant's base model is trained when a trial first needs it). The record
    version is written after the rest of the record and before any trial is queued: a
    preparation that dies before it is redone; one that dies after it resumes (without a starter
    trial, at worst)."""
    bounds = plan.bounds
    held.verify()  # a holder that lost the lease meanwhile must not open a second parent run
    parent = tracker.start_run(experiment_id, f"study-{config.name}", {
        TAG_ROLE: "study", "synops.study": config.name, "synops.storage": redact_url(storage_url),
        "synops.sampler": config.study.sampler,
    })
    space = {f"study.space.{k}": v for k, v in bounds.to_record().items() if k != "variants"}
    space["study.variants"] = [v.label for v in bounds.variants]
    study_params = {k: v for k, v in flatten(config.to_dict()).items() if k.startswith("study.")
                    and not k.startswith("study.space.")}
    floors = {f"study.input_layer_synops.{v.slug}": plan.floors[v.key] for v in bounds.variants}
    parent.log_params(study_params | space | floors)
    first: Variant = bounds.variants[0]
    record = StudyRecord(config.name, config, bounds, {}, parent.run_id, inputs.kind,
                         inputs.raw[first.data_key(config)].num_classes, dict(inputs.fingerprints))
    study.set_metric_names(list(OBJECTIVE_NAMES))  # optuna-dashboard labels its plots with them
    study.set_user_attr("objectives", "val_accuracy: accuracy on the validation split (maximised); "
                        "val_synops_mean: mean SynOps per validation sample (minimised)")
    study.set_user_attr("searched_parameters", {k: parameter_meaning(k) for k in _searched(bounds)})
    study.set_user_attr(ATTR_CONFIG, config.to_dict())
    study.set_user_attr(ATTR_BOUNDS, bounds.to_record())
    study.set_user_attr(ATTR_INPUTS, {"kind": record.kind, "num_classes": record.num_classes,
                                      "fingerprints": record.fingerprints})
    study.set_user_attr(ATTR_PARENT_RUN, parent.run_id)
    held.verify()
    study.set_user_attr(ATTR_SCHEMA, SCHEMA_VERSION)
    if config.study.starter_trial and config.study.sampler != "grid":
        chip = config.study.constraints.chip
        study.enqueue_trial(starter_params(bounds, plan, lambda v: not chip
                                           or inputs.chip_mapping(v, chip).fits))
    return record


def prepare_study(config: ExperimentConfig, storage_url: str, tracker: Tracker, inputs: StudyInputs,
                  plan: StudyPlan, should_stop: Callable[[], bool] = lambda: False,
                  on_wait: Callable[[str], None] | None = None) -> PreparedStudy:
    """Create or resume the study before this worker runs trials; `inputs` and `plan` are already
    checked (`load_inputs`, `plan_study`). However many workers (here or on other machines) start
    together, one prepares it under a lease while the others wait (`on_wait` gets a line), then
    check and resume it. No model is trained here."""
    experiment_id = tracker.experiment(config.name)
    storage = open_storage(storage_url, config)
    study = optuna.create_study(study_name=config.name, storage=storage, directions=DIRECTIONS,
                                load_if_exists=True)
    with lease(storage, lease_name(config.name, "prepare"), config.study.wait_timeout, on_wait,
               should_stop) as held:
        if ATTR_SCHEMA in study.user_attrs or study.trials:
            record = StudyRecord.load(study)  # StudyFormatError for another version's study
            check_resumable(record, config, inputs)
            optuna.storages.fail_stale_trials(study)
            close_orphaned_runs(study, tracker)
            tracker.reopen(record.parent_run_id)
        else:  # new, or a preparation that died before it finished
            unfinished = study.user_attrs.get(ATTR_PARENT_RUN)
            if unfinished and tracker.status(unfinished) == "RUNNING":
                tracker.close(unfinished, "FAILED", "the study's preparation did not finish; redone")
            record = _create_record(study, config, storage_url, inputs, plan, tracker, experiment_id,
                                    held)
        held.verify()  # a holder that lost the lease meanwhile must not queue a second reference
        ensure_reference_trial(study, config)
    return PreparedStudy(study, storage, record, experiment_id)
