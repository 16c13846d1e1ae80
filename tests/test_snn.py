"""Trained networks as spiking networks (sinabs): the ANN's SynOps estimate against the simulation,
the encodings, the study-level check and the NIR export."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import sinabs
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.cli import main
from pipeline.config import ConfigError, ModelConfig, SNNConfig, TrainConfig, load_config
from pipeline.data import Split, load_dataset
from pipeline.layers import NeuromorphicReLU, SumPool2d
from pipeline.model import build_model
from pipeline.snn import (
    encode,
    nir_graph_of,
    read_nir,
    require_enough_steps,
    save_nir,
    simulate,
    to_spiking,
)
from pipeline.synops import SynOpsCounter
from pipeline.train import train
from tests.conftest import EXPERIMENTS, smoke_overrides

# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = pytest.mark.xdist_group(__name__)


def spiking_weights(model: nn.Module, scale: float = 3.0) -> nn.Module:
    """Random weights large enough that every layer spikes (an untrained net barely does)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def counts(n: int = 16, high: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)).float()


def nested_tree() -> nn.Module:
    """The tutorial net as a tree of nested blocks (sinabs' own hooks only see a flat model)."""
    block = lambda c_in, c_out, k, pool: nn.Sequential(  # noqa: E731
        nn.Conv2d(c_in, c_out, k, bias=False), NeuromorphicReLU(), *([SumPool2d(pool)] if pool else []))
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Sequential(block(1, 16, 5, 2), block(16, 32, 5, 2)),
        nn.Sequential(block(32, 120, 4, 0), nn.Flatten()),
        nn.Linear(120, 10, bias=False))


@pytest.mark.parametrize("make", [lambda: build_model(ModelConfig(), (1, 28, 28), 10), nested_tree],
                         ids=["tutorial", "nested"])
def test_one_step_with_all_input_at_t0_equals_the_ann_exactly(make) -> None:
    model = spiking_weights(make())
    images = counts()
    split = Split(images.to(torch.uint8), torch.zeros(len(images), dtype=torch.long))
    with torch.no_grad(), SynOpsCounter(model) as ann_counter:
        ann_logits = model(images)
        ann_layers = {k: v.item() for k, v in ann_counter.per_layer.items()}
    spiking = to_spiking(model, SNNConfig(steps=1))
    with torch.no_grad(), SynOpsCounter(spiking) as snn_counter:
        snn_logits = spiking(images)
        snn_layers = {k: v.item() for k, v in snn_counter.per_layer.items()}
    assert len(ann_layers) == 4 and snn_layers == ann_layers
    assert torch.equal(snn_logits, ann_logits)
    result = simulate(model, split, SNNConfig(steps=1, max_samples=0, batch_size=5))
    assert result.agreement == 1.0
    assert result.synops_per_layer == pytest.approx(result.ann_synops_per_layer, rel=1e-6)


def test_the_encodings_keep_each_pixels_count() -> None:
    images = counts(4)
    generator = torch.Generator().manual_seed(0)
    for config in (SNNConfig(steps=8), SNNConfig(encoding="poisson", steps=8),
                   SNNConfig(steps=255, spike_fn="single"),
                   SNNConfig(encoding="poisson", steps=256, spike_fn="single")):
        spikes = encode(images, config, generator)
        assert spikes.shape == (4, config.steps, 1, 28, 28)
        assert torch.equal(spikes.sum(dim=1), images), config
        if config.spike_fn == "single":
            assert spikes.max() <= 1
    regular = encode(torch.full((1, 1, 1, 1), 5.0), SNNConfig(steps=8), generator).flatten()
    assert regular.tolist() == [0, 1, 0, 1, 1, 0, 1, 1]  # floor(5t/8) steps: evenly spread
    rate = encode(torch.full((1, 1, 100, 100), 51.0), SNNConfig(encoding="rate", steps=255), generator)
    assert rate.max() == 1 and abs(rate.sum(dim=1).mean().item() / 51 - 1) < 0.02


def test_the_poisson_encoding_is_reproducible_per_seed(idx_root: Path) -> None:
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root))
    model = spiking_weights(build_model(config.model, (1, 28, 28), 10))
    test = load_dataset(config.data).test
    poisson = SNNConfig(encoding="poisson", steps=16, max_samples=60, batch_size=20)
    first, again = simulate(model, test, poisson), simulate(model, test, poisson)
    other = simulate(model, test, SNNConfig(encoding="poisson", steps=16, max_samples=60,
                                            batch_size=20, seed=1))
    assert first == again
    assert other.synops_per_layer != first.synops_per_layer


