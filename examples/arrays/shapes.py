"""Data of your own: a small image task drawn offline (filled squares, rings and crosses at random
places and sizes on a 16x16 grey canvas), as a function source and as an `.npz` file.

- As a function source (`source = "shapes:load"`), the pipeline calls `load(**[data.args])` and
  takes the returned `{"train": (x, y), "test": (x, y)}`: x of shape (N, C, H, W), uint8 0..255
  (or floats 0..1) for intensities, y integer labels 0..classes-1.
- As a file (`source = "arrays"`, `path = "data/shapes.npz"`), after
  `python examples/arrays/shapes.py data/shapes.npz` wrote `x_train`, `y_train`, `x_test`, `y_test`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SIDE = 16
CLASSES = ("square", "ring", "cross")


def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (N, 1, 16, 16) uint8 of a random shape each, with sparse noise, and labels."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 1, SIDE, SIDE)) < 0.03) * rng.integers(0, 160, (n, 1, SIDE, SIDE))
    labels = rng.integers(0, len(CLASSES), n)
    rows, cols = np.mgrid[:SIDE, :SIDE]
    for image, label in zip(images, labels, strict=True):
        size = int(rng.integers(4, 8))
        top, left = rng.integers(0, SIDE - size, 2)
        inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
        if CLASSES[label] == "ring":
            inside &= ~((rows > top) & (rows < top + size - 1) & (cols > left) & (cols < left + size - 1))
        elif CLASSES[label] == "cross":
            centre_r, centre_c = top + size // 2, left + size // 2
            inside &= (rows == centre_r) | (cols == centre_c)
        image[0][inside] = rng.integers(180, 256)
    return images.astype(np.uint8), labels.astype(np.int64)


def load(n_train: int = 3000, n_test: int = 600, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The function source: freshly drawn training and test sets (the seed makes them the same
    every time, so a study can resume)."""
    return {"train": draw(n_train, seed), "test": draw(n_test, seed + 1)}


def write_npz(path: Path, n_train: int = 3000, n_test: int = 600, seed: int = 0) -> None:
    """The same data as an `.npz` for the built-in `arrays` source."""
    splits = load(n_train, n_test, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=splits["train"][0], y_train=splits["train"][1],
                        x_test=splits["test"][0], y_test=splits["test"][1])


if __name__ == "__main__":
    write_npz(Path(sys.argv[1] if len(sys.argv) > 1 else "data/shapes.npz"))
