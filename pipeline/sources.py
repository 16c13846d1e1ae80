"""Data sources: where samples come from, built in or the user's own, and the contract they meet.

A source returns `{"train": (x, y), "test": (x, y)}`, optionally with `"val"`: `x` an array or
tensor of shape (N, C, H, W) of non-negative numbers, `y` integer labels 0..classes-1. Built-ins:
`mnist`, `fashion-mnist` (torchvision, with offline fallbacks), `arrays` (an `.npz`, or `.npy`
pairs), `image-folder` (torchvision's ImageFolder layout) and `events` (event-camera recordings
binned into spike-count frames). A `module:function` source is called with `[data.args]`.
Whatever the source, `check_source` validates what it returned and names the split and the fault,
so data the pipeline cannot serve is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.components import call_with_args, resolve_function
from pipeline.config import MAX_PIXEL_COUNT, DataConfig
from pipeline.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")
KEY = "data.source"


@dataclass(frozen=True)
class SourceData:
    """Checked samples of every split a source gave: images as the smallest integer type that
    holds them (uint8 intensities 0..255, or spike counts), int64 labels. `val` is None when the
    source leaves the validation split to us. `fingerprint` hashes the source, its args and the
    arrays: it changes when any of them does."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor]
    kind: str
    num_classes: int
    fingerprint: str


def _load_mnist(config: DataConfig) -> dict[str, Any]:
    from pipeline.mnist_files import load_idx_dataset

    return load_idx_dataset(config)


def _load_arrays(config: DataConfig, path: str = "", train: list[str] | None = None,
                 test: list[str] | None = None, val: list[str] | None = None) -> dict[str, Any]:
    """`path`: an `.npz` holding `x_train`, `y_train`, `x_test`, `y_test` (and optionally
    `x_val`, `y_val`); or `train`, `test` (and `val`): each a pair of `.npy` files [x, y]."""
    def read(file: str, key: str) -> Any:
        if not Path(file).is_file():
            raise ConfigError(key, f"no such file: {file}")
        try:
            return np.load(file, allow_pickle=False)
        except (OSError, ValueError) as err:  # a pickle, or not NumPy's format
            raise ConfigError(key, f"cannot read {file} as NumPy arrays: {err}") from None

    if path:
        if train or test or val:
            raise ConfigError("data.args", "give either path (an .npz) or train/test .npy pairs")
        with read(path, "data.args.path") as stored:
            names = set(stored.files)
            missing = {"x_train", "y_train", "x_test", "y_test"} - names
            if missing:
                raise ConfigError("data.args.path", f"{path} lacks {sorted(missing)} (has "
                                  f"{sorted(names)})")
            return {split: (stored[f"x_{split}"], stored[f"y_{split}"])
                    for split in SPLIT_NAMES if f"x_{split}" in names}
    pairs = {"train": train, "test": test, "val": val}
    if train is None or test is None:
        raise ConfigError("data.args", "needs path (an .npz) or train and test [x.npy, y.npy] pairs")
    loaded = {}
    for split, pair in pairs.items():
        if pair is not None:
            if len(pair) != 2:
                raise ConfigError(f"data.args.{split}", f"must be [x.npy, y.npy], got {pair}")
            loaded[split] = (read(pair[0], f"data.args.{split}"), read(pair[1], f"data.args.{split}"))
    return loaded


def _load_image_folder(config: DataConfig, root: str, mode: str = "L",
                       size: list[int] | None = None) -> dict[str, Any]:
    """`root/train/<class>/*`, `root/test/<class>/*` (optionally `root/val/...`): torchvision's
    ImageFolder layout, read as uint8 grey (`mode = "L"`) or colour (`"RGB"`) images, resized to
    `size` = [H, W] when given (else every image must have one size)."""
    from torchvision import datasets, transforms

    if mode not in ("L", "RGB"):
        raise ConfigError("data.args.mode", f"must be 'L' (grey) or 'RGB', got {mode!r}")
    steps = [transforms.PILToTensor()]
    if size is not None:
        steps.insert(0, transforms.Resize(tuple(size)))
    transform = transforms.Compose(steps)
    loaded, classes = {}, None
    for split in SPLIT_NAMES:
        folder = Path(root) / split
        if not folder.is_dir():
            continue
        try:
            dataset = datasets.ImageFolder(str(folder), transform=transform,
                                           loader=lambda p: _open_image(p, mode))
        except (FileNotFoundError, OSError) as err:
            raise ConfigError("data.args.root", f"{folder}: {err}") from None
        if classes is not None and dataset.classes != classes:
            raise ConfigError("data.args.root", f"{folder} has classes {dataset.classes}, the "
                              f"training folder {classes}: each split needs the same class folders")
        classes = dataset.classes
        images = [dataset[i][0] for i in range(len(dataset))]
        if len({tuple(image.shape) for image in images}) > 1:
            raise ConfigError("data.args.size", f"images under {folder} differ in size: give "
                              "size = [H, W] to resize them")
        loaded[split] = (torch.stack(images), torch.tensor(dataset.targets))
    if "train" not in loaded or "test" not in loaded:
        raise ConfigError("data.args.root", f"{root} needs train/ and test/ folders of class folders")
    return loaded


