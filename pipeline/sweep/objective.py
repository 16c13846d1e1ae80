"""The objective: one trial fine-tunes its variant's base model as a child MLflow run."""

from __future__ import annotations

import math
from collections.abc import Callable

import optuna
import torch
from optuna.trial import TrialState

from pipeline.config import ExperimentConfig
from pipeline.data import Dataset
from pipeline.errors import PipelineError
from pipeline.front import (
    ATTR_FAILURE,
    ATTR_INFEASIBLE,
    ATTR_INPUT_SHAPE,
    ATTR_NUM_CLASSES,
    ATTR_PRUNED,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    ATTR_SECONDS,
    ATTR_SURPLUS,
    ATTR_TARGET,
    ATTR_TEST,
    ATTR_VAL,
    ATTR_VARIANT,
    ATTR_WORKER,
    BaseRecord,
    is_finished,
)
from pipeline.inputs import StudyInputs
from pipeline.interrupt import shielded
from pipeline.retry import ServerUnavailableError
from pipeline.run import run_tracked
from pipeline.sweep.bases import BaseTraining, ensure_variant_base
from pipeline.sweep.lease import LeaseLostError, holder
from pipeline.sweep.space import reference_config, suggest_config, suggest_variant
from pipeline.sweep.storage import PreparedStudy
from pipeline.tracking import TAG_ROLE, Tracker, TrackingError
from pipeline.train import EpochStats, TrainingCut
from pipeline.variants import Variant

# A trial is pruned after an epoch (not its last) when a finished trial is at least this much more
# accurate on validation (fraction) with at most 1 / this factor of its validation SynOps: "clearly
# dominated". Later epochs of a penalised trial lower its SynOps, often by a third or more, and add
# a few tenths of a point: both margins stay clear of that.
PRUNE_MARGINS = (0.01, 2.0)

# The role a base-model run is given when the worker that trained it lost the lease meanwhile and
# the study recorded another one (it stays FINISHED; `synops.discarded_reason` says why).
BASE_DISCARDED_ROLE = "base-discarded"

# The SynOps objective of an infeasible trial (its network does not fit the chip; it is not
# trained): Optuna keeps infeasible trials off the front whatever their values.
INFEASIBLE_SYNOPS = math.inf


class BaseModelUnavailableError(PipelineError, RuntimeError):
    """A base model of the study cannot be read back, so no trial can fine-tune it."""


class VariantBases:
    """What trials of each variant start from, in this worker: its data (encoded once, by the
    inputs) and its base model's weights, trained (under the study's lease) or read on first use."""

    def __init__(self, config: ExperimentConfig, prepared: PreparedStudy, inputs: StudyInputs,
                 training: BaseTraining) -> None:
        self.config, self.prepared, self.inputs, self.training = config, prepared, inputs, training
        self._states: dict[Variant, dict[str, torch.Tensor]] = {}

    def base(self, variant: Variant) -> BaseRecord:
        return ensure_variant_base(self.prepared.study, self.prepared.storage, self.config,
                                   variant, self.inputs, self.training)

    def target_range(self, variant: Variant) -> tuple[float, float]:
        return self.base(variant).target_synops

    def data(self, variant: Variant) -> Dataset:
        return self.inputs.dataset(variant)

    def state(self, variant: Variant) -> dict[str, torch.Tensor]:
        """The base model's weights, read once per worker; `BaseModelUnavailableError` when its
        checkpoint cannot be read."""
        if variant not in self._states:
            base = self.base(variant)
            try:
                self._states[variant] = self.training.tracker.load_checkpoint(base.run_id)
            except TrackingError as err:
                raise BaseModelUnavailableError(
                    f"the base model of variant {variant.label} of study '{self.config.name}' "
                    f"cannot be read ({err}); its trials fine-tune it, so the study cannot go on: "
                    "restore that run's artifacts, or start a new study under another `name`") from err
        return self._states[variant]


