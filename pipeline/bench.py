"""Benchmark: our training epoch vs a loop written like the SynOps tutorial's, the counter's cost,
the time a study takes to its first point, and what bfloat16 would change.

(a) One epoch of `pipeline.train.train` (in-memory uint8 batches, channels-last layers, our
    counter) against the tutorial's own loop: a DataLoader over torchvision's MNIST with a
    per-sample `ToTensor() * 255`, 4 workers, sinabs' layers and `register_synops_hooks`.
    Both train the same architecture with the same penalty; runs alternate; the median of
    the per-round ratios is reported. Ours runs in the pipeline's default precision ("auto":
    bfloat16 training where the CPU has it) and in float32, whatever the config says.
(b) Our training step with the SynOps counter and penalty vs the same step without either, in the
    default precision: pairs of steps on the same batch from the same weights.
(c) The first point: `synops sweep` of the default study (in temporary stores) from its start to
    its first searched trial finished, which is on the front as the study's first point.
(d) bfloat16: the training step under CPU autocast to bfloat16 against float32 (in pairs, as
    in (b)); the test accuracy of the epoch trained in bfloat16 against the one trained in
    float32 (both evaluated in float32, as every run is); and, to show why evaluation stays in
    float32, on a trained network the SynOps counted per test sample with the forward pass in
    bfloat16 against float32, with the counts' arithmetic in float32 both times.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import itertools
import json
import math
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from optuna.trial import TrialState
from torch import nn

from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.data import EVAL_BATCH_SIZE, Dataset, Split, batches, load_dataset
from pipeline.model import build_model
from pipeline.synops import SynOpsCounter
from pipeline.train import synops_penalty, train, training_precision


@dataclass(frozen=True)
class BenchResult:
    """Median figures over `rounds` alternating rounds (seconds are medians too); each ratio also
    with the lowest and highest of its per-round values, to show how far it can be trusted."""

    speedup_vs_tutorial_loop: float  # in the default precision, `default_precision`
    speedup_range: tuple[float, float]
    float32_speedup_vs_tutorial_loop: float
    float32_speedup_range: tuple[float, float]
    default_precision: str  # what "auto" is on this machine
    synops_overhead: float
    synops_overhead_range: tuple[float, float]
    tutorial_epoch_seconds: float
    our_epoch_seconds: float
    our_float32_epoch_seconds: float
    step_ms_with_counter: float
    step_ms_without_counter: float
    bfloat16_step_speedup: float  # float32 step time / bfloat16 step time
    bfloat16_step_speedup_range: tuple[float, float]
    bfloat16_training_accuracy_change: float  # points: test accuracy, one epoch trained in bf16 vs float32
    accuracy_standard_error: float  # points: of one test accuracy, to judge the change above
    bfloat16_equal_synops: float  # share of test samples whose SynOps count bfloat16 leaves unchanged
    bfloat16_synops_change: float  # relative change of the mean test SynOps under bfloat16
    bfloat16_accuracy_change: float  # points
    first_point_seconds: float | None  # `synops sweep` start to its first searched trial done
    rounds: int
    batch_size: int
    torch_threads: int
    torch_version: str
    machine: str


def _tutorial_model() -> nn.Sequential:
    """The tutorial's network, built from sinabs' layers exactly as the tutorial writes it."""
    import sinabs.layers as sl

    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, bias=False), sl.NeuromorphicReLU(), sl.SumPool2d(2),
        nn.Conv2d(16, 32, 5, bias=False), sl.NeuromorphicReLU(), sl.SumPool2d(2),
        nn.Conv2d(32, 120, 4, bias=False), sl.NeuromorphicReLU(),
        nn.Flatten(), nn.Linear(120, 10, bias=False),
    )


def tutorial_epoch_seconds(root: str, config: TrainConfig) -> tuple[float, int]:
    """Wall time of one epoch of the tutorial's loop (DataLoader start-up included), and the
    number of training samples it saw."""
    from sinabs.hooks import register_synops_hooks
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    to_tensor = transforms.ToTensor()
    mnist = datasets.MNIST(root, train=True, transform=lambda image: to_tensor(image) * 255)
    model = _tutorial_model()
    register_synops_hooks(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    started = time.perf_counter()
    with warnings.catch_warnings():  # torch warns that 4 workers exceed 2 cores: that is the point
        warnings.simplefilter("ignore", UserWarning)
        loader = DataLoader(mnist, batch_size=config.batch_size, shuffle=True, num_workers=4)
        for images, labels in loader:
            logits = model(images)
            optimizer.zero_grad()
            synops = model.hook_data["total_synops_per_timestep"]
            loss = F.cross_entropy(logits, labels) + synops_penalty(synops, config)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started, len(mnist)


def our_epoch_seconds(config: ExperimentConfig, dataset: Dataset,
                      precision: str) -> tuple[float, int, nn.Module]:
    """Wall time of one epoch of `pipeline.train.train` in `precision` (its validation pass
    included), the number of training samples it saw, and the network it trained."""
    model = build_model(config.model, dataset.input_shape, dataset.num_classes)
    started = time.perf_counter()
    train(model, dataset, dataclasses.replace(config.train, epochs=1, precision=precision),
          progress=False)
    return time.perf_counter() - started, len(dataset.train), model


@torch.inference_mode()
def per_sample_synops(model: nn.Module, split: Split, bfloat16: bool) -> tuple[torch.Tensor, float]:
    """Each sample's SynOps (counted in float32) and the accuracy, the forward pass in float32 or
    under autocast to bfloat16."""
    model.eval()
    counts, correct = [], 0
    with SynOpsCounter(model) as counter:
        for images, labels in batches(split, EVAL_BATCH_SIZE):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                logits = model(images)
            counts.append(counter.per_sample.double())
            correct += int((logits.argmax(1) == labels).sum())
    return torch.cat(counts), correct / len(split)


def first_point_seconds(study_config: ExperimentConfig) -> float:
    """Seconds from the start of `synops sweep` of `study_config` (fresh stores in a temporary
    folder, one trial, no confirmation) to its first searched trial finished: what a user waits
    for the study's first point."""
    from pipeline.sweep.workers import run_sweep

    quick = dataclasses.replace(study_config, study=dataclasses.replace(
        study_config.study, n_trials=1, confirm_seeds=0, reference_trial=False,
        constraints=dataclasses.replace(study_config.study.constraints, chip="")))
    with tempfile.TemporaryDirectory() as tmp:
        started = datetime.datetime.now()
        study = run_sweep(quick, f"sqlite:///{tmp}/optuna.db", f"sqlite:///{tmp}/mlflow.db",
                          progress=False, echo=lambda line: None)
        (done,) = [t.datetime_complete for t in study.get_trials(states=(TrialState.COMPLETE,))]
        return (done - started).total_seconds()


