"""Experiment configuration: TOML files under `experiments/` read into validated dataclasses.

Every table maps to a dataclass; unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the offending key, so a broken config is refused before anything runs. A
user's own network and data enter through two config lines, `[model] factory` and `[data] source`
(a built-in name or a `module:function` path), with their keyword arguments in `[model.args]` and
`[data.args]`; what those names resolve to is checked when the data and network are built
(`pipeline.inputs`), still before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from pipeline.chip_profiles import CHIP_NAMES
from pipeline.errors import ConfigError

PENALTIES = ("none", "mse", "hinge")
SCHEDULES = ("constant", "cosine", "onecycle")
# How a training step's forward pass computes: in float32, or its convolutions and matmuls under
# autocast to bfloat16; "auto" = bfloat16 where the device computes it natively, else float32.
# Validation and test, and so every accuracy and SynOps count a user chooses from, are float32.
PRECISIONS = ("auto", "float32", "bfloat16")
# Built-in data sources (`pipeline.sources` loads each) and network factories (`pipeline.model`).
BUILTIN_SOURCES = ("mnist", "fashion-mnist", "arrays", "image-folder", "events")
BUILTIN_FACTORIES = ("conv",)
# What a sample's values are: intensities (the input encoding turns them into spike counts) or
# spike counts already (used as they are). "" = the source's own kind.
DATA_KINDS = ("intensity", "counts")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
# Which front members the confirmation stage repeats: those a choice (the knee, a budget's pick or
# the most accurate member within a budget) falls on, until every choice is confirmed, or all.
CONFIRM_MEMBERS = ("choices", "front")
ENCODINGS = ("regular", "poisson", "rate")
SPIKE_FUNCTIONS = ("multi", "single")
MAX_PIXEL_COUNT = 255  # the largest uint8 pixel value: the tutorial reads it as 255 input spikes
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
# A study name becomes a folder name (reports/<name>) and an MLflow experiment: no paths in it.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A user's function: `package.module:function` (or `module.function`), as pkgutil.resolve_name reads it.
COMPONENT_PATTERN = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?")
ARG_PATTERN = re.compile(r"[A-Za-z_]\w*")
# Keys of the built-in conv net that older configs wrote directly under [model]; they are read as
# its [model.args]. The network's input shape and classes now come from the data: older configs'
# `in_channels`, `input_size`, `num_classes` are checked against the built-in datasets' shapes.
LEGACY_MODEL_ARGS = ("channels", "kernel_sizes", "pooling", "hidden_features", "bias")
LEGACY_SHAPE_KEYS = {"in_channels": 1, "input_size": 28, "num_classes": 10}  # MNIST, Fashion-MNIST


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _require_finite(values: list[float] | tuple[float, ...], key: str) -> None:
    _require(all(math.isfinite(v) for v in values), key, f"must be finite numbers, got {list(values)}")


def _require_component(value: str, builtins: tuple[str, ...], key: str) -> None:
    _require(value in builtins or (":" in value and COMPONENT_PATTERN.fullmatch(value) is not None),
             key, f"must be one of {builtins} or a `module:function` path, got {value!r}")


def _require_arg_names(args: Mapping[str, Any], key: str) -> None:
    bad = [name for name in args if ARG_PATTERN.fullmatch(name) is None]
    _require(not bad, key, f"argument names must be Python identifiers, got {bad}")


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they are split and encoded.

    `source` is a built-in (`BUILTIN_SOURCES`) or a `module:function` returning
    `{"train": (x, y), "test": (x, y)}` (optionally `"val"`), called with `args`. `kind` says
    whether samples are intensities (the input encoding turns a value 0..255, or 0..1, into
    0..`spikes_per_pixel` spikes) or spike counts (used as they are); "" = the source's own.
    The validation split is drawn from the training samples (`val_size`: a count, or a
    fraction below 1, seeded by `split_seed`) unless the source gives one."""

    source: str = "mnist"
    args: dict[str, Any] = field(default_factory=dict)
    kind: Literal["", "intensity", "counts"] = ""
    root: str = "data"
    val_size: int | float = 5000
    split_seed: int = 0
    max_train_samples: int = 0
    max_test_samples: int = 0
    verify_checksums: bool = True
    spikes_per_pixel: int = MAX_PIXEL_COUNT

    def __post_init__(self) -> None:
        _require_component(self.source, BUILTIN_SOURCES, "data.source")
        _require_arg_names(self.args, "data.args")
        _require(self.kind in ("", *DATA_KINDS), "data.kind", f"must be one of {DATA_KINDS} (or empty)")
        _require(1 <= self.spikes_per_pixel <= MAX_PIXEL_COUNT, "data.spikes_per_pixel",
                 f"must be 1..{MAX_PIXEL_COUNT} (the most input spikes a pixel becomes; "
                 f"{MAX_PIXEL_COUNT} = the pixel value itself), got {self.spikes_per_pixel}")
        _require(self.val_size > 0 and (isinstance(self.val_size, int) or self.val_size < 1),
                 "data.val_size", f"must be a count > 0 or a fraction in (0, 1), got {self.val_size}")
        _require(self.max_train_samples >= 0, "data.max_train_samples", "must be >= 0 (0 = all)")
        _require(self.max_test_samples >= 0, "data.max_test_samples", "must be >= 0 (0 = all)")
        if self.max_train_samples and isinstance(self.val_size, int):
            _require(
                self.val_size < self.max_train_samples,
                "data.val_size",
                "must be smaller than data.max_train_samples",
            )


