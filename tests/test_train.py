"""Training and tracking: penalties, divergence, and `synops train` runs in a real MLflow store."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from sinabs.hooks import register_synops_hooks

from pipeline.cli import main
from pipeline.config import TrainConfig, load_config
from pipeline.data import EVAL_BATCH_SIZE, batches, load_dataset
from pipeline.evaluate import evaluate
from pipeline.model import build_model
from pipeline.synops import SynOpsCounter
from pipeline.train import DivergedError, synops_penalty, train
from tests.conftest import EXPERIMENTS, smoke_overrides

FINAL_METRICS = {
    "val_accuracy", "val_synops_mean", "test_accuracy", "test_synops_mean", "test_synops_p50",
    "test_synops_p95", "test_synops_max", "test_synops_0", "test_synops_3", "test_synops_6",
    "test_synops_9", "test_energy_uj_loihi",
}


def test_mse_penalty_is_the_tutorials_and_symmetric() -> None:
    config = TrainConfig(penalty="mse", penalty_weight=1e-5, target_synops=4e7)
    above, below = torch.tensor(5e7), torch.tensor(3e7)
    expected = 1e-5 * torch.nn.functional.mse_loss(above, torch.tensor(4e7)) / 1e7
    torch.testing.assert_close(synops_penalty(above, config), expected)
    torch.testing.assert_close(synops_penalty(below, config), expected)


def test_hinge_penalty_is_one_sided_and_relative() -> None:
    config = TrainConfig(penalty="hinge", penalty_weight=2.0, target_synops=4e7)
    assert synops_penalty(torch.tensor(3e7), config).item() == 0.0
    torch.testing.assert_close(synops_penalty(torch.tensor(6e7), config), torch.tensor(2.0 * 0.5**2))


def smoke_config(idx_root: Path, **extra: object):
    return load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root) | extra)


def test_the_penalty_lowers_the_synops_above_the_input_floor(idx_root: Path) -> None:
    config = smoke_config(idx_root)
    data = load_dataset(config.data)

    def trainable_synops(train_config: TrainConfig) -> float:
        model = build_model(config.model, (1, 28, 28), 10)
        train(model, data, train_config, progress=False)
        result = evaluate(model, data.val)
        return result.synops_mean - result.synops_per_layer["0"]

    free = trainable_synops(TrainConfig(epochs=5, batch_size=64, lr=3e-3))
    penalised = trainable_synops(
        TrainConfig(epochs=5, batch_size=64, lr=3e-3, penalty="hinge", penalty_weight=1.0,
                    target_synops=1e5)
    )
    assert penalised < 0.5 * free


def test_a_diverging_loss_raises(idx_root: Path) -> None:
    config = smoke_config(idx_root)
    data = load_dataset(config.data)
    diverging = TrainConfig(epochs=1, batch_size=64, penalty="mse", penalty_weight=1e300,
                            target_synops=1.0)
    with pytest.raises(DivergedError, match="loss became"):
        train(build_model(config.model, (1, 28, 28), 10), data, diverging, progress=False)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_steps_compute_in_the_chosen_precision_and_validation_in_float32(
        idx_root: Path, precision: str) -> None:
    config = smoke_config(idx_root)
    data = load_dataset(config.data)
    model = build_model(config.model, (1, 28, 28), 10)
    seen: list[tuple[bool, torch.dtype]] = []
    model[0].register_forward_hook(  # batches only: the counter probes a layer with one sample
        lambda layer, args, out: seen.append((layer.training, out.dtype)) if len(out) > 1 else None)
    train(model, data, TrainConfig(epochs=1, batch_size=64, max_batches=2, precision=precision),
          progress=False)
    expected = torch.bfloat16 if precision == "bfloat16" else torch.float32
    assert seen == [(True, expected), (True, expected), (False, torch.float32)]


def test_the_last_epochs_validation_is_the_trained_nets_own(idx_root: Path) -> None:
    """A run records the validation of its last epoch as its final one instead of evaluating
    again: it must be what evaluating the trained net gives."""
    config = smoke_config(idx_root)
    data = load_dataset(config.data)
    model = build_model(config.model, (1, 28, 28), 10)
    history = train(model, data, TrainConfig(epochs=2, batch_size=64, max_batches=3), progress=False)
    assert history.final_val == evaluate(model, data.val)
    assert history.final_val.accuracy == history.epochs[-1].val_accuracy
    assert train(model, data, TrainConfig(epochs=0), progress=False).final_val is None


def run_cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def smoke_args(idx_root: Path, uri: str) -> list[str]:
    sets = [f"--set={k}={v!r}".replace("'", '"').replace("False", "false")
            for k, v in smoke_overrides(idx_root).items()]
    return ["--config", str(EXPERIMENTS / "smoke.toml"), "--tracking-uri", uri, "--quiet", *sets]


def test_train_logs_a_complete_run_and_reuses_the_base_model(idx_root: Path, tracking_uri: str) -> None:
    result = run_cli("train", *smoke_args(idx_root, tracking_uri))
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "smoke"]
    runs = client.search_runs([experiment.experiment_id])
    roles = sorted(r.data.tags["synops.role"] for r in runs)
    assert roles == ["base", "train"]
    run = next(r for r in runs if r.data.tags["synops.role"] == "train")
    base = next(r for r in runs if r.data.tags["synops.role"] == "base")
    assert run.data.tags["synops.base_run_id"] == base.info.run_id
    assert set(run.data.metrics) >= FINAL_METRICS
    assert run.data.params["train.penalty"] == "hinge"
    assert run.data.params["data.max_train_samples"] == "0"
    history = client.get_metric_history(run.info.run_id, "epoch_val_accuracy")
    assert [m.step for m in history] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "curves.png", "model"} <= artifacts
    state_path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="model/state_dict.pt", tracking_uri=tracking_uri
    )
    state = torch.load(state_path, weights_only=True)
    build_model(load_config(EXPERIMENTS / "smoke.toml").model, (1, 28, 28), 10).load_state_dict(state)

    again = run_cli("train", *smoke_args(idx_root, tracking_uri), "--penalty-weight", "3")
    assert again.exit_code == 0, again.output
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["synops.role"] for r in runs) == ["base", "train", "train"]


def test_a_diverging_run_is_recorded_as_failed(idx_root: Path, tracking_uri: str) -> None:
    result = run_cli("train", *smoke_args(idx_root, tracking_uri), "--set=pretrain.epochs=0",
                     "--set=train.penalty=\"mse\"", "--set=train.penalty_weight=1e300")
    assert result.exit_code == 1
    assert "loss became" in result.output
    client = MlflowClient(tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "smoke"]
    failed = [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FAILED"]
    assert len(failed) == 1
    assert "DivergedError" in failed[0].data.tags["synops.failure_reason"]


def test_a_truncated_base_checkpoint_is_retrained_and_the_old_run_marked(
    idx_root: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert run_cli("train", *smoke_args(idx_root, uri)).exit_code == 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("smoke").experiment_id
    (base,) = [r for r in client.search_runs([experiment]) if r.data.tags["synops.role"] == "base"]
    (checkpoint,) = (tmp_path / "artifacts").rglob(f"{base.info.run_id}/artifacts/model/state_dict.pt")
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])

    again = run_cli("train", *smoke_args(idx_root, uri))
    assert again.exit_code == 0, again.output
    roles = {r.info.run_id: r.data.tags["synops.role"] for r in client.search_runs([experiment])}
    assert roles[base.info.run_id] == "base-unusable"
    assert sorted(roles.values()) == ["base", "base-unusable", "train", "train"]
    assert "unreadable" in client.get_run(base.info.run_id).data.tags["synops.unusable_reason"]


def test_the_default_fast_path_counts_a_trained_net_as_the_plain_float32_reference(idx_root: Path) -> None:
    """What every run uses by default (channels-last layers, uint8 batches made float, our
    counter, evaluation batches of EVAL_BATCH_SIZE, training in the default precision) against
    the plainest exact path: the same trained weights in PyTorch's default layout, one float32
    sample at a time, counted by sinabs' own hooks. Every test sample's SynOps must agree, and the
    accuracy within one standard error."""
    config = smoke_config(idx_root, **{"model.args.channels": [16, 32, 120]})  # the default net
    data = load_dataset(config.data)
    model = build_model(config.model, (1, 28, 28), 10)
    train(model, data, TrainConfig(epochs=4, batch_size=64, lr=1e-3), progress=False)
    fast = evaluate(model, data.test)

    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    register_synops_hooks(plain)
    counts, hits = [], 0
    with torch.no_grad():
        for image, label in zip(data.test.images, data.test.labels, strict=True):
            logits = plain(image[None].to(torch.float32).contiguous())
            counts.append(float(plain.hook_data["total_synops_per_timestep"]))
            hits += int(logits.argmax(1).item() == label.item())
    reference_accuracy = hits / len(counts)

    fast_counts = []
    with torch.no_grad(), SynOpsCounter(model) as counter:  # per sample, in the fast path's batches
        for images, _ in batches(data.test, EVAL_BATCH_SIZE):
            model(images)
            fast_counts.append(counter.per_sample.double())
    assert plain[0].weight.is_contiguous() and model[0].weight.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(torch.cat(fast_counts), torch.tensor(counts, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert fast.synops_mean == pytest.approx(sum(counts) / len(counts), rel=1e-6)
    standard_error = math.sqrt(reference_accuracy * (1 - reference_accuracy) / len(counts))
    assert reference_accuracy > 0.9 and abs(fast.accuracy - reference_accuracy) <= standard_error


@pytest.mark.slow
@pytest.mark.xdist_group("real-mnist")
def test_bfloat16_training_keeps_exact_counts_and_the_accuracy_of_float32(mnist_root: Path) -> None:
    """The default where the CPU has bfloat16 ("auto"): training forward passes under autocast.
    On real MNIST, one epoch of the default recipe's pretraining at 3 spikes per pixel, from the
    same start in both precisions: the bfloat16-trained net's reported SynOps are the plain
    float32 reference's (sinabs' hooks on PyTorch's default layout), and its test accuracy is
    within one standard error of the float32-trained net's."""
    config = load_config(EXPERIMENTS / "mnist.toml", {"data.root": str(mnist_root),
                                                      "data.spikes_per_pixel": 3})
    data = load_dataset(config.data)
    trained = {}
    for precision in ("bfloat16", "float32"):
        model = build_model(config.model, data.input_shape, data.num_classes)
        recipe = dataclasses.replace(config.pretrain, epochs=1, precision=precision)
        train(model, data, recipe, progress=False)
        trained[precision] = (model, evaluate(model, data.test))
    model, reduced = trained["bfloat16"]
    _, exact = trained["float32"]

    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
    register_synops_hooks(plain)
    totals = []
    with torch.no_grad():
        for images, _ in batches(data.test, 1000):
            plain(images.to(torch.float32).contiguous())
            totals.append(float(plain.hook_data["total_synops_per_timestep"]) * len(images))
    assert reduced.synops_mean == pytest.approx(sum(totals) / len(data.test), rel=1e-6)
    standard_error = math.sqrt(exact.accuracy * (1 - exact.accuracy) / exact.samples)
    assert exact.accuracy > 0.95 and abs(reduced.accuracy - exact.accuracy) <= standard_error
