"""Data sources: the built-in `arrays` and `image-folder`, a function source, and the contract
every source's data must meet (each fault named, with its split)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import load_dataset
from pipeline.errors import ConfigError
from pipeline.sources import check_source, load_source


def toy(n: int, seed: int, shape: tuple[int, ...] = (1, 8, 8), classes: int = 3
        ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape)).astype(np.uint8), rng.integers(0, classes, n)


def write_npz(path: Path, **extra: np.ndarray) -> Path:
    (x_train, y_train), (x_test, y_test) = toy(60, 0), toy(20, 1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


def test_an_npz_source_loads_its_splits_and_draws_the_validation_split(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz")
    data = load_dataset(DataConfig(source="arrays", args={"path": str(path)}, val_size=0.25))
    stored = np.load(path)
    assert (len(data.train), len(data.val), len(data.test)) == (45, 15, 20)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 3 and data.kind == "intensity"
    assert torch.equal(data.test.images, torch.from_numpy(stored["x_test"]))
    pool = sorted(map(bytes, torch.cat([data.train.images, data.val.images]).numpy()))
    assert pool == sorted(map(bytes, stored["x_train"]))  # the split only divides the training set


def test_a_source_that_gives_a_validation_split_keeps_it(tmp_path: Path) -> None:
    x_val, y_val = toy(10, 2)
    path = write_npz(tmp_path / "data.npz", x_val=x_val, y_val=y_val)
    data = load_dataset(DataConfig(source="arrays", args={"path": str(path)}))
    assert len(data.train) == 60 and torch.equal(data.val.images, torch.from_numpy(x_val))


def test_npy_pairs_are_an_arrays_source_too(tmp_path: Path) -> None:
    for split, seed in (("train", 0), ("test", 1)):
        x, y = toy(40, seed)
        np.save(tmp_path / f"x_{split}.npy", x)
        np.save(tmp_path / f"y_{split}.npy", y)
    pairs = {s: [str(tmp_path / f"x_{s}.npy"), str(tmp_path / f"y_{s}.npy")] for s in ("train", "test")}
    data = load_dataset(DataConfig(source="arrays", args=pairs, val_size=10))
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 40)


def test_an_image_folder_source_reads_class_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    grey = load_dataset(DataConfig(source="image-folder", args={"root": str(tmp_path)}, val_size=4))
    assert grey.input_shape == (1, 12, 10) and grey.num_classes == 2 and len(grey.test) == 4
    colour = load_dataset(DataConfig(source="image-folder", val_size=4,
                                     args={"root": str(tmp_path), "mode": "RGB", "size": [8, 8]}))
    assert colour.input_shape == (3, 8, 8)


def test_a_function_source_next_to_the_config_is_called_with_its_args(tmp_path: Path) -> None:
    (tmp_path / "my_data_source.py").write_text(
        "import numpy as np\n"
        "def load(n=30, scale=1.0):\n"
        "    rng = np.random.default_rng(0)\n"
        "    x = rng.random((n, 2, 6, 6)) * scale\n"
        "    return {'train': (x, np.arange(n) % 4), 'test': (x[:10], np.arange(10) % 4)}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        config = DataConfig(source="my_data_source:load", args={"n": 40, "scale": 0.5}, val_size=8)
        data = load_dataset(config)
        assert data.input_shape == (2, 6, 6) and data.num_classes == 4 and len(data.train) == 32
        assert data.train.images.dtype == torch.uint8 and int(data.train.images.max()) <= 128
        with pytest.raises(ConfigError, match=r"does not accept \['seed'\]") as info:
            load_source(DataConfig(source="my_data_source:load", args={"seed": 1}))
        assert info.value.key == "data.args"
    finally:
        sys.path.remove(str(tmp_path))


def test_the_fingerprint_changes_with_the_arrays_and_the_args(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz")
    first = load_source(DataConfig(source="arrays", args={"path": str(path)})).fingerprint
    assert load_source(DataConfig(source="arrays", args={"path": str(path)})).fingerprint == first
    (x_train, y_train), (x_test, y_test) = toy(60, 0), toy(20, 1)
    x_train[0, 0, 0, 0] ^= 1  # one pixel
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    assert load_source(DataConfig(source="arrays", args={"path": str(path)})).fingerprint != first


def splits(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    good_x, good_y = toy(10, 3)
    return {"train": (x, y), "test": (good_x, good_y)}


BAD_DATA = [
    ("intensity", splits(*toy(10, 0, shape=(8, 8))), "has shape \\(10, 8, 8\\); needs \\(N, C, H, W\\)"),
    ("intensity", splits(np.full((10, 1, 8, 8), np.nan), toy(10, 0)[1]), "'train' x holds NaN"),
    ("counts", splits(-np.ones((10, 1, 8, 8), dtype=np.int16), toy(10, 0)[1]), "negative values"),
    ("intensity", splits(np.full((10, 1, 8, 8), 2.0), toy(10, 0)[1]), "must lie in 0..1"),
    ("intensity", splits(np.full((10, 1, 8, 8), 300), toy(10, 0)[1]), "must lie in 0..255"),
    ("counts", splits(np.full((10, 1, 8, 8), 0.5), toy(10, 0)[1]), "whole numbers"),
    ("intensity", splits(toy(10, 0)[0], toy(10, 0)[1].astype(float)), "labels are float64"),
    ("intensity", splits(toy(10, 0)[0], toy(9, 0)[1]), "need \\(10,\\), one per sample"),
    ("intensity", {"train": toy(10, 0), "test": (toy(5, 1)[0], np.array([0, 1, 2, 3, 9]))},
     "'test' labels range over 0..9"),
    ("intensity", {"train": toy(10, 0), "test": toy(5, 1, shape=(1, 9, 9))}, "differ in shape"),
    ("intensity", {"train": toy(10, 0)}, "keys 'train' and 'test'"),
    ("intensity", [toy(10, 0), toy(5, 1)], "must return a mapping"),
]


@pytest.mark.parametrize(("kind", "raw", "message"), BAD_DATA, ids=[m for _, _, m in BAD_DATA])
def test_data_the_pipeline_cannot_serve_is_refused_naming_the_fault(kind: str, raw: object,
                                                                     message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        check_source(raw, kind, {"source": "test"})
    assert info.value.key == "data.source"


def test_a_missing_or_unreadable_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as info:
        load_source(DataConfig(source="arrays", args={"path": str(tmp_path / "absent.npz")}))
    assert info.value.key == "data.args.path"
    (tmp_path / "broken.npz").write_bytes(b"not an archive")
    with pytest.raises(ConfigError, match="cannot read"):
        load_source(DataConfig(source="arrays", args={"path": str(tmp_path / "broken.npz")}))
    with pytest.raises(ConfigError, match="events gives spike counts") as info:
        load_source(DataConfig(source="events", kind="intensity", args={"root": "x"}))
    assert info.value.key == "data.kind"
