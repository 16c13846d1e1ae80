"""One short run on real MNIST (fetched offline if torchvision cannot reach its servers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from tests.conftest import EXPERIMENTS


@pytest.mark.xdist_group("real-mnist")
def test_short_seed_run_on_real_mnist(mnist_root: Path, tracking_uri: str) -> None:
    root = f"--set=data.root='{mnist_root}'"
    result = CliRunner().invoke(main, [
        "train", "--config", str(EXPERIMENTS / "seed.toml"), root, "--tracking-uri", tracking_uri,
        "--quiet", "--epochs", "1", "--set=train.max_batches=60", "--penalty", "none",
    ])
    assert result.exit_code == 0, result.output
    (run,) = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("seed").experiment_id]
    )
    metrics = run.data.metrics
    assert metrics["test_accuracy"] > 0.8
    # The input layer's SynOps depend on the data only: ~1.05e7 per MNIST test sample (NOTES.md).
    assert abs(metrics["test_synops_0"] / 1.05e7 - 1) < 0.02
    assert metrics["test_synops_mean"] > metrics["test_synops_0"]