def _open_image(path: str, mode: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)


def _load_events(config: DataConfig, root: str = "", sensor_size: list[int] | None = None,
                 n_time_bins: int = 1, tonic: str = "") -> dict[str, Any]:
    """Event recordings binned into frames (`pipeline.events`): a folder `root` of
    `<split>/<class>/*.npy` structured arrays from a sensor of `sensor_size` [W, H, P], or one of
    Tonic's datasets by name (`tonic = "NMNIST"`, downloaded into data.root)."""
    from pipeline.events import CACHE_FOLDER, load_event_folder, load_tonic_dataset

    if bool(root) == bool(tonic):
        raise ConfigError("data.args", "give either root (a folder of recordings) or tonic (a "
                          "Tonic dataset's name)")
    if tonic:
        return load_tonic_dataset(tonic, n_time_bins, Path(config.root))
    if sensor_size is None:
        raise ConfigError("data.args.sensor_size", "needs [W, H, P], the sensor's size")
    return load_event_folder(root, sensor_size, n_time_bins, Path(config.root) / CACHE_FOLDER)


# Each built-in source's loader and the kind of values it gives (`BUILTIN_SOURCES` in config).
BUILTIN_LOADERS: dict[str, tuple[Callable[..., dict[str, Any]], str]] = {  # by config.BUILTIN_SOURCES
    "mnist": (_load_mnist, "intensity"),
    "fashion-mnist": (_load_mnist, "intensity"),
    "arrays": (_load_arrays, "intensity"),
    "image-folder": (_load_image_folder, "intensity"),
    "events": (_load_events, "counts"),
}


def source_kind(config: DataConfig) -> str:
    """What the source's values are: `data.kind` if set, else the built-in source's own (event
    frames are counts, the rest intensities; a function source's are intensities)."""
    own = BUILTIN_LOADERS[config.source][1] if config.source in BUILTIN_LOADERS else "intensity"
    if config.kind == "intensity" and own == "counts":
        raise ConfigError("data.kind", f"{config.source} gives spike counts, not intensities")
    return config.kind or own


