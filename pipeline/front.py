"""The study's record, and the choices a user makes from it: the front, the knee, the best network
within a budget, the hypervolume. Read only from what the study stored; no plotting, no MLflow.

Choices use validation numbers only (the objectives); test numbers are what gets reported.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from pipeline.config import TUTORIAL_RECIPE, ExperimentConfig, config_from_dict
from pipeline.errors import PipelineError
from pipeline.evaluate import (
    Deployment,
    Evaluation,
    SpikingEvaluation,
    SpikingFailure,
    energy_per_sample,
    spiking_result_from_record,
)
from pipeline.variants import DATA_PREFIX, MODEL_PREFIX, Variant

# The objectives, in Optuna's order: validation accuracy up, mean validation SynOps per sample down.
DIRECTIONS = ("maximize", "minimize")
OBJECTIVE_NAMES = ("val_accuracy", "val_synops_mean")
# Study user attributes: the record a study keeps of itself (version 2 adds config and base model,
# version 3 one base model per input encoding, version 4 one per variant and the inputs' kind and
# fingerprints).
SCHEMA_VERSION = 4
ATTR_SCHEMA = "schema_version"
ATTR_CONFIG = "config"
ATTR_BOUNDS = "search_bounds"
ATTR_INPUTS = "inputs"  # the data's kind and the fingerprints of data and networks
BASE_ATTR_PREFIX = "base_model."  # + variant key: that variant's base model, once trained
ATTR_PARENT_RUN = "mlflow_parent_run_id"
ATTR_WORKER_STARTS = "worker_starts"  # how many workers have started on the study, anywhere
# Trial user attributes.
ATTR_REFERENCE = "reference"  # "tutorial" on the trial that runs the tutorial's recipe
ATTR_RUN_ID = "mlflow_run_id"
ATTR_FAILURE = "fail_reason"
ATTR_VAL = "val"
ATTR_TEST = "test"
ATTR_SECONDS = "seconds"
ATTR_SURPLUS = "surplus"  # pruned at once: the study already had n_trials trials
ATTR_VARIANT = "variant"  # the trial's variant (encoding and searched arguments), searched or not
ATTR_INPUT_SHAPE = "input_shape"  # (C, H, W) of its data, to rebuild its network
ATTR_NUM_CLASSES = "num_classes"
ATTR_TARGET = "target_synops"  # the SynOps target its position resolved to, on its variant
ATTR_INFEASIBLE = "infeasible"  # why its network does not fit the study's chip (not trained)
ATTR_PRUNED = "pruned"  # why it was stopped early: clearly dominated after an epoch
ATTR_WORKER = "worker"  # host:pid of the process that ran it, to trace a trial to its machine
# Study user attributes per member checked as a spiking network or for a chip (finished trials
# are read-only).
SNN_ATTR_PREFIX = "snn_check."
DEPLOY_ATTR_PREFIX = "deploy."
# The trials table's parameter columns; searched factory and source arguments (`model.*`, `data.*`)
# follow them.
PARAM_COLUMNS = ("spikes_per_pixel", "penalty", "penalty_strength", "target_position",
                 "target_synops", "epochs", "lr")

KNEE_BULGE = "bulge"
KNEE_IDEAL = "ideal"
KNEE_SINGLE = "single"


class NoSuchTrialError(PipelineError, LookupError):
    """The study has no finished trial to choose (none yet, or not the one asked for)."""


class StudyFormatError(PipelineError, RuntimeError):
    """The study lacks the record this version reads (made by an older version, or not by us)."""


@dataclass(frozen=True)
class SearchBounds:
    """The search space, fixed when the study is created. `target_synops` is as configured (0 =
    measured); each variant's resolved range is stored with its base model."""

    penalty_strength: tuple[float, float]
    target_synops: tuple[float, float]
    penalties: tuple[str, ...]
    epochs: tuple[int, int] | None
    lr: tuple[float, float] | None
    variants: tuple[Variant, ...]  # in the study's order: encodings largest first, args as listed

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["variants"] = [v.to_record() for v in self.variants]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SearchBounds:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
        values["variants"] = tuple(Variant.from_record(v) for v in record["variants"])
        return cls(**values)