@dataclass(frozen=True)
class ModelConfig:
    """The network: `factory` is a built-in (`BUILTIN_FACTORIES`; `conv`, the tutorial's conv
    net, by default) or a `module:function` called as `factory(input_shape=(C, H, W),
    num_classes=N, **args)` that returns an `nn.Module`. Its weights are drawn with `init_seed`."""

    factory: str = "conv"
    args: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 1

    def __post_init__(self) -> None:
        _require_component(self.factory, BUILTIN_FACTORIES, "model.factory")
        _require_arg_names(self.args, "model.args")
        reserved = {"input_shape", "num_classes"} & set(self.args)
        _require(not reserved, "model.args", f"{sorted(reserved)} come from the data, not the config")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage: optimiser, schedule and the SynOps penalty added to the loss."""

    epochs: int = 2
    batch_size: int = 512
    lr: float = 1e-3
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    penalty: Literal["none", "mse", "hinge"] = "none"
    penalty_weight: float = 0.0
    target_synops: float = 4e7
    seed: int = 1
    max_batches: int = 0
    init_from: str = ""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        for key in ("lr", "penalty_weight", "target_synops"):
            _require_finite([getattr(self, key)], f"train.{key}")
        _require(self.epochs >= 0, "train.epochs", "must be >= 0")
        _require(self.batch_size > 0, "train.batch_size", "must be > 0")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}")
        _require(self.penalty in PENALTIES, "train.penalty", f"must be one of {PENALTIES}")
        _require(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        _require(self.penalty_weight >= 0, "train.penalty_weight", "must be >= 0")
        _require(self.target_synops > 0, "train.target_synops", "must be > 0")
        _require(self.max_batches >= 0, "train.max_batches", "must be >= 0 (0 = whole epoch)")


# The SynOps tutorial's recipe (seed-synops-tutorial.txt; experiments/seed.toml runs it): from
# scratch, 2 epochs, constant Adam 1e-3, batch 512, the symmetric `mse` penalty 1e-5 towards 4e7, in
# float32 as the tutorial ran.
TUTORIAL_RECIPE = TrainConfig(epochs=2, batch_size=512, lr=1e-3, schedule="constant", penalty="mse",
                              penalty_weight=1e-5, target_synops=4e7, seed=1, precision="float32")


@dataclass(frozen=True)
class SearchSpace:
    """What the study varies. `penalty_strength` bounds the weight on the squared relative
    excess ((S - T) / T)^2; target bounds of 0 mean 'measured': just above the input-layer floor,
    and the unpenalised base model's SynOps (per variant). `spikes_per_pixel` lists the input
    encodings to choose from (empty: `data.spikes_per_pixel` only); `model` and `data` list values
    of the factory's and the source's arguments to choose from. Each combination is a variant with
    its own base model."""

    penalty_strength: list[float] = field(default_factory=lambda: [0.3, 100.0])
    target_synops: list[float] = field(default_factory=lambda: [0.0, 0.0])
    penalties: list[str] = field(default_factory=lambda: ["hinge"])
    epochs: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    spikes_per_pixel: list[int] = field(default_factory=list)
    model: dict[str, list[Any]] = field(default_factory=dict)
    data: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in ("model", "data"):
            for name, values in getattr(self, table).items():
                key = f"study.space.{table}.{name}"
                _require(ARG_PATTERN.fullmatch(name) is not None, key, "must be a Python identifier")
                _require(len(values) > 0, key, "needs at least one value to choose from")
                _require(len({json.dumps(v, sort_keys=True) for v in values}) == len(values), key,
                         f"values must be distinct, got {values}")
        for key in ("penalty_strength", "target_synops", "lr", "epochs"):
            bounds = getattr(self, key)
            _require(len(bounds) in (0, 2), f"study.space.{key}", "must be [low, high] or empty")
            _require_finite(bounds, f"study.space.{key}")
            if bounds and key != "target_synops":
                _require(0 < bounds[0] <= bounds[1], f"study.space.{key}",
                         f"needs 0 < low <= high, got {list(bounds)}")
        _require(len(self.penalty_strength) == 2, "study.space.penalty_strength", "needs [low, high]")
        _require(len(self.target_synops) == 2, "study.space.target_synops",
                 "needs [low, high] (0 = measured)")
        low, high = self.target_synops
        _require(low >= 0 and high >= 0, "study.space.target_synops", "must be >= 0 (0 = measured)")
        _require(not (low and high) or low <= high, "study.space.target_synops",
                 f"low must be <= high, got {list(self.target_synops)}")
        _require(
            all(p in PENALTIES[1:] for p in self.penalties) and self.penalties,
            "study.space.penalties",
            f"must be a non-empty subset of {PENALTIES[1:]}",
        )
        _require(all(1 <= k <= MAX_PIXEL_COUNT for k in self.spikes_per_pixel)
                 and len(set(self.spikes_per_pixel)) == len(self.spikes_per_pixel),
                 "study.space.spikes_per_pixel",
                 f"must be distinct values in 1..{MAX_PIXEL_COUNT}, got {self.spikes_per_pixel}")


@dataclass(frozen=True)
class ConstraintsConfig:
    """What every trial's network must satisfy. `chip`: the name of a chip profile
    (`pipeline.chip_profiles.CHIPS`; "" = none): a trial whose network cannot be mapped onto the
    chip's cores is recorded as infeasible (Optuna's constraints, so samplers learn from it) and
    never trained or on the front; once the study has its trials, each front member is checked on
    the chip's integers (`synops deploy`)."""

    chip: str = ""

    def __post_init__(self) -> None:
        _require(self.chip in ("", *CHIP_NAMES), "study.constraints.chip",
                 f"must be one of {CHIP_NAMES} (or empty for none), got {self.chip!r}")