def test_regular_encoding_on_a_trained_model_stays_within_one_percent_of_the_estimate(
    idx_root: Path
) -> None:
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root))
    data = load_dataset(config.data)
    model = build_model(ModelConfig(), (1, 28, 28), 10)  # the tutorial net
    train(model, data, TrainConfig(epochs=2, batch_size=64, lr=3e-3, schedule="onecycle"), progress=False)
    result = simulate(model, data.test, SNNConfig(steps=8, max_samples=0))
    assert result.ann_accuracy > 0.5
    assert abs(result.synops_ratio - 1) < 0.01
    assert result.agreement > 0.95


def test_nir_export_reads_back_into_the_same_spiking_network(tmp_path: Path) -> None:
    model = spiking_weights(build_model(ModelConfig(), (1, 28, 28), 10))
    config = SNNConfig(steps=4)
    save_nir(nir_graph_of(model, config, (1, 28, 28)), tmp_path / "model.nir")
    rebuilt = read_nir(tmp_path / "model.nir", config.steps)
    spiking = to_spiking(model, config)
    frames = counts(3, high=60).repeat_interleave(config.steps, dim=0) / config.steps
    with torch.no_grad():
        expected = spiking(frames)
        sinabs.reset_states(rebuilt)
        output, _ = rebuilt(frames)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(output, expected)


def test_the_study_check_logs_to_each_members_run_and_the_report_shows_it(
    study_stores: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    storage, tracking, args = study_stores
    checked = CliRunner().invoke(main, ["snn", *args, "--front", "--quiet", "--max-samples", "50"])
    assert checked.exit_code == 0, checked.output
    study = optuna.load_study(study_name="smoke", storage=storage)
    front = {t.number: t for t in study.best_trials}
    assert checked.output.count("x the ANN estimate") == len(front)
    for trial in front.values():
        run = MlflowClient(tracking).get_run(trial.user_attrs["mlflow_run_id"])
        assert {"snn_test_accuracy", "snn_synops_ratio", "snn_test_synops_0"} <= set(run.data.metrics)
        assert run.data.tags["snn.encoding"] == "regular" and run.data.metrics["snn_samples"] == 50
    out = tmp_path / "report"
    assert CliRunner().invoke(main, ["report", *args, "--out", str(out)]).exit_code == 0
    assert "SNN/ANN SynOps" in (out / "report.md").read_text() and (out / "snn_layers.png").is_file()
    assert "snn_synops_ratio" in (out / "front.csv").read_text()

    exported = CliRunner().invoke(main, ["export", *args, "--knee", "--format", "nir",
                                         "--out", str(tmp_path / "knee")])
    assert exported.exit_code == 0, exported.output
    card = json.loads((tmp_path / "knee" / "card.json").read_text())
    assert card["input_shape"] == [1, 28, 28] and card["nir"]["spiking_settings"]["steps"] == 8
    assert (tmp_path / "knee" / "model.nir").stat().st_size > 0
    missing = CliRunner().invoke(main, ["snn", *args, "--trial", "999"])
    assert missing.exit_code == 1 and "not a finished trial" in missing.output


def test_single_spike_and_rate_input_need_a_step_for_each_spike_of_the_members_encoding() -> None:
    single, rate = SNNConfig(spike_fn="single", steps=8), SNNConfig(encoding="rate", steps=8)
    require_enough_steps(single, {4: 7, 5: 3})  # 0..7 spikes per pixel fit in 8 steps
    require_enough_steps(SNNConfig(steps=8), {6: 255})  # multi-spike regular input: any count
    for settings in (single, rate):
        with pytest.raises(ConfigError, match=r"snn.steps.*at least 255 here \(trial 6: 255"):
            require_enough_steps(settings, {4: 7, 6: 255})
    with pytest.raises(ValueError, match="raise snn.steps"):  # and the simulation checks again
        encode(torch.full((1, 1, 2, 2), 40.0), SNNConfig(encoding="rate", steps=32),
               torch.Generator().manual_seed(0))
