"""Event-camera data, built offline: recordings of a bar sweeping across a 32x32 sensor in one of
four directions, in Tonic's conventions (a NumPy structured array per recording, fields x, y
(int16), t (int64, microseconds), p (bool polarity: True where the bar arrives, False where it
leaves), plus sensor noise. Written as `<root>/{train,test}/<direction>/<n>.npy`, the layout of the
built-in `events` source.

    python examples/events/moving_bars.py data/moving-bars
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SENSOR = (32, 32, 2)  # W, H, P
DIRECTIONS = ("down", "left", "right", "up")
EVENT_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])


def recording(direction: str, rng: np.random.Generator, duration_us: int = 100_000) -> np.ndarray:
    """One sweep of a bar (3 pixels thick, a random part of the sensor long): each pixel the bar's
    edge crosses fires 2 to 5 events, as a contrast edge makes a DVS pixel do; and noise."""
    width, height, _ = SENSOR
    steps = width if direction in ("left", "right") else height
    start, length = int(rng.integers(0, 8)), int(rng.integers(12, 24))
    events = []
    for step in range(steps):
        position = step if direction in ("right", "down") else steps - 1 - step
        t = int(step * duration_us / steps)
        for offset in range(length):
            along = min(start + offset, (height if direction in ("left", "right") else width) - 1)
            for polarity, at in ((True, position), (False, position - 3 if direction in ("right", "down")
                                                    else position + 3)):
                if 0 <= at < steps:
                    x, y = (at, along) if direction in ("left", "right") else (along, at)
                    events += [(x, y, t + int(rng.integers(0, duration_us // steps)), polarity)
                               for _ in range(int(rng.integers(2, 6)))]
    noise = int(rng.integers(20, 60))
    events += [(int(rng.integers(0, width)), int(rng.integers(0, height)),
                int(rng.integers(0, duration_us)), bool(rng.integers(0, 2))) for _ in range(noise)]
    array = np.array(events, dtype=EVENT_DTYPE)
    return np.sort(array, order="t")


def write_recordings(root: Path, per_class: tuple[int, int] = (100, 25), seed: int = 0) -> None:
    """`per_class` training and test recordings of each direction under `root`."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for direction in DIRECTIONS:
            folder = root / split / direction
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                np.save(folder / f"{n}.npy", recording(direction, rng))


if __name__ == "__main__":
    write_recordings(Path(sys.argv[1] if len(sys.argv) > 1 else "data/moving-bars"))
