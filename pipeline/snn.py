"""Spiking simulation: a trained network run as a sinabs spiking network, to measure what the ANN's
SynOps estimate and predictions become on the network a chip runs, and to export it as NIR.

Our `NeuromorphicReLU` becomes sinabs' integrate-and-fire `IAFSqueeze` (subtractive reset), our
`SumPool2d` sinabs' `SumPool2d`; the output is the last layer's sum over time. The only module
that imports sinabs and nir (`sinabs.from_model` maps only its own layers, so ours are mapped
here through sinabs' public `replace_module`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import nir
import numpy as np
import sinabs
import sinabs.activation
import sinabs.layers
import sinabs.nir
import torch
from sinabs.conversion import replace_module
from torch import nn
from tqdm import tqdm

from pipeline.config import SNNConfig
from pipeline.data import Split, batches
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluate import SpikingEvaluation, SpikingFailure, evaluate
from pipeline.layers import NeuromorphicReLU, SumPool2d
from pipeline.synops import SynOpsCounter

# Leaf modules a spiking network runs step by step with the same result, summed over time, as the
# ANN on the counts: they are linear (weights without bias, sums, reshapes) or are the spiking
# activation itself. Anything else (max or average pooling, batch norm, other activations, a
# module of the user's own) computes something else on each step's spikes than on their sum.
TIME_LINEAR_LEAVES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Flatten, nn.Unflatten, nn.Identity,
                      nn.Dropout, nn.Dropout2d, SumPool2d, NeuromorphicReLU)
FIXES = {nn.MaxPool2d: "use SumPool2d (pipeline.layers): a chip sums spikes",
         nn.AvgPool2d: "use SumPool2d (pipeline.layers), which sums the spikes of a window",
         nn.BatchNorm2d: "fold it into the conv before it, or leave it out: its shift would be "
                         "added at every time step"}


def spiking_obstacles(model: nn.Module) -> list[str]:
    """Why `model` cannot run as a spiking network with the ANN's meaning, layer by layer (empty
    when it can): a leaf module that is not linear in time. (A bias is linear but added at every
    step; the simulation shows what that costs rather than refusing it.)"""
    found = []
    for name, module in model.named_modules():
        if not list(module.children()) and not isinstance(module, TIME_LINEAR_LEAVES):
            fix = next((f for kind, f in FIXES.items() if isinstance(module, kind)),
                       "replace it with layers that are linear in time and NeuromorphicReLU")
            found.append(f"layer '{name}' ({type(module).__name__}) gives a spiking network another "
                         f"result than the ANN: {fix}")
    return found


def to_spiking(model: nn.Module, config: SNNConfig) -> nn.Module:
    """A spiking copy of `model` (any module tree) that takes (batch * steps, C, H, W) input."""
    spike_fn = (sinabs.activation.MultiSpike if config.spike_fn == "multi"
                else sinabs.activation.SingleSpike)
    min_v_mem = None if math.isinf(config.min_v_mem) else config.min_v_mem

    def neuron(_: nn.Module) -> nn.Module:
        return sinabs.layers.IAFSqueeze(num_timesteps=config.steps, spike_fn=spike_fn,
                                        reset_fn=sinabs.activation.MembraneSubtract(),
                                        min_v_mem=min_v_mem)

    spiking = replace_module(copy.deepcopy(model), NeuromorphicReLU, neuron)
    spiking = replace_module(spiking, SumPool2d,
                             lambda pool: sinabs.layers.SumPool2d(pool.kernel_size, pool.stride))
    return spiking.eval()


def encode(counts: torch.Tensor, config: SNNConfig, generator: torch.Generator) -> torch.Tensor:
    """Spike trains (batch, steps, C, H, W) for integer spike counts (batch, C, H, W).

    `regular` and `poisson` keep each pixel's count exactly; with single-spike neurons a step
    carries at most one input spike; `rate` keeps it on average. (Hand-written: sinabs has no
    encoder for given counts.)
    """
    counts = counts.round().long()
    steps = config.steps
    if config.needs_step_per_spike() and counts.numel() and int(counts.max()) > steps:
        raise ValueError(f"a pixel carries {int(counts.max())} spikes but {config.encoding} input "
                         f"with {config.spike_fn}-spike neurons has {steps} steps: raise snn.steps")
    shape = (counts.shape[0], steps, *counts.shape[1:])
    if config.encoding == "rate":
        probability = (counts.float() / steps).unsqueeze(1).expand(shape)
        return torch.bernoulli(probability, generator=generator)
    if config.encoding == "regular":
        ticks = torch.arange(steps + 1, device=counts.device).view(1, -1, *[1] * (counts.dim() - 1))
        cumulative = (counts.unsqueeze(1) * ticks) // steps
        return (cumulative[:, 1:] - cumulative[:, :-1]).float()
    if config.spike_fn == "single":  # poisson, at most one spike per step: distinct random steps
        keys = torch.rand(shape, generator=generator).to(counts.device)
        ranks = keys.argsort(dim=1).argsort(dim=1)
        return (ranks < counts.unsqueeze(1)).float()
    # poisson, several spikes may share a step: each spike at a uniformly drawn step, as a
    # multinomial split of the count one step at a time
    spikes = torch.empty(shape, device=counts.device)
    remaining = counts.float()
    for step in range(steps):
        here = torch.binomial(remaining.cpu(), torch.full_like(remaining.cpu(), 1 / (steps - step)),
                              generator=generator).to(counts.device)
        spikes[:, step] = here
        remaining = remaining - here
    return spikes


@torch.no_grad()
def simulate(model: nn.Module, split: Split, config: SNNConfig,
             on_batch: Callable[[int], None] | None = None) -> SpikingEvaluation:
    """Run `model` as a spiking network on the first `config.max_samples` images of `split` (all
    when 0), next to the ANN on the same images. `on_batch` receives each batch's size."""
    if config.max_samples:
        split = Split(split.images[: config.max_samples], split.labels[: config.max_samples])
    ann = evaluate(model, split, batch_size=config.batch_size)
    spiking = to_spiking(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    steps, correct, agree, total = config.steps, 0, 0, 0.0
    layer_sums: dict[str, float] = {}
    model.eval()
    with SynOpsCounter(spiking) as counter:
        for images, labels in batches(split, config.batch_size):
            sinabs.reset_states(spiking)
            spikes = encode(images, config, generator)
            frames = spikes.reshape(-1, *spikes.shape[2:])
            outputs = spiking(frames).reshape(len(labels), steps, -1).sum(dim=1)
            predictions = outputs.argmax(dim=1)
            correct += (predictions == labels).sum().item()
            agree += (predictions == model(images).argmax(dim=1)).sum().item()
            # The counter averages over the batch * steps frames; a sample's SynOps are its
            # frames' sum, so mean per sample = mean per frame * steps.
            total += counter.total.item() * steps * len(labels)
            for name, mean in counter.per_layer.items():
                layer_sums[name] = layer_sums.get(name, 0.0) + mean.item() * steps * len(labels)
            if on_batch is not None:
                on_batch(len(labels))
    n = len(split)
    return SpikingEvaluation(
        settings={k: getattr(config, k) for k in ("encoding", "steps", "spike_fn", "min_v_mem", "seed")},
        samples=n, accuracy=correct / n, ann_accuracy=ann.accuracy, agreement=agree / n,
        synops_mean=total / n, ann_synops_mean=ann.synops_mean,
        synops_per_layer={name: s / n for name, s in layer_sums.items()},
        ann_synops_per_layer=ann.synops_per_layer,
    )


def require_enough_steps(settings: SNNConfig, spikes: dict[int, int]) -> None:
    """Refuse, before any simulation, settings that need a step per input spike (`single`,
    `rate`) with fewer steps than a member's input carries spikes per pixel (`spikes`: trial
    number -> the most spikes one input pixel carries)."""
    short = {n: k for n, k in spikes.items() if settings.needs_step_per_spike() and settings.steps < k}
    if short:
        listed = ", ".join(f"trial {n}: {k}" for n, k in sorted(short.items()))
        raise ConfigError("snn.steps", f"{settings.encoding} input with {settings.spike_fn}-spike "
                          f"neurons needs a step for each spike a pixel carries, at least "
                          f"{max(short.values())} here ({listed} spikes per pixel); "
                          f"got {settings.steps}")


def check_spiking(model: nn.Module, split: Split, config: SNNConfig, label: str,
                  progress: bool) -> SpikingEvaluation | SpikingFailure:
    """`simulate` with a progress bar, or why the network cannot be simulated: its
    `spiking_obstacles`, or the layer where sinabs' conversion or the simulation failed."""
    obstacles = spiking_obstacles(model)
    if obstacles:
        return SpikingFailure("; ".join(obstacles))
    current: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _, __, n=name: current.append(n))
             for name, m in model.named_modules() if name]
    total = min(len(split), config.max_samples) if config.max_samples else len(split)
    try:
        with tqdm(total=total, desc=label, unit="image", disable=not progress, leave=False) as bar:
            return simulate(model, split, config, on_batch=bar.update)
    except (RuntimeError, ValueError, TypeError) as err:
        where = f" (in layer '{current[-1]}')" if current else ""
        return SpikingFailure(f"sinabs could not run it as a spiking network{where}: "
                              f"{type(err).__name__}: {err}")
    finally:
        for hook in hooks:
            hook.remove()