@dataclass(frozen=True)
class StepVariant:
    """One way to run a training step: with the SynOps counter and penalty or without either, the
    forward pass in float32 or under autocast to bfloat16."""

    counted: bool
    bfloat16: bool


def paired_step_seconds(config: ExperimentConfig, dataset: Dataset,
                        variants: tuple[StepVariant, StepVariant],
                        steps: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `steps` training steps of both variants, run in pairs on the same batch
    from the same weights, the order alternating from pair to pair.

    Pairs, not blocks of steps: the load of a shared machine drifts within seconds, and a ratio of
    two steps taken a few milliseconds apart cancels it (blocks of 40 steps read a counter overhead
    anywhere from 1.01 to 1.26 in one run). Same weights: otherwise the variants train apart and
    their step times differ for reasons that have nothing to do with what is compared.
    """
    model = build_model(config.model, dataset.input_shape, dataset.num_classes)
    start = copy.deepcopy(model.state_dict())
    optimizers = [torch.optim.Adam(model.parameters(), lr=config.train.lr) for _ in variants]
    counter = SynOpsCounter(model)
    data = list(itertools.islice(
        batches(dataset.train, config.train.batch_size, torch.Generator().manual_seed(0)), steps + 2))
    seconds: tuple[list[float], list[float]] = ([], [])
    for i in range(steps + 2):  # the first two pairs warm up allocators and fan-out caches
        images, labels = data[i % len(data)]
        for k in (0, 1) if i % 2 else (1, 0):
            variant = variants[k]
            model.load_state_dict(start)
            with counter if variant.counted else contextlib.nullcontext():
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bfloat16):
                    logits = model(images)
                loss = F.cross_entropy(logits.float(), labels)
                if variant.counted:
                    loss = loss + synops_penalty(counter.total.float(), config.train)
                optimizers[k].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[k].step()
                elapsed = time.perf_counter() - started
            if i >= 2:
                seconds[k].append(elapsed)
    return seconds


def run_bench(config: ExperimentConfig, rounds: int = 3, steps: int = 60,
              study_config: ExperimentConfig | None = None) -> BenchResult:
    """Alternate the loops `rounds` times and return the medians. The speedup compares time per
    training sample, since our epoch holds the validation split out of the 60k images. Each round
    also times `steps` pairs of steps with and without the counter, and in float32 and bfloat16
    (`paired_step_seconds`); a round's ratio is the median of its pairs'. With `study_config`,
    also the time to its study's first point."""
    dataset = load_dataset(config.data)
    default = training_precision("auto", "cpu")
    tutorial, ours, ours_float32, speedups, float32_speedups = [], [], [], [], []
    reduced = default == "bfloat16"
    with_counter, without, overheads, bfloat16_speedups = [], [], [], []
    for _ in range(rounds):
        tutorial_s, tutorial_n = tutorial_epoch_seconds(config.data.root, config.train)
        epochs = {precision: our_epoch_seconds(config, dataset, precision)  # alternate the order
                  for precision in ("bfloat16", "float32")[::1 if len(ours) % 2 else -1]}
        (our_s, our_n, _), (float32_s, _, trained_float32) = epochs[default], epochs["float32"]
        trained = epochs["bfloat16"][2]
        tutorial.append(tutorial_s)
        ours.append(our_s)
        ours_float32.append(float32_s)
        speedups.append((tutorial_s / tutorial_n) / (our_s / our_n))
        float32_speedups.append((tutorial_s / tutorial_n) / (float32_s / our_n))
        counted, uncounted = paired_step_seconds(
            config, dataset, (StepVariant(True, reduced), StepVariant(False, reduced)), steps)
        overheads.append(statistics.median(c / u for c, u in zip(counted, uncounted, strict=True)))
        with_counter += counted
        without += uncounted
        in_float32, in_bfloat16 = paired_step_seconds(
            config, dataset, (StepVariant(True, False), StepVariant(True, True)), steps)
        bfloat16_speedups.append(
            statistics.median(f / b for f, b in zip(in_float32, in_bfloat16, strict=True)))
    exact, exact_accuracy = per_sample_synops(trained, dataset.test, bfloat16=False)
    approximate, approximate_accuracy = per_sample_synops(trained, dataset.test, bfloat16=True)
    _, float32_trained_accuracy = per_sample_synops(trained_float32, dataset.test, bfloat16=False)
    return BenchResult(
        speedup_vs_tutorial_loop=statistics.median(speedups),
        speedup_range=(min(speedups), max(speedups)),
        float32_speedup_vs_tutorial_loop=statistics.median(float32_speedups),
        float32_speedup_range=(min(float32_speedups), max(float32_speedups)),
        default_precision=default,
        synops_overhead=statistics.median(overheads),
        synops_overhead_range=(min(overheads), max(overheads)),
        tutorial_epoch_seconds=statistics.median(tutorial),
        our_epoch_seconds=statistics.median(ours),
        our_float32_epoch_seconds=statistics.median(ours_float32),
        step_ms_with_counter=statistics.median(with_counter) * 1e3,
        step_ms_without_counter=statistics.median(without) * 1e3,
        bfloat16_step_speedup=statistics.median(bfloat16_speedups),
        bfloat16_step_speedup_range=(min(bfloat16_speedups), max(bfloat16_speedups)),
        bfloat16_training_accuracy_change=(exact_accuracy - float32_trained_accuracy) * 100,
        accuracy_standard_error=math.sqrt(exact_accuracy * (1 - exact_accuracy) / len(dataset.test)) * 100,
        bfloat16_equal_synops=float((exact == approximate).double().mean()),
        bfloat16_synops_change=float(approximate.mean() / exact.mean() - 1),
        bfloat16_accuracy_change=(approximate_accuracy - exact_accuracy) * 100,
        first_point_seconds=first_point_seconds(study_config) if study_config is not None else None,
        rounds=rounds,
        batch_size=config.train.batch_size,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
    )


def to_json(result: BenchResult) -> str:
    return json.dumps(dataclasses.asdict(result), indent=2)
