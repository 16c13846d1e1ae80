"""Data stage on generated IDX files: splits, encoding, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import DataConfig, ModelConfig
from pipeline.data import Split, batches, encode_pixels, load_dataset, load_pixels
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate
from pipeline.model import build_model


def config_for(root: Path, **changes: object) -> DataConfig:
    return DataConfig(**{"root": str(root), "val_size": 100, "verify_checksums": False} | changes)


def test_splits_are_disjoint_seeded_and_in_memory(idx_root: Path) -> None:
    data = load_dataset(config_for(idx_root))
    assert (len(data.train), len(data.val), len(data.test)) == (500, 100, 200)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 28, 28)
    pool = torch.cat([data.train.images, data.val.images]).flatten(1)
    assert len(torch.unique(pool, dim=0)) == 600
    again = load_dataset(config_for(idx_root))
    assert torch.equal(again.val.images, data.val.images)
    other = load_dataset(config_for(idx_root, split_seed=1))
    assert not torch.equal(other.val.labels, data.val.labels)


def test_subsets_limit_train_and_test(idx_root: Path) -> None:
    data = load_dataset(config_for(idx_root, max_train_samples=300, max_test_samples=50))
    assert (len(data.train), len(data.val), len(data.test)) == (200, 100, 50)


def test_batches_cover_the_split_once_as_float_spike_counts(idx_root: Path) -> None:
    split = load_dataset(config_for(idx_root)).test
    seen = list(batches(split, 64, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in seen] == [64, 64, 64, 8]
    images = torch.cat([x for x, _ in seen])
    assert images.dtype == torch.float32 and images.max() == 255
    assert sorted(torch.cat([y for _, y in seen]).tolist()) == sorted(split.labels.tolist())


@pytest.mark.parametrize("k", [255, 63, 31, 15, 7, 3, 1, 10, 100])
def test_the_encoding_maps_0_to_255_onto_0_to_k_exactly(k: int) -> None:
    values = torch.arange(256, dtype=torch.uint8)
    counts = encode_pixels(values, k)
    assert counts.dtype == torch.uint8 and counts[0] == 0 and counts[-1] == k
    assert torch.equal(torch.unique(counts), torch.arange(k + 1, dtype=torch.uint8))  # every count
    assert bool((counts[1:] >= counts[:-1]).all())  # order kept
    widths = torch.bincount(counts.long())
    assert int(widths.max()) - int(widths.min()) <= 1  # equal-width bins
    if (k + 1) & k == 0:  # k + 1 a power of two: the integer division the issue measured with
        assert torch.equal(counts, values // (256 // (k + 1)))


def test_the_encoding_is_applied_once_when_the_data_is_loaded(idx_root: Path) -> None:
    pixels = load_dataset(config_for(idx_root))
    encoded = load_dataset(config_for(idx_root, spikes_per_pixel=7))
    assert encoded.spikes_per_pixel == 7 and pixels.spikes_per_pixel == 255
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(encoded, name).images, encode_pixels(getattr(pixels, name).images, 7))
    assert int(encoded.train.images.max()) == 7
    assert load_pixels(config_for(idx_root, spikes_per_pixel=7)).spikes_per_pixel == 255
    assert torch.equal(pixels.encoded(7).val.images, encoded.val.images)
    with pytest.raises(ValueError, match="already encoded"):
        encoded.encoded(3)  # 0..7 read again as pixel values would be encoded twice
    images, _ = next(batches(encoded.test, 500))
    assert images.max() == 7  # batches serve the counts as they are


def test_the_encoding_scales_the_input_layers_synops_by_the_spikes_it_keeps() -> None:
    model = build_model(ModelConfig(), (1, 28, 28), 10)
    labels = torch.zeros(2, dtype=torch.long)
    white = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    white[1, :, :, 14:] = 0  # half an image: the factor holds whatever lights up
    tutorial = evaluate(model, Split(white, labels)).input_layer_synops
    for k in (63, 15, 7):
        coarse = evaluate(model, Split(encode_pixels(white, k), labels)).input_layer_synops
        assert coarse / tutorial == pytest.approx(k / 255, rel=1e-6)


def test_a_validation_size_that_leaves_no_training_samples_names_the_key(idx_root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset(config_for(idx_root, val_size=600))
    assert info.value.key == "data.val_size"


def test_a_fractional_validation_size_draws_that_share(idx_root: Path) -> None:
    data = load_dataset(config_for(idx_root, val_size=0.25))
    assert (len(data.train), len(data.val)) == (450, 150)
    assert data.kind == "intensity" and data.num_classes == 10 and data.input_shape == (1, 28, 28)
