"""Event recordings into spike-count frames: the bins by hand, the folder layout, the cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.data import load_dataset
from pipeline.errors import ConfigError
from pipeline.events import EVENT_FIELDS, events_to_frames

DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])


def events(rows: list[tuple[int, int, int, bool]]) -> np.ndarray:
    return np.array(rows, dtype=DTYPE)


def test_frames_count_the_events_binned_by_hand() -> None:
    # Sensor 4 wide, 3 high, 2 polarities; times 0..99 us in 4 bins of 25 us: [0,25) [25,50) ...
    recording = events([(0, 0, 0, True), (0, 0, 10, True), (3, 2, 24, False), (1, 1, 25, True),
                        (1, 1, 49, True), (2, 0, 50, False), (2, 0, 74, False), (3, 2, 99, True)])
    frames = events_to_frames(recording, (4, 3, 2), 4)
    assert frames.shape == (8, 3, 4)  # (bins x polarities, H, W)
    expected = np.zeros((4, 2, 3, 4), dtype=np.int64)
    for x, y, t, p in [(0, 0, 0, 1), (0, 0, 10, 1), (3, 2, 24, 0), (1, 1, 25, 1), (1, 1, 49, 1),
                       (2, 0, 50, 0), (2, 0, 74, 0), (3, 2, 99, 1)]:
        expected[t // 25, p, y, x] += 1  # bin = floor((t - 0) * 4 / 100)
    assert np.array_equal(frames, expected.reshape(8, 3, 4))
    assert frames.sum() == len(recording)  # every event counted, the last one too
    single = events_to_frames(recording, (4, 3, 1), 1)  # one polarity channel: all events there
    assert single.shape == (1, 3, 4) and single[0, 0, 0] == 2 and single.sum() == 8


def write_recordings(root: Path, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(("left", "right")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                x = np.full(20, label * 3, dtype=np.int16)
                rows = [(int(xi), int(rng.integers(0, 3)), int(t), bool(rng.integers(0, 2)))
                        for xi, t in zip(x, np.sort(rng.integers(0, 1000, 20)), strict=True)]
                np.save(folder / f"{i}.npy", events(rows))


def test_an_event_folder_becomes_count_data_in_class_order_and_is_cached(tmp_path: Path) -> None:
    write_recordings(tmp_path / "recordings")
    config = DataConfig(source="events", root=str(tmp_path / "cache-root"), val_size=2,
                        args={"root": str(tmp_path / "recordings"), "sensor_size": [4, 3, 2],
                              "n_time_bins": 2})
    data = load_dataset(config)
    assert data.kind == "counts" and data.spikes_per_pixel is None
    assert data.input_shape == (4, 3, 4) and data.num_classes == 2 and len(data.test) == 6
    assert int(data.test.images.sum()) == 6 * 20
    right = data.test.images[data.test.labels == 1]  # every event of "right" sits at x = 3
    assert int(right[..., 3].sum()) == int(right.sum()) > 0
    (cached,) = (tmp_path / "cache-root" / "cache").glob("events-*.npz")
    again = load_dataset(config)
    assert again.fingerprint == data.fingerprint and cached.stat().st_size > 0
    other = load_dataset(DataConfig(**{**config.__dict__, "args": {**config.args, "n_time_bins": 1}}))
    assert other.input_shape == (2, 3, 4) and len(list(cached.parent.glob("events-*.npz"))) == 2


def test_recordings_that_do_not_fit_the_sensor_are_named(tmp_path: Path) -> None:
    write_recordings(tmp_path / "recordings", per_class=1)
    args = {"root": str(tmp_path / "recordings"), "sensor_size": [3, 3, 2]}  # x reaches 3
    with pytest.raises(ConfigError, match="x ranges over 3..3, outside the sensor's W = 3") as info:
        load_dataset(DataConfig(source="events", root=str(tmp_path), val_size=1, args=args))
    assert info.value.key == "data.args.sensor_size"
    bad = tmp_path / "recordings" / "train" / "left" / "0.npy"
    np.save(bad, np.zeros((5, 4)))
    with pytest.raises(ConfigError, match=re.escape(f"fields {EVENT_FIELDS}")):
        load_dataset(DataConfig(source="events", root=str(tmp_path), val_size=1,
                                args={**args, "sensor_size": [4, 3, 2]}))