@dataclass(frozen=True)
class BaseRecord:
    """The unpenalised base model of one variant, which that variant's trials fine-tune: its run,
    how it scored, and the range of SynOps targets searched on it (just above its input-layer
    floor up to its own SynOps)."""

    variant: Variant
    run_id: str
    val: Evaluation
    test: Evaluation
    target_synops: tuple[float, float]

    def to_record(self) -> dict[str, Any]:
        return {"variant": self.variant.to_record(), "run_id": self.run_id,
                "val": self.val.to_record(), "test": self.test.to_record(),
                "target_synops": list(self.target_synops)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BaseRecord:
        low, high = record["target_synops"]
        return cls(Variant.from_record(record["variant"]), record["run_id"],
                   Evaluation.from_record(record["val"]), Evaluation.from_record(record["test"]),
                   (low, high))


def base_attr(variant: Variant) -> str:
    return f"{BASE_ATTR_PREFIX}{variant.key}"


def study_bases(study: optuna.Study) -> dict[str, BaseRecord]:
    """The base models trained so far, by variant key (read afresh: other workers add them)."""
    return {key.removeprefix(BASE_ATTR_PREFIX): BaseRecord.from_record(value)
            for key, value in study.user_attrs.items() if key.startswith(BASE_ATTR_PREFIX)}


def stored_config(values: dict[str, Any]) -> dict[str, Any]:
    """A study's stored config as this version reads it: a study stored before `precision`
    existed trained in float32, and keeps doing so when resumed (not "auto", which would switch
    its new trials to bfloat16)."""
    values = copy.deepcopy(values)
    for stage in ("train", "pretrain"):
        if values.get(stage) is not None:
            values[stage].setdefault("precision", "float32")
    return values


@dataclass(frozen=True)
class StudyRecord:
    """What a study stored about itself: its config, search space, parent run, the kind and
    fingerprints of its inputs, and the base models trained so far (each when a trial of its
    variant first needed it)."""

    name: str
    config: ExperimentConfig
    bounds: SearchBounds
    bases: dict[str, BaseRecord]
    parent_run_id: str
    kind: str
    num_classes: int
    fingerprints: dict[str, Any]

    @classmethod
    def load(cls, study: optuna.Study) -> StudyRecord:
        attrs = study.user_attrs
        if attrs.get(ATTR_SCHEMA) != SCHEMA_VERSION or ATTR_PARENT_RUN not in attrs:
            raise StudyFormatError(
                f"study '{study.study_name}' was not prepared by this version of synops (record "
                f"version {attrs.get(ATTR_SCHEMA)}, expected {SCHEMA_VERSION}): start a new study "
                "under another `name`, or with other --storage/--tracking-uri stores")
        inputs = attrs[ATTR_INPUTS]
        return cls(study.study_name, config_from_dict(stored_config(attrs[ATTR_CONFIG])),
                   SearchBounds.from_record(attrs[ATTR_BOUNDS]), study_bases(study),
                   attrs[ATTR_PARENT_RUN], inputs["kind"], inputs["num_classes"],
                   inputs["fingerprints"])


@dataclass(frozen=True)
class TrialRecord:
    """One finished (COMPLETE) trial: what it tried and how it scored."""

    number: int
    kind: str  # "trial" or "reference"
    params: dict[str, Any]
    variant: Variant
    input_shape: tuple[int, int, int]
    num_classes: int
    target_synops: float
    val: Evaluation
    test: Evaluation
    seconds: float
    run_id: str

    @property
    def spikes_per_pixel(self) -> int | None:
        """Its input encoding (None: spike-count data, used as they are)."""
        return self.variant.spikes_per_pixel

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        return cls(trial.number, "reference" if attrs.get(ATTR_REFERENCE) else "trial",
                   dict(trial.params), Variant.from_record(attrs[ATTR_VARIANT]),
                   tuple(attrs[ATTR_INPUT_SHAPE]), attrs[ATTR_NUM_CLASSES], attrs[ATTR_TARGET],
                   Evaluation.from_record(attrs[ATTR_VAL]), Evaluation.from_record(attrs[ATTR_TEST]),
                   attrs.get(ATTR_SECONDS, math.nan), attrs[ATTR_RUN_ID])


def finished_trials(study: optuna.Study) -> list[TrialRecord]:
    """Every trained COMPLETE trial (infeasible ones, whose network did not fit the study's chip,
    were not trained)."""
    return [TrialRecord.from_trial(t)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if ATTR_INFEASIBLE not in t.user_attrs]


def infeasible_trials(study: optuna.Study) -> dict[int, tuple[Variant, str]]:
    """Trials whose network does not fit the study's chip: their variant and why, by number."""
    return {t.number: (Variant.from_record(t.user_attrs[ATTR_VARIANT]), t.user_attrs[ATTR_INFEASIBLE])
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if ATTR_INFEASIBLE in t.user_attrs}


def param_columns(frame: pd.DataFrame) -> list[str]:
    """The trials table's parameter columns present in `frame`: the penalty's and the searched
    arguments of the network factory and the data source."""
    return ([c for c in PARAM_COLUMNS if c in frame]
            + [c for c in frame.columns if c.startswith((MODEL_PREFIX, DATA_PREFIX))])


def variant_order(frame: pd.DataFrame, bases: dict[str, BaseRecord]) -> dict[str, str]:
    """Every variant with a base model or a trial, by key, in a stable order (largest encoding
    first, then by key), with its label: the order of the report's colours and rows."""
    found = {key: (base.variant.spikes_per_pixel, base.variant.label) for key, base in bases.items()}
    if not frame.empty:
        for _, row in frame.drop_duplicates("variant_key").iterrows():
            encoding = row.get("spikes_per_pixel")
            found.setdefault(row["variant_key"], (None if pd.isna(encoding) else int(encoding),
                                                  row["variant"]))
    ordered = sorted(found.items(), key=lambda item: (-(item[1][0] or 0), item[0]))
    return {key: label for key, (_, label) in ordered}


def snn_attr(trial: int) -> str:
    return f"{SNN_ATTR_PREFIX}{trial}"


def spiking_checks(study: optuna.Study) -> dict[int, SpikingEvaluation | SpikingFailure]:
    """The latest spiking check of each member that has one (its result, or why it could not be
    simulated), by trial number."""
    return {int(key.removeprefix(SNN_ATTR_PREFIX)): spiking_result_from_record(value)
            for key, value in study.user_attrs.items() if key.startswith(SNN_ATTR_PREFIX)}


def _deployment_records(study: optuna.Study) -> dict[int, dict[str, Any]]:
    return {int(key.removeprefix(DEPLOY_ATTR_PREFIX)): value
            for key, value in study.user_attrs.items() if key.startswith(DEPLOY_ATTR_PREFIX)}


def deployments(study: optuna.Study) -> dict[int, Deployment]:
    """The latest chip check of each member that has one, by trial number. Checks recorded by an
    older version of synops (`older_deployments`) are left out: they are done again."""
    return {number: Deployment.from_record(record)
            for number, record in _deployment_records(study).items() if Deployment.readable(record)}


def older_deployments(study: optuna.Study) -> list[int]:
    """The members whose chip check was recorded by an older version (other fields), to be done
    again by `synops deploy --front` or the next `synops sweep`."""
    return sorted(number for number, record in _deployment_records(study).items()
                  if not Deployment.readable(record))


def layer_column(layer: str) -> str:
    """The trials-table column of one layer's mean test SynOps."""
    return f"test_synops_{layer}"


def energy_column(chip: str) -> str:
    return f"test_energy_uj_{chip}"


def _row(record: TrialRecord) -> dict[str, Any]:
    test = record.test
    val_low, val_high = wilson_interval(record.val.accuracy, record.val.samples)
    test_low, test_high = wilson_interval(test.accuracy, test.samples)
    return {
        "trial": record.number,
        "kind": record.kind,
        **{k: record.params.get(k) for k in PARAM_COLUMNS},
        **{k: v for k, v in record.params.items() if k.startswith((MODEL_PREFIX, DATA_PREFIX))},
        "spikes_per_pixel": record.spikes_per_pixel,
        "variant": record.variant.label,
        "variant_key": record.variant.key,
        "target_synops": record.target_synops,
        "val_accuracy": record.val.accuracy,
        "val_accuracy_low": val_low,
        "val_accuracy_high": val_high,
        "val_samples": record.val.samples,
        "val_synops_mean": record.val.synops_mean,
        "test_accuracy": test.accuracy,
        "test_accuracy_low": test_low,
        "test_accuracy_high": test_high,
        "test_samples": test.samples,
        "test_synops_mean": test.synops_mean,
        "test_synops_p50": test.synops_p50,
        "test_synops_p95": test.synops_p95,
        "test_synops_max": test.synops_max,
        **{layer_column(name): v for name, v in test.synops_per_layer.items()},
        **{energy_column(chip): e for chip, e in energy_per_sample(test.synops_mean).items()},
        "seconds": record.seconds,
        "mlflow_run_id": record.run_id,
    }


DEPLOY_COLUMNS = ("chip", "chip_fit", "chip_cores_used", "quantized_test_accuracy",
                  "quantized_test_synops_mean", "quantized_snn_test_accuracy", "effective_macs",
                  "effective_acs", "activation_sparsity", "chip_footprint_bytes", "membrane_overflows")


def _deploy_row(deployment: Deployment | None) -> dict[str, Any]:
    if deployment is None:
        return dict.fromkeys(DEPLOY_COLUMNS)
    return {"chip": deployment.chip, "chip_fit": deployment.summary,
            "chip_cores_used": deployment.cores_used,
            "quantized_test_accuracy": deployment.quantized.accuracy,
            "quantized_test_synops_mean": deployment.quantized.synops_mean,
            "quantized_snn_test_accuracy": deployment.spiking.accuracy if deployment.spiking else None,
            "effective_macs": deployment.effective_macs, "effective_acs": deployment.effective_acs,
            "activation_sparsity": deployment.activation_sparsity,
            "chip_footprint_bytes": deployment.chip_footprint_bytes,
            "membrane_overflows": deployment.membrane_overflows}


SNN_COLUMNS = ("snn_test_accuracy", "snn_ann_accuracy", "snn_agreement", "snn_synops_ratio",
               "snn_samples", "snn_settings", "snn_failure")


def _snn_row(check: SpikingEvaluation | SpikingFailure | None) -> dict[str, Any]:
    if check is None:
        return dict.fromkeys(SNN_COLUMNS)
    if isinstance(check, SpikingFailure):
        return dict.fromkeys(SNN_COLUMNS) | {"snn_failure": check.reason}
    settings = check.settings
    return dict.fromkeys(SNN_COLUMNS) | {
        "snn_test_accuracy": check.accuracy, "snn_ann_accuracy": check.ann_accuracy,
        "snn_agreement": check.agreement, "snn_synops_ratio": check.synops_ratio,
        "snn_samples": check.samples,
        "snn_settings": f"{settings['encoding']}, {settings['steps']} steps, {settings['spike_fn']}-spike"}


def non_dominated(accuracy: pd.Series, synops: pd.Series) -> pd.Series:
    """Which rows no other row beats on both accuracy (up) and SynOps (down). Hand-written for the
    fronts within one variant: Optuna computes the study's front only."""
    return pd.Series([not bool(((accuracy >= a) & (synops <= s) & ((accuracy > a) | (synops < s))).any())
                      for a, s in zip(accuracy, synops, strict=True)], index=accuracy.index)


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial, whether it is on the Pareto front (Optuna's `best_trials`,
    computed on the validation objectives) and on the front of its own variant. Parameters a
    study never searched are left out."""
    front = {t.number for t in study.best_trials}
    checks, deployed = spiking_checks(study), deployments(study)
    frame = pd.DataFrame([_row(r) | {"on_front": r.number in front} | _snn_row(checks.get(r.number))
                          | _deploy_row(deployed.get(r.number)) for r in finished_trials(study)])
    if frame.empty:
        return frame
    frame["on_variant_front"] = pd.concat(
        [non_dominated(rows["val_accuracy"], rows["val_synops_mean"])
         for _, rows in frame.groupby("variant_key")]).sort_index()
    unused = [c for c in (*PARAM_COLUMNS, *SNN_COLUMNS, *DEPLOY_COLUMNS) if frame[c].isna().all()]
    return frame.drop(columns=unused)


def front_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The front members of a `trials_frame`, fewest validation SynOps first, rows 0..n-1."""
    if frame.empty:
        return frame
    front = frame[frame["on_front"]]
    return front.sort_values(["val_synops_mean", "trial"]).reset_index(drop=True)


@dataclass(frozen=True)
class Knee:
    """The front member offered as the best compromise, and the rule that chose it."""

    row: int
    rule: str  # KNEE_BULGE, KNEE_IDEAL or KNEE_SINGLE

    def explanation(self) -> str:
        return {
            KNEE_BULGE: "on the validation front, with error and log SynOps each scaled to [0, 1], "
                        "the member that bulges farthest from the straight line joining the "
                        "front's two ends towards the ideal corner (no error, fewest SynOps): "
                        "on either side of it, the front trades accuracy and SynOps at a worse rate",
            KNEE_IDEAL: "no member of the validation front lies on the ideal side of the straight "
                        "line joining its two ends, so the knee is the member closest to the "
                        "ideal corner (no error, fewest SynOps), with error and log SynOps each "
                        "scaled to [0, 1]",
            KNEE_SINGLE: "the front has a single member",
        }[self.rule]


def choose_knee(front: pd.DataFrame) -> Knee:
    """The knee of a `front_table`, chosen on validation numbers. (Hand-written: neither Optuna
    nor pandas offers one.)"""
    if len(front) == 1:
        return Knee(0, KNEE_SINGLE)
    log_synops = front["val_synops_mean"].map(math.log)
    error = 1 - front["val_accuracy"]
    x = (log_synops - log_synops.min()) / ((log_synops.max() - log_synops.min()) or 1)
    y = (error - error.min()) / ((error.max() - error.min()) or 1)
    first, last = 0, len(front) - 1  # fewest and most SynOps
    dx, dy = x[last] - x[first], y[last] - y[first]
    length = math.hypot(dx, dy)
    if len(front) >= 3 and length > 0:
        def side(px: Any, py: Any) -> Any:
            return dx * (py - y[first]) - dy * (px - x[first])

        toward_ideal = math.copysign(1.0, side(0.0, 0.0))
        distance = side(x, y) * toward_ideal / length
        if distance.max() > 1e-9:
            return Knee(int(distance.idxmax()), KNEE_BULGE)
    ranked = pd.DataFrame({"distance": (x**2 + y**2) ** 0.5, "error": error,
                           "synops": front["val_synops_mean"]})
    return Knee(int(ranked.sort_values(["distance", "error", "synops"]).index[0]), KNEE_IDEAL)


@dataclass(frozen=True)
class SeedNoise:
    """The training noise of the front's validation accuracy: the seed-to-seed sd pooled over
    every member's repeats (`sd`, NaN without any) and its degrees of freedom (`df`, the sum of
    each member's seeds - 1)."""

    sd: float
    df: int

    @property
    def t(self) -> float:
        """The two-sided 95% quantile of Student's t at `df`."""
        return _t95(self.df)

    def margin(self, seeds_a: int, seeds_b: int) -> float:
        """The gap two seed means (over `seeds_a` and `seeds_b` runs) must exceed to be told apart
        at 95% (two-sided Student's t with `df`); 0 without repeats (only exact ties tie)."""
        if self.df == 0:
            return 0.0
        return self.t * self.sd * (1 / seeds_a + 1 / seeds_b) ** 0.5


def seed_noise(frame: pd.DataFrame) -> SeedNoise:
    """The pooled training noise of `frame`'s rows (`val_accuracy_sd` over `seeds` runs; rows
    without repeats add nothing): s^2 = sum((n_i - 1) s_i^2) / sum(n_i - 1). Pooled because the
    noise is the network's and its recipe's, shared by the front's members: one member's 2 or 3
    seeds estimate it too loosely to judge by (Student's t at 1 degree of freedom is 12.71)."""
    sd = frame.get("val_accuracy_sd", pd.Series(math.nan, index=frame.index))
    seeds = frame.get("seeds", pd.Series(1, index=frame.index))
    repeated = (seeds > 1) & sd.notna()
    df = int((seeds[repeated] - 1).sum())
    if df == 0:
        return SeedNoise(math.nan, 0)
    return SeedNoise(float((((seeds - 1) * sd**2)[repeated].sum() / df) ** 0.5), df)


def most_accurate_within(frame: pd.DataFrame, budget: float) -> Any:
    """The index of the most accurate row whose validation SynOps fit in `budget` (None if none
    fits): the row a budget's ties are judged against."""
    fitting = frame[frame["val_synops_mean"] <= budget]
    return None if fitting.empty else fitting["val_accuracy"].idxmax()


def best_within_budgets(frame: pd.DataFrame, budgets: list[float]) -> list[tuple[float, pd.Series | None]]:
    """For each SynOps budget, among the rows whose validation SynOps fit in it, the one with the
    fewest SynOps of those that cannot be told apart from the most accurate one, or None.

    Rows scored on the same validation images differ by training noise, not by which images were
    drawn, so "told apart" compares seed means against the front's pooled training noise
    (`seed_noise`): a row ties with the best when the gap is within
    t * s * sqrt(1 / seeds_best + 1 / seeds); a single run carries the same noise (seeds = 1).
    Without seed repeats only exact ties count."""
    noise = seed_noise(frame)
    seeds = frame.get("seeds", pd.Series(1, index=frame.index)).fillna(1)
    chosen = []
    for budget in budgets:
        best = most_accurate_within(frame, budget)
        if best is None:
            chosen.append((budget, None))
            continue
        fitting = frame[frame["val_synops_mean"] <= budget]
        margin = pd.Series([noise.margin(int(seeds[best]), int(seeds[i])) for i in fitting.index],
                           index=fitting.index)
        tied = fitting[fitting.loc[best, "val_accuracy"] - fitting["val_accuracy"] <= margin]
        chosen.append((budget, tied.sort_values(["val_synops_mean", "val_accuracy"],
                                                ascending=[True, False]).iloc[0]))
    return chosen


# The hypervolume's reference sits this many times (a decade in log SynOps) above the largest SynOps
# the study's stored config names.
REFERENCE_SYNOPS_FACTOR = 10.0


def hypervolume_reference(record: StudyRecord) -> tuple[float, float]:
    """The reference point (validation accuracy, SynOps) the hypervolume is measured from: chance
    accuracy (1 / classes, so a harder dataset still has a volume), and `REFERENCE_SYNOPS_FACTOR`
    times the largest SynOps the stored config names: its fine-tuning target
    (`train.target_synops`), the tutorial recipe's target when the study runs that trial, and the
    searched targets' upper bound when one is set (0 means "the base model's SynOps" and is not
    read). Read from the record alone, so it is fixed when the study is created, needs no trained
    model, and hypervolumes of any moment compare. No true upper bound on SynOps follows from the
    record (a spiking ReLU's count has no ceiling): a trial beyond the reference adds no volume."""
    named = [record.config.train.target_synops, record.bounds.target_synops[1]]
    if record.config.study.reference_trial:
        named.append(TUTORIAL_RECIPE.target_synops)
    return 1.0 / record.num_classes, REFERENCE_SYNOPS_FACTOR * max(named)


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area that (validation accuracy, SynOps) `points` dominate up to `reference` (a point in the
    same units), measured where the front is read: error (1 - accuracy) against log10 SynOps, both
    minimised. Halving a member's SynOps adds log10(2) times its share of the error axis, at 1e5
    SynOps as at 1e7; on linear SynOps the cheap end of the front, where the search makes its
    progress, added next to nothing. Points below the reference accuracy or beyond its SynOps add
    nothing. Raises ValueError for a point with 0 SynOps (no logarithm).

    Hand-written 2-D staircase: Optuna 5.1 has no public hypervolume function (`optuna._hypervolume`
    is private; `optuna.visualization.plot_hypervolume_history` measures the study's raw objectives,
    linear SynOps)."""
    ref_error, ref_log = 1.0 - reference[0], math.log10(reference[1])
    area, bound = 0.0, ref_error
    for log_synops, error in sorted((math.log10(s), 1.0 - a) for a, s in points
                                    if a > reference[0] and s < reference[1]):
        if error < bound:  # cheapest first: each point adds the strip of error it gains
            area += (ref_log - log_synops) * (bound - error)
            bound = error
    return area


def hypervolume_history(frame: pd.DataFrame, reference: tuple[float, float]) -> pd.Series:
    """`hypervolume` of the finished trials' validation front after each trial, by trial number."""
    ordered = frame.sort_values("trial")
    points = list(zip(ordered["val_accuracy"], ordered["val_synops_mean"], strict=True))
    return pd.Series([hypervolume(points[: i + 1], reference) for i in range(len(points))],
                     index=ordered["trial"].to_list(), name="hypervolume")


@dataclass(frozen=True)
class StudyCounts:
    finished: int  # what counts towards n_trials: COMPLETE (infeasible included) and pruned by us
    failed: int
    running: int
    infeasible: int
    pruned: int


def is_finished(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards the study's `n_trials`: COMPLETE (infeasible ones
    included) or pruned as clearly dominated (surplus trials, pruned at once, do not count)."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.PRUNED
                                                 and ATTR_PRUNED in trial.user_attrs)


