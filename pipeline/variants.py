"""Variants: the designs a study compares, each with its own unpenalised base model.

A variant is one input encoding (spikes per pixel; None for spike-count data, which has no
encoding) together with one value of each searched argument of the network factory
(`[study.space.model]`) and of the data source (`[study.space.data]`). The study's variants are
every combination, in a fixed order (encodings largest first, argument values as listed). Optuna
sees each searched argument as a categorical parameter `model.<name>` / `data.<name>`; values that
Optuna cannot hold (lists, tables) travel as JSON text.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import MAX_PIXEL_COUNT, ExperimentConfig
from pipeline.errors import ConfigError

ENCODING_PARAM = "spikes_per_pixel"
MODEL_PREFIX = "model."
DATA_PREFIX = "data."


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else str(value)


@dataclass(frozen=True)
class Variant:
    """One design: the input encoding (None: the data are spike counts) and the searched
    arguments of the factory (`model_args`) and the source (`data_args`) that differ from the
    config's own. Its `key` names it in the study's records; `label` names it for people."""

    spikes_per_pixel: int | None
    model_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:  # the argument tables are dicts: hash by the key that names it
        return hash(self.key)

    @property
    def key(self) -> str:
        parts = [f"{ENCODING_PARAM}={self.spikes_per_pixel if self.spikes_per_pixel else 'counts'}"]
        parts += [f"{MODEL_PREFIX}{k}={_text(v)}" for k, v in sorted(self.model_args.items())]
        parts += [f"{DATA_PREFIX}{k}={_text(v)}" for k, v in sorted(self.data_args.items())]
        return ";".join(parts)

    def data_key(self, config: ExperimentConfig) -> str:
        """What its data depends on: the source's arguments it gives `config` (not the encoding or
        the network), so variants with the same data share it, and the config's own design too."""
        return json.dumps({**config.data.args, **self.data_args}, sort_keys=True, default=str)

    @property
    def slug(self) -> str:
        """Its name where only letters, digits, `_ - . /` and spaces may stand (MLflow keys)."""
        text = self.key.removeprefix(f"{ENCODING_PARAM}=").replace(";", " ").replace("=", " ")
        return re.sub(r"[^\w\-./ ]", "_", text)

    @property
    def label(self) -> str:
        parts = [f"{self.spikes_per_pixel} spikes/pixel" if self.spikes_per_pixel else "counts"]
        parts += [f"{k}={_text(v)}" for k, v in {**self.model_args, **self.data_args}.items()]
        return ", ".join(parts)

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        """`config` with this variant's encoding and arguments: what its data, base model and
        runs are built and keyed by."""
        data = dataclasses.replace(config.data, args={**config.data.args, **self.data_args},
                                   spikes_per_pixel=self.spikes_per_pixel or config.data.spikes_per_pixel)
        model = dataclasses.replace(config.model, args={**config.model.args, **self.model_args})
        return dataclasses.replace(config, data=data, model=model)

    def parameters(self) -> dict[str, Any]:
        """Its values under the names Optuna's parameters have."""
        return {ENCODING_PARAM: self.spikes_per_pixel,
                **{MODEL_PREFIX + k: v for k, v in self.model_args.items()},
                **{DATA_PREFIX + k: v for k, v in self.data_args.items()}}

    def to_record(self) -> dict[str, Any]:
        return {"spikes_per_pixel": self.spikes_per_pixel, "model_args": dict(self.model_args),
                "data_args": dict(self.data_args)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Variant:
        return cls(record["spikes_per_pixel"], dict(record["model_args"]), dict(record["data_args"]))


def study_variants(config: ExperimentConfig, kind: str) -> list[Variant]:
    """Every variant the study's space spans, in the study's order. Raises `ConfigError` when an
    input encoding is searched on spike-count data."""
    space = config.study.space
    if kind == "counts":
        if space.spikes_per_pixel or config.data.spikes_per_pixel != MAX_PIXEL_COUNT:
            key = "study.space.spikes_per_pixel" if space.spikes_per_pixel else "data.spikes_per_pixel"
            raise ConfigError(key, "the data are spike counts, used as they are: an input encoding "
                              "applies to intensities only")
        encodings: list[int | None] = [None]
    else:
        encodings = list(config.encodings())
    model_names, data_names = list(space.model), list(space.data)
    return [Variant(k, dict(zip(model_names, m, strict=True)), dict(zip(data_names, d, strict=True)))
            for k in encodings
            for m in itertools.product(*space.model.values())
            for d in itertools.product(*space.data.values())]


def searched_parameters(variants: list[Variant]) -> dict[str, list[str]]:
    """Optuna's categorical parameters for the variants (only those with a choice), with their
    choices as Optuna stores them (text for lists and tables)."""
    choices: dict[str, list[Any]] = {}
    for variant in variants:
        for name, value in variant.parameters().items():
            known = choices.setdefault(name, [])
            if _as_param(value) not in known:
                known.append(_as_param(value))
    return {name: values for name, values in choices.items() if len(values) > 1}


def parameters_of(variant: Variant, variants: list[Variant]) -> dict[str, Any]:
    """The trial parameters that name `variant` among the study's `variants` (the searched ones
    only), as Optuna stores them: what a queued trial of that variant carries."""
    searched = searched_parameters(variants)
    return {name: _as_param(value) for name, value in variant.parameters().items() if name in searched}


def _as_param(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else _text(value)


def variant_of(params: Mapping[str, Any], variants: list[Variant]) -> Variant:
    """The variant whose values a trial's parameters name (parameters without a choice take the
    only value there is)."""
    for variant in variants:
        values = variant.parameters()
        if all(_as_param(values[name]) == value for name, value in params.items() if name in values):
            return variant
    raise KeyError(f"no variant of the study has {dict(params)}")
