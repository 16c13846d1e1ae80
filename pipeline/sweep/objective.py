"""The objective: one trial fine-tunes its input encoding's base model as a child MLflow run."""

from __future__ import annotations

import functools
from collections.abc import Callable

import optuna
import torch
from optuna.trial import TrialState

from pipeline.config import ExperimentConfig
from pipeline.data import Dataset
from pipeline.front import (
    ATTR_ENCODING,
    ATTR_FAILURE,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    ATTR_SECONDS,
    ATTR_SURPLUS,
    ATTR_TARGET,
    ATTR_TEST,
    ATTR_VAL,
    ATTR_WORKER,
    BaseRecord,
)
from pipeline.interrupt import shielded
from pipeline.run import run_tracked
from pipeline.sweep.bases import BaseTraining, ensure_encoding_base
from pipeline.sweep.lease import holder
from pipeline.sweep.space import reference_config, suggest_config
from pipeline.sweep.storage import PreparedStudy
from pipeline.tracking import TAG_ROLE, Tracker, TrackingError


class BaseModelUnavailableError(RuntimeError):
    """A base model of the study cannot be read back, so no trial can fine-tune it."""


class EncodedBases:
    """What trials of each input encoding start from, in this worker: the data encoded once and
    the base model's weights, each made (or trained, under the study's lease) on first use."""

    def __init__(self, config: ExperimentConfig, prepared: PreparedStudy, pixels: Dataset,
                 training: BaseTraining) -> None:
        self.config, self.prepared, self.pixels, self.training = config, prepared, pixels, training

    def base(self, spikes_per_pixel: int) -> BaseRecord:
        return ensure_encoding_base(self.prepared.study, self.prepared.storage, self.config,
                                    spikes_per_pixel, self.pixels, self.training)

    def target_range(self, spikes_per_pixel: int) -> tuple[float, float]:
        return self.base(spikes_per_pixel).target_synops

    @functools.cache  # noqa: B019 - one per worker, kept for its life
    def data(self, spikes_per_pixel: int) -> Dataset:
        return self.pixels.encoded(spikes_per_pixel)

    @functools.cache  # noqa: B019 - one per worker, kept for its life
    def state(self, spikes_per_pixel: int) -> dict[str, torch.Tensor]:
        base = self.base(spikes_per_pixel)
        try:
            return self.training.tracker.load_checkpoint(base.run_id)
        except TrackingError as err:
            raise BaseModelUnavailableError(
                f"the base model for {spikes_per_pixel} spikes per pixel of study "
                f"'{self.config.name}' cannot be read ({err}); its trials fine-tune it, so the "
                "study cannot go on: restore that run's artifacts, or start a new study under "
                "another `name`") from err


class TrialRunner:
    """Callable objective returning (validation accuracy, mean validation SynOps).

    Trials use the current config, which `check_resumable` has checked against the study's own
    (they differ at most in where files live and on which device training runs).
    """

    def __init__(self, config: ExperimentConfig, prepared: PreparedStudy, bases: EncodedBases,
                 progress: bool, should_stop: Callable[[], bool]) -> None:
        self.config = config
        self.prepared = prepared
        self.tracker: Tracker = bases.training.tracker
        self.bases = bases
        self.progress = progress
        self.should_stop = should_stop
        self.trial_number: int | None = None  # the trial this worker runs or ran last

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
        self.trial_number = trial.number
        trial.set_user_attr(ATTR_WORKER, holder())
        reference = bool(trial.user_attrs.get(ATTR_REFERENCE))
        kind = "reference" if reference else "trial"
        tags = {TAG_ROLE: kind, "trial_number": str(trial.number), "synops.study": self.config.name}
        try:
            if reference:
                config, init_state = reference_config(self.config), None
            else:  # its encoding's base model may be trained first, here or by another worker
                config = suggest_config(trial, self.prepared.record.bounds, self.config,
                                        self.bases.target_range)
                init_state = self.bases.state(config.data.spikes_per_pixel)
                tags["synops.base_run_id"] = self.bases.base(config.data.spikes_per_pixel).run_id
            encoding = config.data.spikes_per_pixel
            trial.set_user_attr(ATTR_ENCODING, encoding)
            trial.set_user_attr(ATTR_TARGET, config.train.target_synops)
            result = run_tracked(
                config, self.bases.data(encoding), self.tracker, self.prepared.experiment_id, tags,
                init_state=init_state, run_name=f"{kind}-{trial.number}",
                parent_run_id=self.prepared.record.parent_run_id,
                extra_params={f"search.{k}": v for k, v in trial.params.items()},
                progress=self.progress, should_stop=self.should_stop,
                on_start=lambda run_id: trial.set_user_attr(ATTR_RUN_ID, run_id),
            )
        except BaseException as err:
            with shielded():
                trial.set_user_attr(ATTR_FAILURE, f"{type(err).__name__}: {err}"[:2000])
            raise
        trial.set_user_attr(ATTR_VAL, result.val.to_record())
        trial.set_user_attr(ATTR_TEST, result.test.to_record())
        trial.set_user_attr(ATTR_SECONDS, result.seconds)
        return result.val.accuracy, result.val.synops_mean
