"""Variants: every combination of the searched encodings and arguments, named for the study and for
Optuna, and applied to a config."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.variants import Variant, searched_parameters, study_variants, variant_of
from tests.conftest import EXPERIMENTS


def config(**overrides: object):
    return load_config(EXPERIMENTS / "smoke.toml", overrides)


def test_the_study_spans_every_combination_in_a_fixed_order() -> None:
    variants = study_variants(config(**{"study.space.model": {"channels": [[4, 8, 16], [8, 8, 16]]},
                                        "study.space.data": {"max_x": [1, 2]}}), "intensity")
    assert [v.spikes_per_pixel for v in variants] == [255] * 4 + [15] * 4  # largest encoding first
    assert variants[1] == Variant(255, {"channels": [4, 8, 16]}, {"max_x": 2})
    assert len({v.key for v in variants}) == 8
    choices = searched_parameters(variants)
    assert choices == {"spikes_per_pixel": [255, 15], "model.channels": ["[4, 8, 16]", "[8, 8, 16]"],
                       "data.max_x": [1, 2]}  # lists travel as JSON text
    assert variant_of({"spikes_per_pixel": 15, "model.channels": "[8, 8, 16]", "data.max_x": 1},
                      variants) == Variant(15, {"channels": [8, 8, 16]}, {"max_x": 1})


def test_a_variant_applies_its_encoding_and_arguments_over_the_config() -> None:
    base = config(**{"data.args": {"keep": 1, "max_x": 0}})
    designed = Variant(15, {"channels": [8, 8, 16]}, {"max_x": 2}).apply(base)
    assert designed.data.spikes_per_pixel == 15 and designed.data.args == {"keep": 1, "max_x": 2}
    assert designed.model.args["channels"] == [8, 8, 16]
    assert designed.model.args["kernel_sizes"] == base.model.args["kernel_sizes"]
    assert Variant.from_record(Variant(15, {"a": [1]}, {}).to_record()) == Variant(15, {"a": [1]}, {})
    assert Variant(3, {"width": 0.5}).slug == "3 model.width 0.5"  # an MLflow key


def test_count_data_has_no_encoding_to_search() -> None:
    assert [v.spikes_per_pixel for v in study_variants(config(**{"study.space.spikes_per_pixel": []}),
                                                       "counts")] == [None]
    with pytest.raises(ConfigError) as info:
        study_variants(config(), "counts")  # smoke.toml searches encodings
    assert info.value.key == "study.space.spikes_per_pixel"
