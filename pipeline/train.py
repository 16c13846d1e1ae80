"""Training stage: cross-entropy plus a penalty on the SynOps the network would need as an SNN."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.config import TrainConfig
from pipeline.data import Dataset, batches
from pipeline.errors import PipelineError
from pipeline.evaluate import Evaluation, evaluate
from pipeline.synops import SynOpsCounter

# The tutorial divides its squared-error penalty by this scale (SynOps are ~1e7..1e8).
MSE_SCALE = 1e7


class DivergedError(PipelineError, RuntimeError):
    """The training loss stopped being finite; the run cannot go on."""


class TrainingStopped(KeyboardInterrupt):
    """`should_stop` asked training to stop (Ctrl-C or SIGTERM, through the caller)."""


class TrainingCut(PipelineError):
    """An `on_epoch` callback ended training early on purpose (a trial pruned as clearly
    dominated); the message says why. Not a failure: the run is closed KILLED with the reason."""


@dataclass(frozen=True)
class EpochStats:
    """Means over one epoch's training steps, and the validation accuracy and mean SynOps after it."""

    epoch: int
    loss: float
    task_loss: float
    penalty_loss: float
    train_accuracy: float
    train_synops: float
    val_accuracy: float
    val_synops: float
    seconds: float


def epoch_line(stats: EpochStats, epochs: int) -> str:
    """One line for people (and log files) per finished epoch."""
    return (f"epoch {stats.epoch}/{epochs}: loss {stats.loss:.4g} (task {stats.task_loss:.4g}, "
            f"penalty {stats.penalty_loss:.3g}), train accuracy {stats.train_accuracy:.2%}, "
            f"val accuracy {stats.val_accuracy:.2%} at {stats.val_synops:.3g} SynOps, "
            f"train SynOps {stats.train_synops:.3g}, "
            f"{stats.seconds:.0f} s")


@dataclass
class TrainHistory:
    """Per-step and per-epoch records of one training stage, for curves and logs."""

    step_task_loss: list[float] = field(default_factory=list)
    step_penalty_loss: list[float] = field(default_factory=list)
    step_synops: list[float] = field(default_factory=list)
    epochs: list[EpochStats] = field(default_factory=list)
    final_val: Evaluation | None = None  # the validation after the last epoch, in full


def synops_penalty(synops: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The SynOps term of the loss.

    `mse` is the tutorial's `weight * (S - T)^2 / 1e7`: symmetric, so it also pushes SynOps up
    towards the target. `hinge` is one-sided, `weight * (relu(S - T) / T)^2`: zero below target.
    """
    if config.penalty == "mse":
        return config.penalty_weight * (synops - config.target_synops) ** 2 / MSE_SCALE
    if config.penalty == "hinge":
        excess = torch.relu(synops - config.target_synops) / config.target_synops
        return config.penalty_weight * excess**2
    return torch.zeros((), device=synops.device)


def penalty_weight_for_strength(penalty: str, strength: float, target: float) -> float:
    """The `penalty_weight` that puts `strength` on the squared relative excess ((S - T) / T)^2.

    That is the hinge weight as is; for `mse` it is converted to the tutorial's scale,
    weight = strength * 1e7 / T^2, so one searched strength range suits both penalties.
    """
    return strength * MSE_SCALE / target**2 if penalty == "mse" else strength


def _scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(total_steps, 1)
        )
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)


def training_precision(precision: str, device: torch.device | str) -> str:
    """What `train.precision` means on `device`: "auto" is "bfloat16" where the device computes
    it natively (a CPU with AVX-512 bf16 or AMX, a CUDA GPU that supports it), else "float32"
    (emulated bfloat16 would be slower than float32)."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":  # bfloat16 tensor cores from compute capability 8.0 (Ampere) on
        native = torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    else:  # PyTorch has no public query of the CPU's bfloat16 instructions; torch.cpu's private
        # ones are used, and a PyTorch without them counts as none
        native = device.type == "cpu" and any(
            getattr(torch.cpu, query, lambda: False)()
            for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bfloat16" if native else "float32"


def steps_per_epoch(train_size: int, config: TrainConfig) -> int:
    steps = math.ceil(train_size / config.batch_size)
    return min(steps, config.max_batches) if config.max_batches else steps


def train(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> TrainHistory:
    """Train `model` in place on `dataset.train` and return its history.

    `dataset` must already be on the model's device. The training forward passes run in
    `training_precision(config.precision, ...)`, the validation after each epoch in float32.
    Raises `DivergedError` as soon as the loss is NaN or infinite, so the caller can record the
    failure instead of a meaningless model, and `TrainingStopped` before the first step after
    `should_stop()` turns true.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    reduced = training_precision(config.precision, dataset.train.images.device) == "bfloat16"
    per_epoch = steps_per_epoch(len(dataset.train), config)
    scheduler = _scheduler(optimizer, config, per_epoch * config.epochs)
    shuffle = torch.Generator().manual_seed(config.seed)
    history = TrainHistory()
    with SynOpsCounter(model) as counter:
        for epoch in range(1, config.epochs + 1):
            model.train()
            started = time.perf_counter()
            task_sum = penalty_sum = correct = synops_sum = samples = 0.0
            bar = tqdm(
                itertools.islice(batches(dataset.train, config.batch_size, shuffle), per_epoch),
                total=per_epoch,
                desc=f"epoch {epoch}/{config.epochs}",
                disable=not progress,
                leave=False,
            )
            for step, (images, labels) in enumerate(bar):
                if should_stop():
                    raise TrainingStopped(f"stop requested at epoch {epoch}, step {step + 1}")
                # Under bfloat16 the forward pass (its convolutions and matmuls) is approximate, and
                # so are the training-time numbers; the counter sums in float32 and `evaluate` runs
                # in float32, so every validation and test count and accuracy is exact.
                with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=reduced):
                    logits = model(images)
                synops = counter.total
                task_loss = F.cross_entropy(logits.float(), labels)
                penalty = synops_penalty(synops, config)
                loss = task_loss + penalty
                task_value, penalty_value, hits, synops_value = torch.stack(
                    [task_loss, penalty, (logits.argmax(1) == labels).sum(), synops]
                ).detach().double().cpu().tolist()
                if not math.isfinite(task_value + penalty_value):
                    raise DivergedError(
                        f"loss became {task_value + penalty_value} at epoch {epoch}, step {step + 1} "
                        f"(task {task_value:.4g}, penalty {penalty_value:.4g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                n = len(labels)
                task_sum += task_value * n
                penalty_sum += penalty_value * n
                correct += hits
                synops_sum += synops_value * n
                samples += n
                history.step_task_loss.append(task_value)
                history.step_penalty_loss.append(penalty_value)
                history.step_synops.append(synops_value)
                bar.set_postfix(loss=f"{(task_sum + penalty_sum) / samples:.3f}",
                                acc=f"{correct / samples:.3f}", synops=f"{synops_value:.3g}")
            bar.close()
            samples = max(samples, 1.0)
            val = history.final_val = evaluate(model, dataset.val)
            stats = EpochStats(
                epoch=epoch,
                loss=(task_sum + penalty_sum) / samples,
                task_loss=task_sum / samples,
                penalty_loss=penalty_sum / samples,
                train_accuracy=correct / samples,
                train_synops=synops_sum / samples,
                val_accuracy=val.accuracy,
                val_synops=val.synops_mean,
                seconds=time.perf_counter() - started,
            )
            history.epochs.append(stats)
            if on_epoch is not None:
                on_epoch(stats)
    return history