@dataclass(frozen=True)
class StudyConfig:
    """The Optuna study that traces the accuracy-vs-SynOps front. `starter_trial` queues a first
    trial at the variant with the lowest input-layer floor, mid-range penalty and the fewest
    epochs, so the first point of the front comes as early as it can; `prune_dominated` stops a
    trial after an epoch when a finished trial beats it by far on both objectives
    (`pipeline.sweep.objective.PRUNE_MARGINS`); `confirm_seeds` further seeds confirm the members
    `confirm_members` names (`CONFIRM_MEMBERS`) once the study has its `n_trials`."""

    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    n_trials: int = 24
    seed: int = 0
    grid_points: int = 4
    reference_trial: bool = True
    starter_trial: bool = True
    prune_dominated: bool = True
    confirm_seeds: int = 2
    confirm_members: Literal["choices", "front"] = "choices"
    max_consecutive_failures: int = 3
    heartbeat_interval: int = 10
    grace_period: int = 30
    wait_timeout: int = 3600
    space: SearchSpace = field(default_factory=SearchSpace)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)

    def __post_init__(self) -> None:
        _require(self.sampler in SAMPLERS, "study.sampler", f"must be one of {SAMPLERS}")
        _require(self.n_trials > 0, "study.n_trials", "must be > 0")
        _require(self.max_consecutive_failures > 0, "study.max_consecutive_failures", "must be > 0")
        _require(self.confirm_seeds >= 0, "study.confirm_seeds", "must be >= 0 (0 = no confirmation)")
        _require(self.confirm_members in CONFIRM_MEMBERS, "study.confirm_members",
                 f"must be one of {CONFIRM_MEMBERS}")
        _require(self.grid_points > 1, "study.grid_points", "must be > 1")
        _require(self.heartbeat_interval > 0, "study.heartbeat_interval", "must be > 0 seconds")
        _require(self.wait_timeout > 0, "study.wait_timeout",
                 "must be > 0 seconds (how long a worker waits for another holding a lease: the "
                 "preparation, a base model, the confirmations, the deployment check)")
        _require(
            self.grace_period > self.heartbeat_interval,
            "study.grace_period",
            "must be longer than study.heartbeat_interval",
        )


