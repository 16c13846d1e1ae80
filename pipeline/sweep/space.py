"""The search space and the sampler: what each trial tries, resolved and checked once per study."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from pipeline.config import TUTORIAL_RECIPE, ExperimentConfig, replace_train
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate
from pipeline.front import SearchBounds
from pipeline.inputs import StudyInputs
from pipeline.train import penalty_weight_for_strength
from pipeline.variants import (
    DATA_PREFIX,
    MODEL_PREFIX,
    Variant,
    parameters_of,
    searched_parameters,
    variant_of,
)

FLOOR_MARGIN = 1.05  # the lowest target searched sits this far above the input-layer floor
# What each searched parameter means, stored in the study where optuna-dashboard shows it.
PARAM_MEANINGS = {
    "penalty_strength": "weight on the squared relative SynOps excess ((S - T) / T)^2, log scale "
                        "(for mse converted to the tutorial's scale)",
    "spikes_per_pixel": "input encoding: the most spikes a pixel becomes (pixel value 0..255 "
                        "-> 0..k); each value has its own base model and input-layer floor",
    MODEL_PREFIX: "argument of the network factory (each value a variant with its own base model)",
    DATA_PREFIX: "argument of the data source (each value a variant with its own base model)",
    "target_position": "where T, the SynOps per sample the penalty aims below, sits between just "
                       "above the encoding's input-layer floor (0) and its base model's SynOps "
                       "(1), log scale",
    "penalty": "shape of the penalty: hinge (one-sided) or mse (the tutorial's, symmetric)",
    "epochs": "fine-tuning epochs from the shared base model",
    "lr": "fine-tuning learning rate (Adam, cosine schedule)",
}


def resolve_target_bounds(config: ExperimentConfig, floor: float, base_synops: float = math.inf
                          ) -> tuple[float, float]:
    """`study.space.target_synops` with 0 read as measured: just above the input-layer floor
    (SynOps no training can remove) up to the unpenalised base model's SynOps. Called before the
    base model is trained (`base_synops` unknown: only an explicit upper bound is checked) and
    after. Raises `ConfigError` when the configured range is empty. A base model that needs no
    more than 1.05 x its floor (its deeper layers barely spike) leaves nothing to search: the
    range is that one target, and its trials fine-tune without an active penalty."""
    low, high = config.study.space.target_synops
    configured_high = high
    low, high = low or floor * FLOOR_MARGIN, high or base_synops
    if not configured_high and math.isfinite(base_synops) and high <= low:
        return low, low
    if not 0 < low < high or high <= floor:
        raise ConfigError(
            "study.space.target_synops",
            f"{list(config.study.space.target_synops)} resolves to [{low:.3g}, {high:.3g}], an empty "
            f"range (input-layer floor {floor:.3g}, which no training can go below: a 0 low bound is "
            f"{FLOOR_MARGIN} x the floor; a 0 high bound is the base model's SynOps, {base_synops:.3g})")
    return low, high


def search_bounds(config: ExperimentConfig, variants: list[Variant]) -> SearchBounds:
    space = config.study.space
    return SearchBounds(
        penalty_strength=(space.penalty_strength[0], space.penalty_strength[1]),
        target_synops=(space.target_synops[0], space.target_synops[1]),
        penalties=tuple(space.penalties),
        epochs=(space.epochs[0], space.epochs[1]) if space.epochs else None,
        lr=(space.lr[0], space.lr[1]) if space.lr else None,
        variants=tuple(variants),
    )


@dataclass(frozen=True)
class StudyPlan:
    """The study's search space, checked: its bounds, and each variant's input-layer floor
    (the SynOps of its first layer on the validation data, which no training can remove)."""

    bounds: SearchBounds
    floors: dict[str, float]  # by variant key


def plan_study(config: ExperimentConfig, inputs: StudyInputs) -> StudyPlan:
    """Check what a sweep of `config` needs, before any store is touched: a base model to
    fine-tune, no checkpoint it would ignore, a non-empty target range on every variant and, with
    a chip constraint, at least one variant whose network fits the chip. Raises `ConfigError`
    naming the key."""
    if config.pretrain is None:
        raise ConfigError("pretrain", "a sweep fine-tunes a base model: add a [pretrain] table")
    if config.train.init_from:
        raise ConfigError("train.init_from", "a sweep fine-tunes the study's own base model and "
                          "would ignore this checkpoint: remove it (use `synops train` for it)")
    chip = config.study.constraints.chip
    if chip and not any(inputs.chip_mapping(v, chip).fits for v in inputs.variants):
        reasons = "; ".join(f"{v.label}: {inputs.chip_mapping(v, chip).summary()}" for v in inputs.variants)
        raise ConfigError("study.constraints.chip", f"no variant of the study fits {chip} ({reasons})")
    floors = {}
    for variant in inputs.variants:
        network = inputs.network(variant).to(config.device)
        floors[variant.key] = evaluate(network, inputs.dataset(variant).val).input_layer_synops
        resolve_target_bounds(variant.apply(config), floors[variant.key])  # refuses an empty range
    return StudyPlan(search_bounds(config, inputs.variants), floors)


def starter_params(bounds: SearchBounds, plan: StudyPlan, fits: Callable[[Variant], bool]
                   ) -> dict[str, Any]:
    """The parameters of the study's first trial: the variant with the lowest input-layer floor
    among those that fit (the coarsest encoding: its trials reach the fewest SynOps, and its base
    model is the first one trained), the geometric middle of the penalty strength, the middle of
    the target range, the fewest epochs and the middle learning rate."""
    variant = min((v for v in bounds.variants if fits(v)), key=lambda v: plan.floors[v.key])
    params: dict[str, Any] = {**parameters_of(variant, list(bounds.variants)),
                              "penalty_strength": math.sqrt(bounds.penalty_strength[0]
                                                            * bounds.penalty_strength[1]),
                              "target_position": 0.5}
    if len(bounds.penalties) > 1:
        params["penalty"] = bounds.penalties[0]
    if bounds.epochs:
        params["epochs"] = bounds.epochs[0]
    if bounds.lr:
        params["lr"] = math.sqrt(bounds.lr[0] * bounds.lr[1])
    return params


def parameter_meaning(name: str) -> str:
    """What a searched parameter means, for the study's record (optuna-dashboard shows it)."""
    for prefix in (MODEL_PREFIX, DATA_PREFIX):
        if name.startswith(prefix):
            return f"{name.removeprefix(prefix)}: {PARAM_MEANINGS[prefix]}"
    return PARAM_MEANINGS[name]


