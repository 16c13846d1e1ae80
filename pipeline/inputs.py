"""Everything a config's data and networks must satisfy, checked before any store is touched.

`load_inputs` loads the data of every variant the study spans, builds each variant's network,
proves it can be counted on its own data (`check_network`), and fingerprints both, so a study or a
run is refused with exit 2 and nothing written when the user's network or data cannot be served,
and a resumed study notices when the data or the network changed underneath it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.chip import ChipMapping, chip_fit
from pipeline.config import MAX_PIXEL_COUNT, ExperimentConfig
from pipeline.data import Dataset, encode_pixels, load_pixels
from pipeline.model import CHECK_SAMPLES, base_fingerprints, build_model, check_network, model_fingerprint
from pipeline.variants import Variant, study_variants


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it caches per instance
class StudyInputs:
    """The checked data of each variant's source arguments (raw intensities, or counts), the
    study's variants in order, and the fingerprints of data and networks."""

    config: ExperimentConfig
    kind: str
    variants: list[Variant]
    raw: Mapping[str, Dataset]  # by `Variant.data_key(config)`
    fingerprints: Mapping[str, Any]

    @property
    def reference_variant(self) -> Variant:
        """The tutorial's design on this data: the config's own network and source arguments at
        the tutorial's encoding (a pixel value 0..255 is that many spikes)."""
        return Variant(None if self.kind == "counts" else MAX_PIXEL_COUNT)

    def dataset(self, variant: Variant) -> Dataset:
        """The variant's data, encoded (made once per variant), on the config's device."""
        return self._encoded(variant.data_key(self.config), variant.spikes_per_pixel)

    @functools.cache  # noqa: B019 - kept for the life of the inputs, one per process
    def _encoded(self, data_key: str, spikes_per_pixel: int | None) -> Dataset:
        raw = self.raw[data_key]
        return (raw if spikes_per_pixel is None else raw.encoded(spikes_per_pixel)).to(self.config.device)

    def network(self, variant: Variant) -> nn.Module:
        """A freshly initialised network of the variant, for its data's shape and classes."""
        data = self.raw[variant.data_key(self.config)]
        return build_model(variant.apply(self.config).model, data.input_shape, data.num_classes)

    @functools.cache  # noqa: B019 - kept for the life of the inputs, one per process
    def chip_mapping(self, variant: Variant, chip: str) -> ChipMapping:
        """Where the variant's network goes on `chip`'s cores, or why it cannot (its structure
        decides, not its weights)."""
        return chip_fit(self.network(variant), self.raw[variant.data_key(self.config)].input_shape, chip)

    def base_fingerprints(self, variant: Variant) -> dict[str, str]:
        """What a base model of the variant depends on beyond its config: its data's arrays and
        its network's parameter shapes."""
        return base_fingerprints(self.fingerprints["data"][variant.data_key(self.config)],
                                 self.fingerprints["model"][variant.key])


def load_inputs(config: ExperimentConfig) -> StudyInputs:
    """Load and check the data and networks of every variant of `config`'s study (and of its
    own design). Raises `ConfigError` naming the key, layer or split at the first thing that
    cannot be served; `DataError` for a built-in dataset's missing or corrupt files."""
    own = load_pixels(config.data)
    variants = study_variants(config, own.kind)
    raw = {Variant(None).data_key(config): own}  # the config's own source arguments
    for variant in variants:
        if variant.data_key(config) not in raw:
            raw[variant.data_key(config)] = load_pixels(variant.apply(config).data)
    inputs = StudyInputs(config, own.kind, variants, raw, {})
    models = {}
    for variant in [*variants, inputs.reference_variant]:
        network = inputs.network(variant)
        data = raw[variant.data_key(config)]
        sample = data.train.images[:CHECK_SAMPLES]
        if variant.spikes_per_pixel is not None:
            sample = encode_pixels(sample, variant.spikes_per_pixel)
        check_network(network, sample, data.num_classes)
        models[variant.key] = model_fingerprint(variant.apply(config).model, network)
    fingerprints = {"data": {key: data.fingerprint for key, data in raw.items()}, "model": models}
    return StudyInputs(config, own.kind, variants, raw, fingerprints)


def fingerprint_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What changed between two studies' fingerprints, for people: the data arrays of a source's
    arguments, or a network's parameter shapes (named)."""
    changes = []
    for data_key, digest in stored.get("data", {}).items():
        now = current["data"].get(data_key)
        if now is not None and now != digest:
            changes.append(f"the data (source args {data_key}) changed since the study was created: "
                           f"arrays hash {digest} -> {now}")
    for variant_key, record in stored.get("model", {}).items():
        now = current["model"].get(variant_key)
        if now is None or now["hash"] == record["hash"]:
            continue
        old_shapes, new_shapes = record["parameter_shapes"], now["parameter_shapes"]
        differing = [f"{name} {old_shapes.get(name)} -> {new_shapes.get(name)}"
                     for name in sorted(old_shapes.keys() | new_shapes.keys())
                     if old_shapes.get(name) != new_shapes.get(name)]
        changes.append(f"the network of {variant_key} changed since the study was created: "
                       + ("; ".join(differing[:5]) if differing else f"fingerprint {record['hash']} "
                          f"-> {now['hash']}"))
    return changes
