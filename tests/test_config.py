"""Configs: every shipped file loads, bad values are refused naming the key, overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import TUTORIAL_RECIPE, ConfigError, load_config, parse_override
from tests.conftest import EXPERIMENTS


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    written = tmp_path / "resolved.toml"
    written.write_text(config.to_toml())
    assert load_config(written) == config


def test_seed_config_is_the_tutorial_recipe() -> None:
    config = load_config(EXPERIMENTS / "seed.toml")
    assert config.pretrain is None
    assert config.train == TUTORIAL_RECIPE  # the study's reference trial runs the same recipe
    train = config.train
    assert (train.epochs, train.batch_size, train.lr, train.schedule) == (2, 512, 1e-3, "constant")
    assert (train.penalty, train.penalty_weight, train.target_synops, train.seed) == ("mse", 1e-5, 4e7, 1)
    assert train.precision == "float32"  # as the tutorial ran
    assert config.model.factory == "conv" and config.model.args["channels"] == [16, 32, 120]
    assert not config.model.args.get("bias", False)


def test_configs_written_before_pluggable_networks_and_data_still_load(tmp_path: Path) -> None:
    old = tmp_path / "old.toml"
    old.write_text('name = "old"\n[data]\ndataset = "mnist"\n[model]\nchannels = [16, 32, 120]\n'
                   'kernel_sizes = [5, 5, 4]\npooling = [2, 2, 1]\nin_channels = 1\ninput_size = 28\n'
                   'num_classes = 10\ninit_seed = 1\n')
    config = load_config(old)
    seed = load_config(EXPERIMENTS / "seed.toml")
    assert config.data.source == "mnist" and config.model == seed.model
    overridden = load_config(EXPERIMENTS / "seed.toml", {"model.channels": [8, 16, 32]})
    assert overridden.model.args["channels"] == [8, 16, 32]


BAD_VALUES = [
    ("train.epochs", -1),
    ("train.target_synops", 0),
    ("train.penalty", "l1"),
    ("train.precision", "float16"),
    ("train.lr", "fast"),
    ("train.batch_size", 1.5),
    ("data.val_size", 0),
    ("study.sampler", "cmaes"),
    ("study.space.penalty_strength", [10.0, 1.0]),
    ("train.momentum", 0.9),
    ("train.lr", float("inf")),
    ("train.penalty_weight", float("nan")),
    ("train.target_synops", float("inf")),
    ("study.space.lr", [0.0, 1e-3]),
    ("study.space.epochs", [4, 2]),
    ("study.space.target_synops", [2e7, float("inf")]),
    ("study.max_consecutive_failures", 0),
    ("model.input_size", 32),  # MNIST images are 28x28 (an older config's key, checked)
    ("model.in_channels", 3),
    ("model.num_classes", 100),
    ("device", "cudafoo"),
    ("name", "../elsewhere"),
    ("data.spikes_per_pixel", 0),
    ("data.spikes_per_pixel", 256),
    ("study.space.spikes_per_pixel", [15, 15]),
    ("study.space.spikes_per_pixel", [7, 300]),
    ("study.wait_timeout", 0),
    ("data.source", "mnits"),
    ("data.source", "no path"),
    ("data.kind", "spikes"),
    ("data.val_size", 1.5),
    ("data.args", {"not an identifier": 1}),
    ("model.factory", "resnet"),
    ("model.args", {"num_classes": 3}),  # comes from the data
    ("study.space.model", {"width": []}),
    ("study.space.data", {"n_time_bins": [1, 1]}),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=lambda v: str(v))
def test_bad_values_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXPERIMENTS / "mnist.toml", {key: value})
    assert info.value.key.startswith(key)


def test_broken_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("name = 'x'\n[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_overrides_keep_toml_types() -> None:
    assert parse_override("train.lr=3e-4") == ("train.lr", 3e-4)
    assert parse_override("model.channels=[8, 16, 32]") == ("model.channels", [8, 16, 32])
    assert parse_override("train.penalty=hinge") == ("train.penalty", "hinge")
    config = load_config(EXPERIMENTS / "seed.toml", dict([parse_override("train.epochs=5")]))
    assert config.train.epochs == 5


@pytest.mark.parametrize(
    "args",
    [
        ["--epochs", "-2"],
        ["--set", "train.target_synops=-1"],
        ["--set", "train.penalty=l1"],
        ["--set", "train.bogus=1"],
        ["--penalty", "l1"],
        ["--lr", "inf"],
        ["--set", "model.kernel_sizes=[5, 5, 9]"],  # the third conv no longer fits a 4x4 map
        ["--set", "model.args.channels=[16, -32, 120]"],
        ["--set", "train.init_from='absent.pt'"],
        ["--device", "cudafoo"],
    ],
)
def test_cli_refuses_bad_input_with_exit_2_and_writes_nothing(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, idx_root: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    data = ["--set", f"data.root='{idx_root}'", "--set", "data.verify_checksums=false"]
    result = CliRunner().invoke(main, ["train", "--config", str(EXPERIMENTS / "seed.toml"), *data,
                                       *args])
    assert result.exit_code == 2, result.output
    assert "Error" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cli_refuses_cuda_where_there_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--config", str(EXPERIMENTS / "seed.toml"),
                                       "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert list(tmp_path.iterdir()) == []


def test_every_built_in_name_the_config_allows_has_its_implementation() -> None:
    from pipeline.config import BUILTIN_FACTORIES, BUILTIN_SOURCES, DATA_KINDS
    from pipeline.model import FACTORIES
    from pipeline.sources import BUILTIN_LOADERS

    assert set(FACTORIES) == set(BUILTIN_FACTORIES)
    assert set(BUILTIN_LOADERS) == set(BUILTIN_SOURCES)
    assert {kind for _, kind in BUILTIN_LOADERS.values()} <= set(DATA_KINDS)