class SpikingConversionError(PipelineError):
    """The network has no spiking equivalent that sinabs or NIR can hold; the message names the
    layer and why."""


def nir_graph_of(model: nn.Module, config: SNNConfig, input_shape: tuple[int, ...]) -> nir.NIRGraph:
    """The spiking network as a NIR graph (`save_nir` writes it; `sinabs.nir.from_nir` rebuilds
    it). Raises `SpikingConversionError` naming the layer when there is none.

    sinabs' export leaves convolutions' input shapes and the flatten's input type empty, which NIR's
    writer refuses; they are filled in from one forward pass. NIR's IF neuron carries neither the
    lower bound of the membrane nor multi-spike output: sinabs' import rebuilds both as -1 and
    multi-spike, our default."""
    obstacles = spiking_obstacles(model)
    if obstacles:
        raise SpikingConversionError("; ".join(obstacles))
    spiking = to_spiking(model, config)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [module.register_forward_pre_hook(
        lambda _, inputs, name=name: shapes.__setitem__(name, tuple(inputs[0].shape[1:])))
        for name, module in spiking.named_modules() if name]
    sample = torch.zeros(config.steps, *input_shape)
    with torch.no_grad():
        spiking(sample)
    for hook in hooks:
        hook.remove()
    sinabs.reset_states(spiking)
    try:
        with warnings.catch_warnings():  # nirtorch deprecates the calls sinabs 3.1.3 makes inside
            warnings.simplefilter("ignore", DeprecationWarning)
            graph = sinabs.nir.to_nir(spiking, sample)
    except Exception as err:  # noqa: BLE001 - nirtorch's tracing fails in many ways on a graph
        raise SpikingConversionError(f"sinabs' NIR export cannot trace this network (NIR holds "
                                     f"chains and graphs of its own node types): "
                                     f"{type(err).__name__}: {err}") from err
    for name, node in graph.nodes.items():
        missing_conv = isinstance(node, nir.Conv2d) and node.input_shape is None
        missing_flatten = isinstance(node, nir.Flatten) and (node.input_type or {}).get("input") is None
        if (missing_conv or missing_flatten) and name not in shapes:
            raise SpikingConversionError(f"NIR node '{name}' matches no layer of the network, so "
                                         "its input shape is unknown")
        if missing_conv:
            node.input_shape = shapes[name][1:]
        if missing_flatten:
            node.input_type = {"input": np.array(shapes[name])}
    return graph


def save_nir(graph: nir.NIRGraph, path: Path) -> None:
    """Write a graph of `nir_graph_of` (`nir.read` reads it back)."""
    nir.write(str(path), graph)


def read_nir(path: Path, steps: int) -> nn.Module:
    """A spiking network rebuilt by sinabs from a NIR file; it returns (output, state)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return sinabs.nir.from_nir(nir.read(str(path)), num_timesteps=steps)