def _as_array(value: Any, where: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ConfigError(KEY, f"{where} must be a NumPy array or a torch tensor, got "
                      f"{type(value).__name__}")


def _images(x: np.ndarray, kind: str, where: str) -> np.ndarray:
    """`x` checked and stored compactly: intensities as uint8 0..255 (floats 0..1 scaled and
    rounded), counts as the smallest unsigned or signed integer type that holds them."""
    if x.ndim != 4:
        raise ConfigError(KEY, f"{where} has shape {x.shape}; needs (N, C, H, W) (add a channel "
                          "axis, x[:, None], to grey images)")
    if x.dtype == np.bool_ or not np.issubdtype(x.dtype, np.number):
        raise ConfigError(KEY, f"{where} holds {x.dtype}, not numbers")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            raise ConfigError(KEY, f"{where} holds NaN or infinite values (first at sample "
                              f"{int(np.argwhere(bad)[0][0])})")
    low, high = (x.min(), x.max()) if x.size else (0, 0)
    if low < 0:
        raise ConfigError(KEY, f"{where} holds negative values (min {low}): spike counts and "
                          "intensities are >= 0")
    if kind == "intensity":
        if np.issubdtype(x.dtype, np.floating):
            if high > 1:
                raise ConfigError(KEY, f"{where}: float intensities must lie in 0..1, got max {high} "
                                  "(uint8 0..255 is read as is; set data.kind = 'counts' for spike counts)")
            return np.rint(x * MAX_PIXEL_COUNT).astype(np.uint8)
        if high > MAX_PIXEL_COUNT:
            raise ConfigError(KEY, f"{where}: integer intensities must lie in 0..{MAX_PIXEL_COUNT}, got "
                              f"max {high} (set data.kind = 'counts' if these are spike counts)")
        return x.astype(np.uint8, copy=False)
    if np.issubdtype(x.dtype, np.floating) and (x != np.floor(x)).any():
        raise ConfigError(KEY, f"{where}: spike counts must be whole numbers, got e.g. "
                          f"{x[x != np.floor(x)].flat[0]}")
    for dtype in (np.uint8, np.int16, np.int32):
        if high <= np.iinfo(dtype).max:
            return x.astype(dtype)
    raise ConfigError(KEY, f"{where}: spike counts up to {high} exceed int32")


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise ConfigError(KEY, f"{where} labels have shape {y.shape}; need ({n},), one per sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(KEY, f"{where} labels are {y.dtype}; need integers 0..classes-1")
    return y.astype(np.int64)


def check_source(raw: Any, kind: str, fingerprint_of: Mapping[str, Any]) -> SourceData:
    """Validate what a source returned against the contract; `ConfigError("data.source")` names
    the split and the fault (shape, NaN, negative values, intensities out of range, non-integer
    counts, labels out of range). `fingerprint_of` identifies the source (name and args)."""
    if not isinstance(raw, Mapping) or not {"train", "test"} <= set(raw) or set(raw) - set(SPLIT_NAMES):
        raise ConfigError(KEY, "must return a mapping with keys 'train' and 'test' (and optionally "
                          f"'val'), each an (x, y) pair; got {type(raw).__name__}"
                          f"{' with keys ' + str(sorted(raw)) if isinstance(raw, Mapping) else ''}")
    checked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLIT_NAMES:
        if split not in raw:
            continue
        pair = raw[split]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ConfigError(KEY, f"'{split}' must be an (x, y) pair")
        x = _images(_as_array(pair[0], f"'{split}' x"), kind, f"'{split}' x")
        if len(x) == 0:
            raise ConfigError(KEY, f"'{split}' holds no samples")
        checked[split] = (x, _labels(_as_array(pair[1], f"'{split}' y"), len(x), f"'{split}'"))
    shapes = {split: x.shape[1:] for split, (x, _) in checked.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError(KEY, f"the splits' samples differ in shape: {shapes}")
    num_classes = int(checked["train"][1].max()) + 1
    for split, (_, y) in checked.items():
        if y.min() < 0 or y.max() >= num_classes:
            raise ConfigError(KEY, f"'{split}' labels range over {y.min()}..{y.max()}; the training "
                              f"labels define classes 0..{num_classes - 1}")
    if num_classes < 2:
        raise ConfigError(KEY, "the training labels hold a single class")
    digest = hashlib.sha256(json.dumps(dict(fingerprint_of), sort_keys=True, default=str).encode())
    for split, (x, y) in checked.items():
        digest.update(split.encode() + str(x.dtype).encode() + str(x.shape).encode())
        digest.update(np.ascontiguousarray(x).data)
        digest.update(np.ascontiguousarray(y).data)
    as_tensors = {split: (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))
                  for split, (x, y) in checked.items()}
    return SourceData(as_tensors["train"], as_tensors.get("val"), as_tensors["test"], kind,
                      num_classes, digest.hexdigest()[:16])


def load_source(config: DataConfig) -> SourceData:
    """The samples of `config.source` called with `config.args`, checked (`check_source`).
    Raises `ConfigError` for a source that does not resolve, rejects its args, raises, or gives
    data the pipeline cannot serve; `DataError` for a built-in dataset's missing or corrupt files."""
    kind = source_kind(config)
    if config.source in BUILTIN_LOADERS:
        loader = BUILTIN_LOADERS[config.source][0]
        raw = call_with_args(loader, config.source, KEY, config.args, config=config)
    else:
        function = resolve_function(config.source, KEY)
        raw = call_with_args(function, config.source, KEY, config.args)
    return check_source(raw, kind, {"source": config.source, "args": config.args})
