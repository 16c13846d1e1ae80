"""Benchmark: our training epoch vs a loop written like the SynOps tutorial's, and the counter's cost.

(a) One epoch of `pipeline.train.train` (in-memory uint8 batches, channels-last layers, our
    counter) against the tutorial's own loop: a DataLoader over torchvision's MNIST with a
    per-sample `ToTensor() * 255`, 4 workers, sinabs' layers and `register_synops_hooks`.
    Both train the same architecture with the same penalty; runs alternate; the median of
    the per-round ratios is reported.
(b) Our training step with the SynOps counter and penalty vs the same step without either.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import platform
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ExperimentConfig, TrainConfig
from pipeline.data import Dataset, batches, load_dataset
from pipeline.model import build_model
from pipeline.synops import SynOpsCounter
from pipeline.train import synops_penalty, train


@dataclass(frozen=True)
class BenchResult:
    """Median figures over `rounds` alternating rounds (seconds are medians too)."""

    speedup_vs_tutorial_loop: float
    synops_overhead: float
    tutorial_epoch_seconds: float
    our_epoch_seconds: float
    step_ms_with_counter: float
    step_ms_without_counter: float
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
    loader = DataLoader(mnist, batch_size=config.batch_size, shuffle=True, num_workers=4)
    with warnings.catch_warnings():  # torch warns that 4 workers exceed 2 cores: that is the point
        warnings.simplefilter("ignore", UserWarning)
        for images, labels in loader:
            logits = model(images)
            optimizer.zero_grad()
            synops = model.hook_data["total_synops_per_timestep"]
            loss = F.cross_entropy(logits, labels) + synops_penalty(synops, config)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started, len(mnist)


def our_epoch_seconds(config: ExperimentConfig, dataset: Dataset) -> tuple[float, int]:
    """Wall time of one epoch of `pipeline.train.train` (its validation pass included), and the
    number of training samples it saw."""
    model = build_model(config.model)
    started = time.perf_counter()
    train(model, dataset, dataclasses.replace(config.train, epochs=1), progress=False)
    return time.perf_counter() - started, len(dataset.train)


def step_seconds(config: ExperimentConfig, dataset: Dataset, counted: bool, steps: int) -> float:
    """Mean seconds per training step, with the counter and penalty or without either.

    Every timed step starts from the same weights: otherwise the two variants train apart and
    their step times differ for reasons that have nothing to do with the counter.
    """
    model = build_model(config.model)
    start = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    data = list(batches(dataset.train, config.train.batch_size, torch.Generator().manual_seed(0)))
    timed = 0.0
    with SynOpsCounter(model) if counted else contextlib.nullcontext() as counter:
        for i in range(steps + 2):  # the first two steps warm up allocators and fan-out caches
            model.load_state_dict(start)
            images, labels = data[i % len(data)]
            started = time.perf_counter()
            loss = F.cross_entropy(model(images), labels)
            if counted:
                loss = loss + synops_penalty(counter.total, config.train)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= 2:
                timed += time.perf_counter() - started
    return timed / steps


def run_bench(config: ExperimentConfig, rounds: int = 3, steps: int = 40) -> BenchResult:
    """Alternate the loops `rounds` times and return the medians. The speedup compares time per
    training sample, since our epoch holds the validation split out of the 60k images."""
    dataset = load_dataset(config.data)
    tutorial, ours, speedups, with_counter, without = [], [], [], [], []
    for _ in range(rounds):
        tutorial_s, tutorial_n = tutorial_epoch_seconds(config.data.root, config.train)
        our_s, our_n = our_epoch_seconds(config, dataset)
        tutorial.append(tutorial_s)
        ours.append(our_s)
        speedups.append((tutorial_s / tutorial_n) / (our_s / our_n))
        for counted in (True, False) if len(with_counter) % 2 else (False, True):  # alternate order
            (with_counter if counted else without).append(step_seconds(config, dataset, counted, steps))
    return BenchResult(
        speedup_vs_tutorial_loop=statistics.median(speedups),
        synops_overhead=statistics.median(w / n for w, n in zip(with_counter, without, strict=True)),
        tutorial_epoch_seconds=statistics.median(tutorial),
        our_epoch_seconds=statistics.median(ours),
        step_ms_with_counter=statistics.median(with_counter) * 1e3,
        step_ms_without_counter=statistics.median(without) * 1e3,
        rounds=rounds,
        batch_size=config.train.batch_size,
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
    )


def to_json(result: BenchResult) -> str:
    return json.dumps(dataclasses.asdict(result), indent=2)