@dataclass(frozen=True)
class ReportConfig:
    """What the Pareto report states: SynOps budgets to quote the best accuracy within."""

    budgets: list[float] = field(default_factory=lambda: [1.5e7, 2e7, 3e7, 4e7])

    def __post_init__(self) -> None:
        _require(all(b > 0 for b in self.budgets), "report.budgets", "must be positive")


@dataclass(frozen=True)
class SNNConfig:
    """How a trained network is checked as a spiking network (sinabs integrate-and-fire neurons).

    `encoding` turns a pixel's spike count into spikes over `steps` time steps: `regular` spreads
    the count evenly, `poisson` puts the same count at random steps (seeded), `rate` draws a
    Bernoulli spike per step with probability count / `steps` (the ANN's counts on average).
    `single` spiking neurons fire at most once per step and are then also fed
    at most one input spike per step. `min_v_mem` bounds the membrane from below (-1, minus the
    threshold, as sinabs' NIR import and DYNAP-CNN chips use; -inf for no bound)."""

    encoding: Literal["regular", "poisson", "rate"] = "regular"
    steps: int = 8
    spike_fn: Literal["multi", "single"] = "multi"
    min_v_mem: float = -1.0
    batch_size: int = 100
    max_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.encoding in ENCODINGS, "snn.encoding", f"must be one of {ENCODINGS}")
        _require(self.spike_fn in SPIKE_FUNCTIONS, "snn.spike_fn", f"must be one of {SPIKE_FUNCTIONS}")
        _require(self.steps > 0, "snn.steps", "must be > 0")
        _require(self.batch_size > 0, "snn.batch_size", "must be > 0")
        _require(self.max_samples >= 0, "snn.max_samples", "must be >= 0 (0 = the whole test set)")
        _require(not math.isnan(self.min_v_mem) and self.min_v_mem < 0, "snn.min_v_mem",
                 "must be < 0 (-inf for no lower bound)")

    def needs_step_per_spike(self) -> bool:
        """Whether each input spike needs a step of its own: single-spike input, or `rate` (a
        Bernoulli draw per step), so `steps` must be at least a pixel's largest spike count."""
        return self.spike_fn == "single" or self.encoding == "rate"


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. `pretrain`, when set, trains an unpenalised base model that `train`
    fine-tunes; the study's trials all fine-tune from it."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    snn: SNNConfig = field(default_factory=SNNConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(NAME_PATTERN.fullmatch(self.name) is not None and ".." not in self.name, "name",
                 f"must be letters, digits, '.', '_' or '-' (no path), got {self.name!r}")
        _require(DEVICE_PATTERN.fullmatch(self.device) is not None, "device",
                 f"must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.pretrain is not None:
            _require(self.pretrain.penalty == "none", "pretrain.penalty", "must be 'none'")

    def encodings(self) -> list[int]:
        """The input encodings (spikes per pixel) this experiment trains with, largest first."""
        return sorted(self.study.space.spikes_per_pixel or [self.data.spikes_per_pixel], reverse=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every resolved value, without unset optional tables (TOML has no null)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def base_model_key(self, fingerprints: Mapping[str, str]) -> str:
        """Hash of what determines the unpenalised base model: data, model and pretraining, and
        the fingerprints of the data's arrays and the network's parameter shapes (so a changed
        file or factory trains a new base model instead of reusing a stale one)."""
        parts = {"data": self.data, "model": self.model, "pretrain": self.pretrain}
        payload = json.dumps({k: dataclasses.asdict(v) for k, v in parts.items()}
                             | {"fingerprints": dict(fingerprints)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuild (and validate) a config from `ExperimentConfig.to_dict()`, e.g. the copy a study
    stored when it was created."""
    return _build(ExperimentConfig, values, "")


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a dataclass field's annotation; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        _require(value in allowed, key, f"must be one of {allowed}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if set(options) == {int, float}:  # a count or a fraction: the type is kept
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            _require(ok, key, f"must be a number, got {value!r}")
            return value
        return _check_type(value, options[0], key)
    if origin is dict:
        _require(isinstance(value, dict), key, "must be a table")
        _, item = typing.get_args(annotation)
        return {k: v if item is Any else _check_type(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        _require(isinstance(value, list), key, f"must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(annotation)
        return [v if item is Any else _check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        _require(isinstance(value, dict), key, "must be a table")
        return _build(annotation, value, key)
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _require(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _require(ok, key, f"must be an integer, got {value!r}")
        return value
    _require(isinstance(value, annotation), key, f"must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        path = f"{prefix}.{key}" if prefix else key
        _require(key in names, path, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {
        key: _check_type(value, hints[key], f"{prefix}.{key}" if prefix else key)
        for key, value in values.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(prefix or "config", str(err)) from None


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *tables, leaf = dotted.split(".")
    node = values
    for table in tables:
        node = node.setdefault(table, {})
        _require(isinstance(node, dict), dotted, f"{table} is not a table")
    node[leaf] = value


def parse_override(assignment: str) -> tuple[str, Any]:
    """Parse `key.path=value`, reading the value as TOML (so 3, 1e-3, true, [1, 2] keep their type)
    and falling back to a plain string."""
    key, sep, raw = assignment.partition("=")
    _require(bool(sep) and bool(key.strip()), assignment, "override must look like key.path=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _upgrade_legacy_keys(values: dict[str, Any]) -> None:
    """Read configs written before networks and data became pluggable: `[data] dataset` is the
    source, the built-in conv net's keys under `[model]` are its `[model.args]` (and win over
    them, so `--set model.channels=...` still works), and the input shape keys must match the
    built-in datasets (they now come from the data)."""
    data, model = values.get("data"), values.get("model")
    if isinstance(data, dict) and "dataset" in data:
        _require("source" not in data, "data.dataset", "give data.source only (dataset is its old name)")
        data["source"] = data.pop("dataset")
    if not isinstance(model, dict):
        return
    legacy = {k: model.pop(k) for k in LEGACY_MODEL_ARGS if k in model}
    if legacy:
        _require(model.get("factory", "conv") == "conv", f"model.{next(iter(legacy))}",
                 "belongs to the built-in conv net: give it in [model.args] of your factory")
        args = model.setdefault("args", {})
        _require(isinstance(args, dict), "model.args", "must be a table")
        args.update(legacy)  # `--set model.channels=...` reads as model.args.channels
    source = data.get("source", "mnist") if isinstance(data, dict) else "mnist"
    for key, expected in LEGACY_SHAPE_KEYS.items():
        if key in model:
            value = model.pop(key)
            _require(source in ("mnist", "fashion-mnist"), f"model.{key}",
                     "comes from the data now: remove it")
            _require(value == expected, f"model.{key}", f"{source} gives {expected}, got {value!r}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a TOML experiment config, apply dotted-key overrides, and validate everything.

    The config file's folder is put first on `sys.path` (as running a script there would), so a
    `module:function` factory or source in a `.py` file next to the config resolves."""
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config", f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError("config", f"{path} is not valid TOML: {err}") from None
    for dotted, value in (overrides or {}).items():
        _set_dotted(values, dotted, value)
    _upgrade_legacy_keys(values)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return config_from_dict(values)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: dotted keys, as `--set` and MLflow use them."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat


def differing_keys(stored: Mapping[str, Any], current: Mapping[str, Any],
                   allowed: Collection[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two `to_dict()` configs, except `allowed` ones."""
    old, new = flatten(stored), flatten(current)
    return sorted(k for k in old.keys() | new.keys() if k not in allowed and old.get(k) != new.get(k))


def replace_train(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """A copy of `config` whose fine-tuning stage has `changes` applied (validated again)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))
