"""Data stage: the source's samples split into train, validation and test, encoded once into input
spike counts, and served as batches from memory.

Samples come from `pipeline.sources` (built-in datasets or the user's own function) already
checked. The validation split is ours: a seeded draw from the training samples, unless the source
gives one. Intensities (uint8 0..255) are encoded into 0..`spikes_per_pixel` spikes (255: the value
itself, as the tutorial); spike counts are used as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pipeline.config import MAX_PIXEL_COUNT, DataConfig
from pipeline.errors import ConfigError
from pipeline.sources import load_source

# Samples per batch when a network is only run forward (evaluation, chip checks): small enough that
# a batch's feature maps stay in the CPU's caches (the tutorial net's 10,000 test images took
# 0.27 s in batches of 250, 0.50 s in batches of 1000).
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class Split:
    """Samples as integer spike counts (or raw intensities before encoding), shape (N, C, H, W),
    and int64 labels, shape (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def head(self, n: int) -> Split:
        """The first `n` samples (all when n is 0)."""
        return Split(self.images[:n], self.labels[:n]) if n else self


def encode_pixels(images: torch.Tensor, spikes_per_pixel: int) -> torch.Tensor:
    """uint8 pixel values 0..255 as 0..`spikes_per_pixel` spike counts: equal-width bins,
    floor(v * (k + 1) / 256), so 0 stays 0, 255 becomes k, and k = 255 keeps every value (for
    k + 1 a power of two, this is v // (256 / (k + 1)))."""
    if spikes_per_pixel == MAX_PIXEL_COUNT:
        return images
    return (images.to(torch.int32) * (spikes_per_pixel + 1) // (MAX_PIXEL_COUNT + 1)).to(torch.uint8)


@dataclass(frozen=True)
class Dataset:
    """Train and validation (disjoint) and test splits. `kind` is "intensity" (samples are pixel
    values, encoded to 0..`spikes_per_pixel` spikes) or "counts" (spike counts as the source gave
    them; `spikes_per_pixel` is None). `fingerprint` identifies the source's arrays."""

    train: Split
    val: Split
    test: Split
    kind: str
    num_classes: int
    fingerprint: str
    spikes_per_pixel: int | None = MAX_PIXEL_COUNT

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample: what a network factory is built for."""
        channels, height, width = self.train.images.shape[1:]
        return int(channels), int(height), int(width)

    def to(self, device: torch.device | str) -> Dataset:
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device),
                                   test=self.test.to(device))

    def encoded(self, spikes_per_pixel: int | None) -> Dataset:
        """This dataset of raw intensities with another input encoding (None for spike counts,
        which are used as they are). Refused on data already encoded, so an encoding is never
        applied twice, and on counts."""
        if spikes_per_pixel == self.spikes_per_pixel:
            return self
        if self.kind == "counts" or spikes_per_pixel is None:
            raise ValueError(f"an input encoding applies to intensities only ({self.kind} data, "
                             f"asked for {spikes_per_pixel})")
        if self.spikes_per_pixel != MAX_PIXEL_COUNT:
            raise ValueError(f"this dataset is already encoded to {self.spikes_per_pixel} spikes "
                             "per pixel; encode the raw pixel values instead")

        def split(part: Split) -> Split:
            return Split(encode_pixels(part.images, spikes_per_pixel), part.labels)

        return dataclasses.replace(self, train=split(self.train), val=split(self.val),
                                   test=split(self.test), spikes_per_pixel=spikes_per_pixel)


def _validation_count(config: DataConfig, available: int) -> int:
    count = round(config.val_size * available) if isinstance(config.val_size, float) else config.val_size
    if not 0 < count < available:
        raise ConfigError("data.val_size", f"{config.val_size} leaves no training or no validation "
                          f"samples of {available}")
    return count


def load_dataset(config: DataConfig) -> Dataset:
    """The source's samples as train/validation/test splits held in memory, encoded once to
    `config.spikes_per_pixel` spikes at most (intensities; counts are kept as they are).

    Unless the source gives a validation split, it is a seeded draw (`split_seed`) of
    `val_size` training samples; when `max_train_samples` is set, both splits come from a seeded
    subset of that size. Raises `ConfigError` for a source or data the pipeline cannot serve.
    """
    source = load_source(config)
    images, labels = source.train
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.split_seed))
    if config.max_train_samples:
        order = order[: config.max_train_samples]
    if source.val is None:
        count = _validation_count(config, len(order))
        val = Split(images[order[:count]], labels[order[:count]])
        train = Split(images[order[count:]], labels[order[count:]])
    else:
        val, train = Split(*source.val), Split(images[order], labels[order])
    raw = Dataset(train=train, val=val, test=Split(*source.test).head(config.max_test_samples),
                  kind=source.kind, num_classes=source.num_classes, fingerprint=source.fingerprint,
                  spikes_per_pixel=MAX_PIXEL_COUNT if source.kind == "intensity" else None)
    return raw if source.kind == "counts" else raw.encoded(config.spikes_per_pixel)


def load_pixels(config: DataConfig) -> Dataset:
    """`load_dataset` without the encoding: raw intensities, for a study that encodes them
    differently per variant (`Dataset.encoded`); spike counts as they are."""
    return load_dataset(dataclasses.replace(config, spikes_per_pixel=MAX_PIXEL_COUNT))


def batches(
    split: Split, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float spike counts, labels) batches; shuffled when a generator is given."""
    n = len(split)
    if generator is None:
        yield from ((split.images[i : i + batch_size].float(), split.labels[i : i + batch_size])
                    for i in range(0, n, batch_size))
        return
    order = torch.randperm(n, generator=generator).to(split.labels.device)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield split.images[index].float(), split.labels[index]
