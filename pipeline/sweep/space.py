"""The search space and the sampler: what each trial tries, resolved and checked once per study."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import optuna

from pipeline.config import TUTORIAL_RECIPE, ConfigError, ExperimentConfig, replace_train
from pipeline.front import SearchBounds
from pipeline.train import penalty_weight_for_strength

FLOOR_MARGIN = 1.05  # the lowest target searched sits this far above the input-layer floor
# What each searched parameter means, stored in the study where optuna-dashboard shows it.
PARAM_MEANINGS = {
    "penalty_strength": "weight on the squared relative SynOps excess ((S - T) / T)^2, log scale "
                        "(for mse converted to the tutorial's scale)",
    "target_synops": "T: SynOps per sample the penalty aims below, log scale, from just above the "
                     "input-layer floor to the unpenalised base model's SynOps",
    "penalty": "shape of the penalty: hinge (one-sided) or mse (the tutorial's, symmetric)",
    "epochs": "fine-tuning epochs from the shared base model",
    "lr": "fine-tuning learning rate (Adam, cosine schedule)",
}


def resolve_target_bounds(config: ExperimentConfig, floor: float, base_synops: float = math.inf
                          ) -> tuple[float, float]:
    """`study.space.target_synops` with 0 read as measured: just above the input-layer floor
    (SynOps no training can remove) up to the unpenalised base model's SynOps. Called before the
    base model is trained (`base_synops` unknown: only an explicit upper bound is checked) and
    after. Raises `ConfigError` when the range is empty."""
    low, high = config.study.space.target_synops
    low, high = low or floor * FLOOR_MARGIN, high or base_synops
    if not 0 < low < high:
        raise ConfigError(
            "study.space.target_synops",
            f"{list(config.study.space.target_synops)} resolves to [{low:.3g}, {high:.3g}], an empty "
            f"range (input-layer floor {floor:.3g}: a 0 low bound is {FLOOR_MARGIN} x the floor; "
            f"a 0 high bound is the base model's SynOps, {base_synops:.3g})")
    return low, high


def resolve_bounds(config: ExperimentConfig, floor: float, base_synops: float) -> SearchBounds:
    space = config.study.space
    return SearchBounds(
        penalty_strength=(space.penalty_strength[0], space.penalty_strength[1]),
        target_synops=resolve_target_bounds(config, floor, base_synops),
        penalties=tuple(space.penalties),
        epochs=(space.epochs[0], space.epochs[1]) if space.epochs else None,
        lr=(space.lr[0], space.lr[1]) if space.lr else None,
    )


def sampler_seed(study_seed: int, worker: int, trials_so_far: int) -> int:
    """A seed of its own for every worker and every start: workers with one seed propose the same
    parameters, and a resumed study reseeded as at its start repeats its first trials."""
    return int(np.random.SeedSequence([study_seed, worker, trials_so_far]).generate_state(1)[0])


def make_sampler(config: ExperimentConfig, bounds: SearchBounds, seed: int
                 ) -> optuna.samplers.BaseSampler:
    """The configured sampler; `grid` spans each bound with `grid_points` log-spaced values.
    TPE's constant liar keeps parallel workers away from running trials."""
    study = config.study
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


def suggest_config(trial: optuna.Trial, bounds: SearchBounds, config: ExperimentConfig
                   ) -> ExperimentConfig:
    """The fine-tuning config this trial tries. The searched `penalty_strength` weighs the squared
    relative excess ((S - T) / T)^2 whichever the penalty's shape."""
    strength = trial.suggest_float("penalty_strength", *bounds.penalty_strength, log=True)
    target = trial.suggest_float("target_synops", *bounds.target_synops, log=True)
    penalty = (trial.suggest_categorical("penalty", list(bounds.penalties))
               if len(bounds.penalties) > 1 else bounds.penalties[0])
    changes: dict[str, Any] = {
        "penalty": penalty, "target_synops": target,
        "penalty_weight": penalty_weight_for_strength(penalty, strength, target),
    }
    if bounds.epochs:
        changes["epochs"] = trial.suggest_int("epochs", *bounds.epochs)
    if bounds.lr:
        changes["lr"] = trial.suggest_float("lr", *bounds.lr, log=True)
    return replace_train(config, **changes)


def reference_config(config: ExperimentConfig) -> ExperimentConfig:
    """The tutorial's recipe on this study's data and model: from scratch, no base model."""
    recipe = {f.name: getattr(TUTORIAL_RECIPE, f.name) for f in dataclasses.fields(TUTORIAL_RECIPE)
              if f.name not in ("seed", "max_batches", "init_from")}
    return dataclasses.replace(replace_train(config, **recipe), pretrain=None)
