"""The objective: one trial fine-tunes the study's base model as a child MLflow run."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import optuna
import torch
from optuna.trial import TrialState

from pipeline.config import ExperimentConfig
from pipeline.data import Dataset
from pipeline.front import (
    ATTR_FAILURE,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    ATTR_SECONDS,
    ATTR_SURPLUS,
    ATTR_TEST,
    ATTR_VAL,
)
from pipeline.interrupt import shielded
from pipeline.run import run_tracked
from pipeline.sweep.space import reference_config, suggest_config
from pipeline.sweep.storage import PreparedStudy
from pipeline.tracking import TAG_ROLE, Tracker


class TrialRunner:
    """Callable objective returning (validation accuracy, mean validation SynOps).

    Trials use the current config, which `check_resumable` has checked against the study's own
    (they differ at most in where files live and on which device training runs).
    """

    def __init__(self, config: ExperimentConfig, prepared: PreparedStudy, tracker: Tracker,
                 dataset: Dataset, base_state: Mapping[str, torch.Tensor], progress: bool,
                 should_stop: Callable[[], bool]) -> None:
        self.config = config
        self.prepared = prepared
        self.tracker = tracker
        self.dataset = dataset
        self.base_state = base_state
        self.progress = progress
        self.should_stop = should_stop

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
        reference = bool(trial.user_attrs.get(ATTR_REFERENCE))
        if reference:
            config, init_state = reference_config(self.config), None
        else:
            config = suggest_config(trial, self.prepared.record.bounds, self.config)
            init_state = self.base_state
        kind = "reference" if reference else "trial"
        try:
            result = run_tracked(
                config, self.dataset, self.tracker, self.prepared.experiment_id,
                {TAG_ROLE: kind, "trial_number": str(trial.number), "synops.study": self.config.name},
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
