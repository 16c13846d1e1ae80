"""Event-camera recordings as spike-count frames, in Tonic's conventions: a recording is a NumPy
structured array with fields `x`, `y`, `t` (microseconds) and `p` (polarity), the sensor is
(W, H, P). Frames are cached on disk, keyed by the recordings and the binning.

A recording becomes `n_time_bins` frames of per-pixel event counts, one per polarity, stacked as
channels (bin-major): shape (n_time_bins * P, H, W). The network reads time bins as channels; with
one bin it sees each pixel's total count per polarity. Hand-written: binning is a few lines of
NumPy, and Tonic (an optional extra, `pip install -e '.[events]'`) pulls heavy dependencies; it is
used only to read its own datasets (`tonic = "NMNIST"`, downloaded where there is internet).
Unlike Tonic's `ToFrame(n_time_bins=...)`, which cuts windows of (t_last - t_first) // bins
microseconds and leaves out events after the last whole window, every event is counted: event
at time t falls in bin floor((t - t_first) * bins / (t_last - t_first + 1)).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

EVENT_FIELDS = ("x", "y", "t", "p")
SPLITS = ("train", "val", "test")
CACHE_FOLDER = "cache"  # under data.root, which the pipeline owns


def events_to_frames(events: np.ndarray, sensor_size: tuple[int, int, int], n_time_bins: int
                     ) -> np.ndarray:
    """Per-bin, per-polarity event counts of one recording, shape (n_time_bins * P, H, W), int32.
    With one polarity channel (P = 1) every event counts there, whatever its `p`."""
    width, height, polarities = sensor_size
    frames = np.zeros((n_time_bins, polarities, height, width), dtype=np.int32)
    if len(events):
        t = events["t"].astype(np.int64)
        first, span = t.min(), int(t.max() - t.min()) + 1
        bins = (t - first) * n_time_bins // span
        p = np.zeros(len(events), dtype=np.int64) if polarities == 1 else events["p"].astype(np.int64)
        np.add.at(frames, (bins, p, events["y"].astype(np.int64), events["x"].astype(np.int64)), 1)
    return frames.reshape(n_time_bins * polarities, height, width)


def _check_recording(events: np.ndarray, sensor_size: tuple[int, int, int], path: Path) -> None:
    missing = [f for f in EVENT_FIELDS if events.dtype.names is None or f not in events.dtype.names]
    if missing:
        raise ConfigError("data.args.root", f"{path} is not a structured event array with fields "
                          f"{EVENT_FIELDS} (missing {missing})")
    if not len(events):
        return
    width, height, polarities = sensor_size
    for field, limit, size_name in (("x", width, "W"), ("y", height, "H"), ("p", polarities, "P")):
        values = events[field].astype(np.int64)
        if values.min() < 0 or (field != "p" or polarities > 1) and values.max() >= limit:
            raise ConfigError("data.args.sensor_size", f"{path}: {field} ranges over "
                              f"{values.min()}..{values.max()}, outside the sensor's {size_name} = {limit}")


def _recordings(root: Path) -> dict[str, list[tuple[Path, str]]]:
    """(file, class name) per split in `root/<split>/<class>/*.npy`."""
    found = {}
    for split in SPLITS:
        folder = root / split
        if folder.is_dir():
            found[split] = [(path, class_dir.name) for class_dir in sorted(folder.iterdir())
                            if class_dir.is_dir() for path in sorted(class_dir.glob("*.npy"))]
    if "train" not in found or "test" not in found:
        raise ConfigError("data.args.root", f"{root} needs train/ and test/ folders, each with one "
                          "folder of .npy recordings per class")
    return found


def _cache_key(files: Iterable[Path], sensor_size: tuple[int, int, int], n_time_bins: int) -> str:
    """Changes with any recording's path, size or modification time, and with the binning."""
    listing = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    payload = json.dumps([listing, list(sensor_size), n_time_bins])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _save_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".npz", dir=path.parent)
    os.close(handle)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_event_folder(root: str, sensor_size: list[int], n_time_bins: int, cache_dir: Path
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Frames and labels of every split under `root` (`<split>/<class>/*.npy`, classes numbered
    in sorted order as torchvision's ImageFolder does), read from `cache_dir` when the same
    recordings were binned the same way before."""
    size = _sensor_size(sensor_size)
    if n_time_bins < 1:
        raise ConfigError("data.args.n_time_bins", f"must be >= 1, got {n_time_bins}")
    folder = Path(root)
    if not folder.is_dir():
        raise ConfigError("data.args.root", f"no such folder: {folder}")
    recordings = _recordings(folder)
    classes = sorted({name for files in recordings.values() for _, name in files})
    files = [path for listed in recordings.values() for path, _ in listed]
    cache = cache_dir / f"events-{_cache_key(files, size, n_time_bins)}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return {split: (stored[f"x_{split}"], stored[f"y_{split}"]) for split in recordings}
    splits = {}
    for split, files in recordings.items():
        frames, labels = [], []
        for path, name in files:
            try:
                events = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ConfigError("data.args.root", f"cannot read {path}: {err}") from None
            _check_recording(events, size, path)
            frames.append(events_to_frames(events, size, n_time_bins))
            labels.append(classes.index(name))
        if not frames:
            raise ConfigError("data.args.root", f"{folder / split} holds no .npy recordings")
        splits[split] = (np.stack(frames), np.asarray(labels, dtype=np.int64))
    _save_atomically(cache, {f"{axis}_{split}": array for split, pair in splits.items()
                             for axis, array in zip("xy", pair, strict=True)})
    return splits


def load_tonic_dataset(name: str, n_time_bins: int, save_to: Path
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Frames of one of Tonic's datasets (`tonic.datasets.<name>`, downloaded by Tonic into
    `save_to`), binned as `events_to_frames` does, for its train and test parts."""
    try:
        import tonic.datasets
    except ImportError:
        raise ConfigError("data.args.tonic", "needs Tonic: pip install -e '.[events]'") from None
    dataset_class = getattr(tonic.datasets, name, None)
    if dataset_class is None:
        raise ConfigError("data.args.tonic", f"tonic.datasets has no {name!r}")
    splits = {}
    for split in ("train", "test"):
        dataset = dataset_class(save_to=str(save_to), train=split == "train")
        size = tuple(dataset.sensor_size)
        pairs = [(events_to_frames(events, size, n_time_bins), label) for events, label in dataset]
        splits[split] = (np.stack([f for f, _ in pairs]), np.asarray([y for _, y in pairs], dtype=np.int64))
    return splits


def _sensor_size(values: list[int]) -> tuple[int, int, int]:
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError("data.args.sensor_size", f"must be [W, H, P], three positive integers, "
                          f"got {values}")
    return values[0], values[1], values[2]
