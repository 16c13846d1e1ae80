"""The examples a newcomer copies: each runs a short study end to end on data made here (the
residual net on generated MNIST files, the shapes as an `.npz` and as a function, the moving bars
as event recordings), and the residual net's SynOps equal a count by hand."""

from __future__ import annotations

import importlib
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import load_dataset
from pipeline.front import StudyRecord, choose, finished_trials
from pipeline.members import member_network
from pipeline.tracking import Tracker

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUICK = ["study.n_trials=2", "study.confirm_seeds=0", "pretrain.epochs=1", "pretrain.max_batches=8",
         "train.epochs=1", "train.max_batches=4", "data.max_test_samples=200"]


def sweep_and_report(config: Path, tmp_path: Path, *sets: str) -> tuple[optuna.Study, Tracker, str]:
    stores = ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    overrides = [f"--set={s}" for s in (*QUICK, *sets)]
    runner = CliRunner()
    for command in (["sweep", "--quiet"], ["snn", "--front", "--max-samples", "50", "--quiet"],
                    ["report", "--out", str(tmp_path / "report")]):
        result = runner.invoke(main, [*command, "--config", str(config), *stores, *overrides],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
    name = load_config(config).name
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    report = (tmp_path / "report" / "report.md").read_text()
    return study, Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}"), report


def hand_count(model: nn.Module, images: torch.Tensor) -> float:
    """Mean SynOps per sample counted by hand: each conv input (c, i, j) reaches out_channels x
    (output rows reading row i) x (output columns reading column j); each linear input reaches
    out_features. Written from the layers' geometry, not with the pipeline's counter."""
    total = 0.0

    def positions(index: int, size: int, kernel: int, padding: int, stride: int) -> int:
        outputs = (size + 2 * padding - kernel) // stride + 1
        return sum(0 <= index + padding - o * stride < kernel for o in range(outputs))

    def count(module: nn.Module, args: tuple) -> None:
        nonlocal total
        x = args[0].detach().double()
        if isinstance(module, nn.Linear):
            total += float(x.sum()) * module.out_features
            return
        _, _, height, width = x.shape
        (k, _), (p, _), (s, _) = module.kernel_size, module.padding, module.stride
        rows = torch.tensor([positions(i, height, k, p, s) for i in range(height)], dtype=torch.float64)
        cols = torch.tensor([positions(j, width, k, p, s) for j in range(width)], dtype=torch.float64)
        total += float((x * rows[:, None] * cols[None, :]).sum()) * module.out_channels

    hooks = [m.register_forward_pre_hook(count) for m in model.modules()
             if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model.eval()(images.float())
    for hook in hooks:
        hook.remove()
    return total / len(images)


@pytest.mark.slow
def test_a_residual_net_from_a_file_runs_a_study_and_its_synops_match_a_hand_count(
        tmp_path: Path, idx_root: Path) -> None:
    config = EXAMPLES / "residual" / "residual.toml"
    data = [f"data.root='{idx_root}'", "data.verify_checksums=false", "data.val_size=100"]
    study, tracker, report = sweep_and_report(config, tmp_path, *data)
    assert importlib.import_module("nets").__file__ == str(EXAMPLES / "residual" / "nets.py")
    record = StudyRecord.load(study)
    trials = finished_trials(study)
    assert len(trials) == 2 and len(record.bases) >= 1  # a base per width the trials tried
    assert "Checked as a spiking network" in report and "trial" in report
    knee = next(t for t in trials if t.number == int(choose(study).knee_member["trial"]))
    model = member_network(record.config, knee)
    model.load_state_dict(tracker.load_checkpoint(knee.run_id))
    assert any(type(m).__name__ == "ResidualBlock" for m in model.modules())
    test = load_dataset(knee.variant.apply(load_config(config, dict(
        [("data.root", str(idx_root)), ("data.verify_checksums", False), ("data.max_test_samples", 200),
         ("data.val_size", 100)]))).data).test
    assert hand_count(model, test.images) == pytest.approx(knee.test.synops_mean, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["npz.toml", "function.toml"])
def test_the_shapes_examples_run_from_a_file_and_from_a_function(tmp_path: Path, example: str) -> None:
    shapes = importlib.import_module("examples.arrays.shapes")
    shapes.write_npz(tmp_path / "shapes.npz", n_train=600, n_test=200)
    sets = ([f"data.args.path='{tmp_path / 'shapes.npz'}'"] if example == "npz.toml"
            else ["data.args.n_train=600", "data.args.n_test=200"])
    study, _, report = sweep_and_report(EXAMPLES / "arrays" / example, tmp_path, *sets)
    record = StudyRecord.load(study)
    assert record.kind == "intensity" and record.num_classes == 3
    assert len(finished_trials(study)) == 2 and "## Variants" in report


@pytest.mark.slow
def test_the_event_example_bins_recordings_into_count_frames_and_runs_a_study(tmp_path: Path) -> None:
    bars = importlib.import_module("examples.events.moving_bars")
    bars.write_recordings(tmp_path / "bars", per_class=(12, 5))
    study, _, report = sweep_and_report(EXAMPLES / "events" / "events.toml", tmp_path,
                                        f"data.args.root='{tmp_path / 'bars'}'",
                                        f"data.root='{tmp_path / 'data'}'")
    record = StudyRecord.load(study)
    assert record.kind == "counts" and record.num_classes == 4
    assert {v.data_args["n_time_bins"] for v in record.bounds.variants} == {1, 4}
    shapes = {t.variant.data_args["n_time_bins"]: t.input_shape for t in finished_trials(study)}
    assert all(shape == (2 * bins, 32, 32) for bins, shape in shapes.items())
    assert list((tmp_path / "data" / "cache").glob("events-*.npz"))  # the frames were cached