def sampler_seed(study_seed: int, worker_number: int) -> int:
    """A seed of its own for every worker start (`claim_worker_number`): workers with one seed
    propose the same parameters, and a resumed study reseeded as at its start repeats its first
    trials. The study's first worker always gets the same seed, so a one-worker study repeats."""
    return int(np.random.SeedSequence([study_seed, worker_number]).generate_state(1)[0])


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
            "target_position": [i / (study.grid_points - 1) for i in range(study.grid_points)],
        }
        grid |= searched_parameters(list(bounds.variants))
        if len(bounds.penalties) > 1:
            grid["penalty"] = list(bounds.penalties)
        if bounds.epochs:
            grid["epochs"] = sorted({bounds.epochs[0], bounds.epochs[1]})
        if bounds.lr:
            grid["lr"] = list(bounds.lr)
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def suggest_variant(trial: optuna.Trial, bounds: SearchBounds) -> Variant:
    """The variant (encoding, network and source arguments) this trial tries: the searched ones
    are categorical parameters, suggested first."""
    choices = searched_parameters(list(bounds.variants))
    return variant_of({name: trial.suggest_categorical(name, values)
                       for name, values in choices.items()}, list(bounds.variants))


def suggest_config(trial: optuna.Trial, bounds: SearchBounds, config: ExperimentConfig,
                   target_range: Callable[[Variant], tuple[float, float]],
                   variant: Variant | None = None) -> tuple[ExperimentConfig, Variant]:
    """The config this trial tries, its variant (`suggest_variant`, unless already suggested)
    and its fine-tuning. The target is searched as a position between the ends of its variant's
    `target_range` (a fixed [0, 1] for the sampler, whatever the variant); the searched
    `penalty_strength` weighs the squared relative excess ((S - T) / T)^2 whichever the
    penalty's shape."""
    variant = variant or suggest_variant(trial, bounds)
    strength = trial.suggest_float("penalty_strength", *bounds.penalty_strength, log=True)
    position = trial.suggest_float("target_position", 0.0, 1.0)
    low, high = target_range(variant)
    target = low * (high / low) ** position
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
    return replace_train(variant.apply(config), **changes), variant


def reference_config(config: ExperimentConfig, variant: Variant) -> ExperimentConfig:
    """The tutorial's recipe on this study's data and network in the tutorial's `variant` (a
    pixel value is that many spikes): from scratch, no base model."""
    recipe = {f.name: getattr(TUTORIAL_RECIPE, f.name) for f in dataclasses.fields(TUTORIAL_RECIPE)
              if f.name not in ("seed", "max_batches", "init_from")}
    return dataclasses.replace(replace_train(variant.apply(config), **recipe), pretrain=None)
