"""The study's base models, one per variant: each trained once, when the first trial of its variant
needs it, under a lease so that workers on several machines share it, and recorded in
the study with the range of SynOps targets searched on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optuna

from pipeline.config import ExperimentConfig
from pipeline.front import ATTR_PARENT_RUN, BaseRecord, base_attr
from pipeline.inputs import StudyInputs
from pipeline.run import ensure_base_model
from pipeline.sweep.lease import lease, lease_name
from pipeline.sweep.space import resolve_target_bounds
from pipeline.tracking import Tracker
from pipeline.train import EpochStats
from pipeline.variants import Variant


@dataclass(frozen=True)
class BaseTraining:
    """How this worker trains a base model when it is the one to: where its runs go, and the
    callbacks for progress, stop requests and waiting on another worker."""

    tracker: Tracker
    experiment_id: str
    progress: bool = True
    should_stop: Callable[[], bool] = lambda: False
    on_epoch: Callable[[Variant, EpochStats], None] | None = None
    on_wait: Callable[[str], None] | None = None


def ensure_variant_base(study: optuna.Study, storage: optuna.storages.BaseStorage,
                        config: ExperimentConfig, variant: Variant, inputs: StudyInputs,
                        training: BaseTraining) -> BaseRecord:
    """The base model of `variant` recorded in the study; if there is none yet, trained (or a
    finished MLflow run of the same data, network and pretraining reused) by whichever worker
    takes the lease first, while the others wait for it."""
    attr = base_attr(variant)
    if attr in study.user_attrs:
        return BaseRecord.from_record(study.user_attrs[attr])
    study_config = config.study
    with lease(storage, lease_name(config.name, f"base-{variant.key}"), study_config.wait_timeout,
               training.on_wait, training.should_stop) as held:
        stored = study.user_attrs.get(attr)  # another worker may have trained it while we waited
        if stored is not None:
            return BaseRecord.from_record(stored)
        designed = variant.apply(config)
        on_epoch = training.on_epoch
        base = ensure_base_model(designed, inputs.dataset(variant), training.tracker,
                                 training.experiment_id, inputs.base_fingerprints(variant),
                                 training.progress, training.should_stop,
                                 on_epoch and (lambda stats: on_epoch(variant, stats)))
        record = BaseRecord(variant, base.run_id, base.val, base.test,
                            resolve_target_bounds(designed, base.val.input_layer_synops,
                                                  base.val.synops_mean))
        held.verify()  # a holder that lost its lease meanwhile must not record its base model
        study.set_user_attr(attr, record.to_record())
        log_base_to_parent(training.tracker, study.user_attrs[ATTR_PARENT_RUN], record)
        return record


def log_base_to_parent(tracker: Tracker, parent_run_id: str, base: BaseRecord) -> None:
    """The variant's base model and resolved target range, as params of the study's run."""
    prefix = f"study.base.{base.variant.slug}"
    tracker.run(parent_run_id).log_params({
        f"{prefix}.run_id": base.run_id, f"{prefix}.target_synops": list(base.target_synops),
        f"{prefix}.input_layer_synops": base.val.input_layer_synops})