def study_counts(study: optuna.Study) -> StudyCounts:
    """Trials by state; surplus trials (pruned at once) are not counted."""
    trials = study.get_trials(deepcopy=False)
    return StudyCounts(
        finished=sum(is_finished(t) for t in trials),
        failed=sum(t.state == TrialState.FAIL for t in trials),
        running=sum(t.state == TrialState.RUNNING for t in trials),
        infeasible=sum(ATTR_INFEASIBLE in t.user_attrs for t in trials),
        pruned=sum(ATTR_PRUNED in t.user_attrs for t in trials),
    )


Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _t95(df: float | pd.Series) -> float | pd.Series:
    """Two-sided 95% quantile of Student's t with `df` degrees of freedom (Z95 at infinite df)."""
    quantile = stats.t.ppf(0.975, df)
    return pd.Series(quantile, index=df.index) if isinstance(df, pd.Series) else float(quantile)


def wilson_interval(accuracy: float, samples: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on `samples` images. Hand-written: the
    formula is three lines and none of our dependencies has it (statsmodels does)."""
    if samples <= 0:
        return math.nan, math.nan
    centre = (accuracy + z * z / (2 * samples)) / (1 + z * z / samples)
    half = z / (1 + z * z / samples) * math.sqrt(
        accuracy * (1 - accuracy) / samples + z * z / (4 * samples * samples))
    return max(0.0, centre - half), min(1.0, centre + half)


def interval_half_width(accuracy: float, samples: int, z: float = Z95) -> float:
    """Half the width of a 95% interval of one accuracy measured on `samples` images (normal
    approximation, z sqrt(p(1-p)/n); the Wilson interval is close to it away from 0 and 1)."""
    return z * math.sqrt(accuracy * (1 - accuracy) / samples)


def detectable_difference(accuracy: float, samples: int, z: float = Z95) -> float:
    """The smallest difference between two accuracies near `accuracy`, each measured on `samples`
    images, that a two-sided test at 95% tells apart (independent measurements): the difference's
    standard error is sqrt(2) times one accuracy's, so this is sqrt(2) x `interval_half_width`."""
    return math.sqrt(2) * interval_half_width(accuracy, samples, z)


# Study user attributes of the confirmation stage: a claim when a (member, seed) run starts, the
# result when it finishes. A claim without a result is a confirmation that died or was stopped.
CONFIRM_CLAIM_PREFIX = "confirm_claim."
CONFIRM_RESULT_PREFIX = "confirm."


def confirm_key(prefix: str, trial: int, seed: int) -> str:
    return f"{prefix}{trial}.{seed}"


@dataclass(frozen=True)
class Confirmation:
    """One more fine-tuning of a front member with another seed."""

    trial: int
    seed: int
    run_id: str
    val: Evaluation
    test: Evaluation

    def to_record(self) -> dict[str, Any]:
        return {"trial": self.trial, "seed": self.seed, "run_id": self.run_id,
                "val": self.val.to_record(), "test": self.test.to_record()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Confirmation:
        return cls(record["trial"], record["seed"], record["run_id"],
                   Evaluation.from_record(record["val"]), Evaluation.from_record(record["test"]))


def confirmations(study: optuna.Study) -> dict[int, list[Confirmation]]:
    """Finished confirmations by the trial they confirm."""
    found: dict[int, list[Confirmation]] = {}
    for key, value in study.user_attrs.items():
        if key.startswith(CONFIRM_RESULT_PREFIX):
            confirmation = Confirmation.from_record(value)
            found.setdefault(confirmation.trial, []).append(confirmation)
    return found


SEED_COLUMNS = ("seeds", "mean_over", "val_accuracy_mean", "val_accuracy_sd", "val_synops_mean_mean",
                "test_accuracy_mean", "test_accuracy_sd", "test_synops_mean_mean",
                "test_synops_mean_sd", "val_mean_low", "val_mean_high", "dominated_on_means")
# `mean_over`: which runs a member's seed means are over.
MEAN_OVER_CONFIRMATIONS = "confirmations"
MEAN_OVER_SELECTION = "selection run"


def with_seed_means(front: pd.DataFrame, found: dict[int, list[Confirmation]]) -> pd.DataFrame:
    """`front` (a `front_table`) with each member's numbers over its seeds, the 95% interval of its
    mean validation accuracy, and whether another member beats it on both means.

    The means are over the member's confirmation runs only (`mean_over` "confirmations", `seeds`
    of them) whenever it has any: the trial's own run was kept because it scored well (among many
    trials, the lucky runs reach the front), so averaging it in would bias the mean up, while the
    confirmations were trained after the choice and are unbiased. That costs one run of
    precision, which the interval shows. A member without confirmations keeps its selection run's
    numbers (`mean_over` "selection run", 1 seed).

    The interval counts images and seeds: for one run, its Wilson interval; for k >= 2 runs,
    mean +- t sqrt(p(1-p)/n + sd^2/k), t Student's with Satterthwaite's degrees of freedom
    (p(1-p)/n + sd^2/k)^2 / ((sd^2/k)^2 / (k - 1)): only the seeds' term is estimated from the k
    runs, so they lie between k - 1 (seed noise dominates) and infinity (the images' does).
    Clipped to [0, 1]."""
    rows = []
    for _, member in front.iterrows():
        runs = found.get(int(member["trial"]), [])
        if runs:
            val = [c.val.accuracy for c in runs]
            val_synops = [c.val.synops_mean for c in runs]
            test = [c.test.accuracy for c in runs]
            test_synops = [c.test.synops_mean for c in runs]
        else:
            val, val_synops = [member["val_accuracy"]], [member["val_synops_mean"]]
            test, test_synops = [member["test_accuracy"]], [member["test_synops_mean"]]
        low, high = _mean_interval(val, int(member["val_samples"]))
        rows.append({"seeds": len(val),
                     "mean_over": MEAN_OVER_CONFIRMATIONS if runs else MEAN_OVER_SELECTION,
                     "val_accuracy_mean": float(np.mean(val)), "val_accuracy_sd": _sd(val),
                     "val_synops_mean_mean": float(np.mean(val_synops)),
                     "test_accuracy_mean": float(np.mean(test)), "test_accuracy_sd": _sd(test),
                     "test_synops_mean_mean": float(np.mean(test_synops)),
                     "test_synops_mean_sd": _sd(test_synops), "val_mean_low": low,
                     "val_mean_high": high})
    table = pd.concat([front.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    table["dominated_on_means"] = ~non_dominated(table["val_accuracy_mean"],
                                                 table["val_synops_mean_mean"])
    return table


def _mean_interval(accuracies: list[float], samples: int) -> tuple[float, float]:
    """The 95% interval of the mean of `accuracies` (seeds scored on the same `samples` images),
    as `with_seed_means` states it."""
    mean = float(np.mean(accuracies))
    if len(accuracies) == 1:
        return wilson_interval(mean, samples)
    images = mean * (1 - mean) / samples
    seeds = float(np.var(accuracies, ddof=1)) / len(accuracies)
    df = (images + seeds) ** 2 * (len(accuracies) - 1) / seeds**2 if seeds > 0 else math.inf
    half = _t95(df) * math.sqrt(images + seeds)
    return max(0.0, mean - half), min(1.0, mean + half)


def _sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def on_means(members: pd.DataFrame) -> pd.DataFrame:
    """The members not dominated on their seed means, with the means in the columns the choices
    read (`val_accuracy`, `val_synops_mean`), fewest SynOps first: what knee and budgets use."""
    kept = members[~members["dominated_on_means"]].copy()
    kept["val_accuracy"] = kept["val_accuracy_mean"]
    kept["val_synops_mean"] = kept["val_synops_mean_mean"]
    return kept.sort_values(["val_synops_mean", "trial"]).reset_index(drop=True)


def indistinguishable_neighbours(members: pd.DataFrame) -> list[tuple[int, int]]:
    """Pairs of members, neighbours in SynOps, whose validation intervals overlap."""
    ordered = members.sort_values("val_synops_mean_mean")
    pairs = []
    for (_, a), (_, b) in zip(ordered.iloc[:-1].iterrows(), ordered.iloc[1:].iterrows(), strict=True):
        if a["val_mean_low"] <= b["val_mean_high"] and b["val_mean_low"] <= a["val_mean_high"]:
            pairs.append((int(a["trial"]), int(b["trial"])))
    return pairs


@dataclass(frozen=True)
class Choice:
    """What a user picks from: the front members with their seed means, the members left on the
    front of the means (the candidates), and the knee among the candidates."""

    members: pd.DataFrame
    candidates: pd.DataFrame
    knee: Knee

    @property
    def knee_member(self) -> pd.Series:
        return self.candidates.loc[self.knee.row]


def choose(study: optuna.Study, frame: pd.DataFrame | None = None) -> Choice:
    """The choice made from a study (its `trials_frame` if already built): on the validation seed
    means, where the confirmation stage has run, else on the single runs."""
    frame = trials_frame(study) if frame is None else frame
    if frame.empty:
        raise NoSuchTrialError(f"study '{study.study_name}' has no finished trial yet")
    return choice_of(front_table(frame), confirmations(study))


def choice_of(front: pd.DataFrame, found: dict[int, list[Confirmation]]) -> Choice:
    """The choice made from a `front_table` and its members' confirmations (by trial)."""
    members = with_seed_means(front, found)
    candidates = on_means(members)
    return Choice(members, candidates, choose_knee(candidates))


def chosen_trials(choice: Choice, budgets: list[float]) -> set[int]:
    """The trials a user's choice falls on: the knee, and for each budget the member the budget
    table quotes and the most accurate member that fits in it (the one ties are judged against).
    The confirmation stage confirms these until they are all confirmed (`study.confirm_members`
    "choices")."""
    candidates = choice.candidates
    rows = [choice.knee.row] + [most_accurate_within(candidates, budget) for budget in budgets]
    trials = {int(candidates.loc[row, "trial"]) for row in rows if row is not None}
    return trials | {int(best["trial"]) for _, best in best_within_budgets(candidates, budgets)
                     if best is not None}


NOTE_TAG = "mlflow.note.content"  # MLflow shows this tag as the run's description
FRONT_TRIALS_TAG = "synops.front_trials"


def parent_run_tags(study: optuna.Study, frame: pd.DataFrame, with_report: bool) -> dict[str, str]:
    """The study's parent run's description (the front, the knee, the files logged under it) and
    the front's trial numbers as a tag, so `search_runs` can filter the front out of the trials."""
    front = front_table(frame)
    knee = choose(study, frame).knee_member
    counts = study_counts(study)
    rows = "\n".join(
        f"| {int(r['trial'])}{' (knee)' if r['trial'] == knee['trial'] else ''} | "
        f"{r['variant']} | {r['val_accuracy']:.2%} | {r['val_synops_mean']:.3g} | "
        f"{r['test_accuracy']:.2%} | {r['test_synops_mean']:.3g} | `{r['mlflow_run_id']}` |"
        for _, r in front.iterrows())
    files = ["`front.csv`", "`pareto.png`"] + (
        ["`report/index.html` (the whole report: download the `report` folder and open it)",
         "`report/report.md`"] if with_report else ["the report, once `synops report` has run"])
    note = (f"## Study `{study.study_name}`: accuracy vs SynOps\n\n"
            f"{counts.finished} finished, {counts.failed} failed, {counts.running} running trials. "
            "Front chosen on validation, fewest SynOps first (single runs; the knee is chosen on "
            "the seed means once the front is confirmed):\n\n"
            "| trial | variant | val accuracy | val SynOps | test accuracy | test SynOps | run |\n"
            "|---:|---:|---:|---:|---:|---:|---|\n"
            f"{rows}\n\n"
            f"**Knee: trial {int(knee['trial'])}** ({knee['variant']}), {knee['test_accuracy']:.2%} at "
            f"{knee['test_synops_mean']:.3g} SynOps per test sample. Filter the front's runs with "
            f"`tags.{FRONT_TRIALS_TAG}` on this run, or `tags.trial_number` on the child runs.\n\n"
            f"Files logged under this run: {', '.join(files)}.\n")
    return {NOTE_TAG: note,
            FRONT_TRIALS_TAG: ",".join(str(n) for n in sorted(int(t) for t in front["trial"]))}