class TrialRunner:
    """Callable objective returning (validation accuracy, mean validation SynOps).

    Trials use the current config, which `check_resumable` has checked against the study's own
    (they differ at most in where files live and on which device training runs).
    """

    def __init__(self, config: ExperimentConfig, prepared: PreparedStudy, bases: VariantBases,
                 progress: bool, should_stop: Callable[[], bool]) -> None:
        self.config = config
        self.prepared = prepared
        self.tracker: Tracker = bases.training.tracker
        self.bases = bases
        self.progress = progress
        self.should_stop = should_stop
        self.trial_number: int | None = None  # the trial this worker runs or ran last
        self.values: tuple[float, float] | None = None  # what the objective returned for it
        self.unavailable: ServerUnavailableError | None = None  # a server the last trial lost

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        """True when the study already has `n_trials` finished or earlier running trials."""
        taken = [t for t in self.prepared.study.get_trials(deepcopy=False)
                 if is_finished(t) or (t.state == TrialState.RUNNING and t.number < trial.number)]
        return len(taken) >= self.config.study.n_trials

    def _fits_the_chip(self, trial: optuna.Trial, variant: Variant) -> bool:
        """With a chip constraint, record the variant's fit as the trial's constraint (0: fits; else
        the number of problems, so samplers learn how far off it is) and, when it does not fit,
        why: such a trial is infeasible, and never trained."""
        chip = self.config.study.constraints.chip
        if not chip:
            return True
        mapping = self.bases.inputs.chip_mapping(variant, chip)
        trial.set_constraint(chip, float(len(mapping.problems)))
        if not mapping.fits:
            trial.set_user_attr(ATTR_INFEASIBLE, mapping.summary()[:2000])
        return mapping.fits

    def _prune_if_dominated(self, trial: optuna.Trial, epochs: int) -> Callable[[EpochStats], None]:
        """After each epoch but the last, stop the trial (`TrainingCut`) when a finished trial
        beats it by `PRUNE_MARGINS` on both objectives."""
        accuracy_margin, synops_factor = PRUNE_MARGINS

        def check(stats: EpochStats) -> None:
            if stats.epoch >= epochs:
                return
            for done in self.prepared.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if ATTR_VAL not in done.user_attrs:
                    continue
                accuracy, synops = done.values
                if (accuracy >= stats.val_accuracy + accuracy_margin
                        and synops * synops_factor <= stats.val_synops):
                    reason = (f"after epoch {stats.epoch} of {epochs} (val {stats.val_accuracy:.2%} at "
                              f"{stats.val_synops:.3g} SynOps) dominated by far by trial {done.number} "
                              f"(val {accuracy:.2%} at {synops:.3g})")
                    trial.set_user_attr(ATTR_PRUNED, reason)
                    raise TrainingCut(reason)

        return check

    def _base(self, variant: Variant) -> BaseRecord:
        """The base model of `variant`, trained first if needed. A worker that lost the lease
        while training it (a database restart ended its session) asks once more: whoever holds
        the lease now recorded it, or will, or this worker does, reusing the run it finished.
        A run it trained that the study did not record is re-tagged `base-discarded`, so each
        variant keeps one base-model run."""
        started = len(self.tracker.started_runs)
        try:
            return self.bases.base(variant)
        except LeaseLostError as lost:
            record = self.bases.base(variant)
            for run_id in self.tracker.started_runs[started:]:
                if run_id != record.run_id:
                    self.tracker.set_tag(run_id, TAG_ROLE, BASE_DISCARDED_ROLE)
                    self.tracker.set_tag(run_id, "synops.discarded_reason",
                                         f"{lost}; the study's base model is run {record.run_id}"[:5000])
            return record

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        """Run `trial`: fine-tune its variant's base model (the reference trial: the tutorial's
        recipe from scratch) as a child run, and return its validation accuracy and SynOps.

        A trial whose network does not fit the chip returns (0, inf) untrained; one already in
        excess of `n_trials`, or dominated by far after an epoch, is pruned. Whatever it raises
        is recorded (`fail_reason`) and re-raised, so Optuna fails the trial; a
        `ServerUnavailableError` is also kept in `unavailable`, for the worker to stop on."""
        self.values, self.unavailable = None, None
        if self._is_surplus(trial):
            trial.set_user_attr(ATTR_SURPLUS, True)
            raise optuna.TrialPruned("the study already has n_trials trials")
        self.trial_number = trial.number
        trial.set_user_attr(ATTR_WORKER, holder())
        reference = bool(trial.user_attrs.get(ATTR_REFERENCE))
        kind = "reference" if reference else "trial"
        tags = {TAG_ROLE: kind, "trial_number": str(trial.number), "synops.study": self.config.name}
        bounds = self.prepared.record.bounds
        try:
            variant = self.bases.inputs.reference_variant if reference else suggest_variant(trial, bounds)
            trial.set_user_attr(ATTR_VARIANT, variant.to_record())
            if not self._fits_the_chip(trial, variant):
                return 0.0, INFEASIBLE_SYNOPS
            if reference:
                config, init_state = reference_config(self.config, variant), None
            else:  # its variant's base model may be trained first, here or by another worker
                self._base(variant)
                config, variant = suggest_config(trial, bounds, self.config, self.bases.target_range,
                                                 variant)
                init_state = self.bases.state(variant)
                tags["synops.base_run_id"] = self.bases.base(variant).run_id
            data = self.bases.data(variant)
            trial.set_user_attr(ATTR_INPUT_SHAPE, list(data.input_shape))
            trial.set_user_attr(ATTR_NUM_CLASSES, data.num_classes)
            trial.set_user_attr(ATTR_TARGET, config.train.target_synops)
            prune = self.config.study.prune_dominated and not reference
            result = run_tracked(
                config, data, self.tracker, self.prepared.experiment_id, tags,
                init_state=init_state, run_name=f"{kind}-{trial.number}",
                parent_run_id=self.prepared.record.parent_run_id,
                extra_params={f"search.{k}": v for k, v in trial.params.items()},
                progress=self.progress, should_stop=self.should_stop,
                on_start=lambda run_id: trial.set_user_attr(ATTR_RUN_ID, run_id),
                on_epoch=self._prune_if_dominated(trial, config.train.epochs) if prune else None,
            )
        except TrainingCut as cut:
            raise optuna.TrialPruned(str(cut)) from cut
        except BaseException as err:
            if isinstance(err, ServerUnavailableError):
                self.unavailable = err
            with shielded():
                trial.set_user_attr(ATTR_FAILURE, f"{type(err).__name__}: {err}"[:2000])
            raise
        trial.set_user_attr(ATTR_VAL, result.val.to_record())
        trial.set_user_attr(ATTR_TEST, result.test.to_record())
        trial.set_user_attr(ATTR_SECONDS, result.seconds)
        self.values = (result.val.accuracy, result.val.synops_mean)
        return self.values
