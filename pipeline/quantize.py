"""Quantisation for a DynapCNN-class chip, and what it costs, measured on data.

Why the threshold is the scale. Our float networks fire one spike per unit of potential
(`NeuromorphicReLU` = floor(relu(x)): threshold 1). A chip core adds integer weights w_q to a 16-bit
membrane and fires at an integer threshold θ, so with integer spike counts x arriving at once it
emits floor(relu(w_q·x + b_q) / θ) = floor(relu((w_q/θ)·x + b_q/θ)) spikes (subtractive reset,
several spikes allowed): the float layer with weights w_q / θ. Quantising each layer to
w_q = round(w·θ) with one integer θ per layer therefore keeps the float network's spike counts up to
weight rounding (at most 0.5/θ per weight), with θ both the weight scale and the threshold. θ is the
largest integer that keeps every |w_q| within the 8-bit range, so the largest weight uses it; it is
never chosen from the membrane range, which is how sinabs' `discretize.py` can round a whole layer to
zero (there the scale is capped by the thresholds' 16-bit range, 1 when `min_v_mem` is None).

The output layer has no spiking activation after it; its w_q/θ keeps the argmax of its potentials.

`QuantizedNetwork.model` holds weights w_q / θ, so `pipeline.evaluate.evaluate` and
`pipeline.snn.simulate` run the chip's arithmetic unchanged (exact except where w_q·x is an exact
multiple of θ, where float32 rounding of w_q / θ can cost one spike).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.chip import WEIGHT_LAYERS, MappingProblem
from pipeline.chip_profiles import ChipProfile
from pipeline.data import EVAL_BATCH_SIZE, Split, batches
from pipeline.layers import NeuromorphicReLU
from pipeline.synops import COUNTED_LAYERS, fan_out_map

# NeuroBench's default activation modules (`neurobench/blocks/activation.py`) and our spiking one,
# as NeuroBench's `add_activation_module` would add it.
ACTIVATION_LAYERS: tuple[type[nn.Module], ...] = (NeuromorphicReLU, nn.ReLU, nn.Sigmoid)


@dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """One weight layer on the chip: integer weights and bias in the chip's signed weight range, and
    its integer threshold θ, which is also its scale (w_q = round(w·θ)). `problems` says when the
    layer cannot keep its spike counts: all weights zero, weights clipped, θ outside the membrane
    range, weights above θ."""

    name: str
    threshold: int
    weight: torch.Tensor  # int16 holding the chip's weight_bits-bit values
    bias: torch.Tensor | None
    levels_used: int  # the largest |w_q|: 127 when the layer uses the whole 8-bit range
    zero_weights: int  # weights that quantise to 0
    weights_over_threshold: int
    problems: tuple[MappingProblem, ...]


@dataclass(frozen=True, eq=False)
class QuantizedNetwork:
    """A copy of a network quantised for `chip`: `model` holds weights w_q / θ (what the float
    evaluator and the spiking simulator run), `layers` the chip's integers."""

    model: nn.Module
    layers: tuple[QuantizedLayer, ...]
    chip: ChipProfile
    unquantized: tuple[MappingProblem, ...] = ()  # modules left in float the chip would not run so

    @property
    def problems(self) -> tuple[MappingProblem, ...]:
        """Every layer's quantisation problems, and modules left in float."""
        return self.unquantized + tuple(p for layer in self.layers for p in layer.problems)


def _threshold(peak: float, chip: ChipProfile) -> tuple[int, bool]:
    """The largest integer θ with round(peak·θ) <= the chip's largest weight, within 1 .. the
    membrane's maximum, and whether it had to be clamped there."""
    if peak == 0:
        return 1, False
    ideal = math.ceil((chip.weight_max + 0.5) / peak) - 1
    threshold = min(max(ideal, 1), chip.membrane_max)
    return threshold, threshold != ideal


def _quantized_layer(name: str, layer: nn.Module, chip: ChipProfile) -> QuantizedLayer:
    """Quantise `layer` in place to w_q / θ and return the chip's integers for it."""
    weight, bias = layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None
    peak = max(weight.abs().max().item(), bias.abs().max().item() if bias is not None else 0.0)
    threshold, clamped = _threshold(peak, chip)

    def integers(values: torch.Tensor) -> torch.Tensor:
        return torch.round(values * threshold).clamp(-chip.weight_max, chip.weight_max)

    weight_q = integers(weight)
    bias_q = integers(bias) if bias is not None else None
    with torch.no_grad():
        layer.weight.copy_(weight_q / threshold)
        if bias_q is not None:
            layer.bias.copy_(bias_q / threshold)
    levels = int(weight_q.abs().max().item())
    over = int((weight_q.abs() > threshold).sum().item())
    where = f"layer '{name}' ({type(layer).__name__})"
    checks = [
        (levels == 0, "all-zero", f"{where}: every weight quantises to 0 (largest |w| {peak:.3g}); the "
         "layer would never fire: retrain it or check its weights"),
        (clamped and threshold == 1, "weight-clipped", f"{where}: weights up to {peak:.3g} spikes per "
         f"input spike exceed {chip.weight_max} at threshold 1 and are clipped: keep |w| below "
         f"{chip.weight_max}"),
        (clamped and threshold == chip.membrane_max, "threshold-range", f"{where}: its weights (largest "
         f"{peak:.3g}) would need a threshold above the {chip.membrane_bits}-bit membrane's "
         f"{chip.membrane_max}; capped, the weights use {levels} of {chip.weight_max} levels"),
        (over > 0, "weight-over-threshold", f"{where}: {over} weights exceed the threshold {threshold}; "
         "the chip fires at most once per input event, so one input spike cannot make the several "
         "spikes the float layer counts (sinabs docs: keep weights below the threshold)"),
    ]
    return QuantizedLayer(
        name=name, threshold=threshold, weight=weight_q.to(torch.int16),
        bias=bias_q.to(torch.int16) if bias_q is not None else None, levels_used=levels,
        zero_weights=int((weight_q == 0).sum().item()), weights_over_threshold=over,
        problems=tuple(MappingProblem(name, rule, reason) for failed, rule, reason in checks if failed))


def quantize_for_chip(model: nn.Module, chip: ChipProfile) -> QuantizedNetwork:
    """A copy of `model` whose Conv2d and Linear layers hold the chip's integer weights, one integer
    threshold θ per layer (also the scale), as described in this module's docstring.

    Average pooling is not rescaled here: sinabs turns nn.AvgPool2d into sum pooling and divides the
    next layer's weights by the window size, so quantise networks with SumPool2d. Batch norm is not
    folded either (reported as a problem). Problems (a layer all zero, clipped, or with a threshold
    beyond the membrane) are data in the records; nothing is raised for them.
    """
    quantized = copy.deepcopy(model)
    layers = tuple(_quantized_layer(name, module, chip) for name, module in quantized.named_modules()
                   if isinstance(module, WEIGHT_LAYERS))
    unfolded = tuple(MappingProblem(name, "batch-norm-unfolded", (
        f"layer '{name}' ({type(module).__name__}) stays in float here: the chip folds it into the layer "
        "before it, so the 8-bit numbers describe a network the chip does not run; fold it first"))
        for name, module in quantized.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm))
    return QuantizedNetwork(quantized, layers, chip, unfolded)


def _hooked_passes(model: nn.Module, split: Split, batch_size: int,
                   hooks: dict[nn.Module, Callable]) -> None:
    """Run `model` over `split` in eval mode with `hooks` (module -> forward hook) registered."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    model.eval()
    try:
        with torch.no_grad():
            for images, _ in batches(split, batch_size):
                model(images)
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class MembraneRange:
    """The membrane values one layer reaches on a split, in the chip's units, when each sample's
    whole input arrives at once (v = w_q·x + b_q; on the chip, spikes subtract θ as input arrives,
    so this is the most a neuron must hold before it fires), and how many fall outside the chip's
    signed membrane range."""

    layer: str
    values: int
    overflows: int
    peak: int  # largest |v|


def membrane_ranges(quantized: QuantizedNetwork, split: Split, batch_size: int = EVAL_BATCH_SIZE
                    ) -> tuple[MembraneRange, ...]:
    """Each quantised layer's membrane values on `split` (see `MembraneRange`), from one pass of
    `quantized.model`: its outputs times θ. Values beyond the membrane are counted, not raised."""
    modules = dict(quantized.model.named_modules())
    seen = {layer.name: [0, 0, 0] for layer in quantized.layers}  # values, overflows, peak
    chip = quantized.chip

    def count(layer: QuantizedLayer) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            membrane = torch.round(output * layer.threshold)
            tally = seen[layer.name]
            tally[0] += membrane.numel()
            tally[1] += int(((membrane > chip.membrane_max) | (membrane < chip.membrane_min)).sum().item())
            tally[2] = max(tally[2], int(membrane.abs().max().item()) if membrane.numel() else 0)
        return hook

    _hooked_passes(quantized.model, split, batch_size,
                   {modules[layer.name]: count(layer) for layer in quantized.layers})
    return tuple(MembraneRange(name, *tally) for name, tally in seen.items())


@dataclass(frozen=True)
class NeuroBenchMetrics:
    """NeuroBench's workload metrics, computed by us on the network as the ANN evaluator runs it
    (each sample's spike counts at once), per sample:

    - `effective_macs` and `effective_acs` (NeuroBench `SynapticOperations`): for each Conv/Linear
      input, the number of connections whose input and weight are both nonzero (inputs and weights
      binarised, bias ignored). They are ACs when every input value is 0, 1 or -1 (binary spikes),
      MACs otherwise. NeuroBench decides per forward call (per batch); we decide per sample, as
      NeuroBench does at batch size 1. Integer spike counts above 1 therefore make MACs.
    - `dense_synops` (NeuroBench's "Dense"): every connection, whatever the input and weight.
    - `activation_sparsity` (NeuroBench `ActivationSparsity`): zeros over all values leaving the
      activation modules (`ACTIVATION_LAYERS`), over all layers and samples.
    """

    effective_macs: float
    effective_acs: float
    dense_synops: float
    activation_sparsity: float


def _binary_copy(layer: nn.Module) -> nn.Module:
    """A copy of `layer` whose weights are 1 where nonzero and whose bias is 0 (NeuroBench's
    `make_binary_copy` with the bias suppressed)."""
    binary = copy.deepcopy(layer)
    with torch.no_grad():
        binary.weight.copy_((binary.weight != 0).to(binary.weight.dtype))
        if binary.bias is not None:
            binary.bias.zero_()
    return binary


def neurobench_metrics(model: nn.Module, split: Split,
                       batch_size: int = EVAL_BATCH_SIZE) -> NeuroBenchMetrics:
    """NeuroBench's synaptic operations and activation sparsity of `model` on `split` (definitions in
    `NeuroBenchMetrics`). Hand-written: the `neurobench` package pulls torchaudio, snntorch, tonic
    and numba, too much for three counts. Raises ValueError on an empty split."""
    if not len(split):
        raise ValueError("cannot measure NeuroBench metrics on an empty split")
    ops = {"macs": 0.0, "acs": 0.0, "dense": 0.0, "zeros": 0, "activations": 0}
    dense_by_shape: dict[tuple, float] = {}
    hooks: dict[nn.Module, Callable] = {}
    for module in model.modules():
        if isinstance(module, COUNTED_LAYERS):
            binary = _binary_copy(module)  # made before any hook is registered, so it carries none

            def count_ops(module: nn.Module, args: tuple, output: torch.Tensor, binary=binary) -> None:
                x = args[0]
                effective = binary((x != 0).to(x.dtype)).flatten(1).sum(1)
                spiking = ((x == 0) | (x == 1) | (x == -1)).flatten(1).all(1)
                ops["acs"] += effective[spiking].sum().item()
                ops["macs"] += effective[~spiking].sum().item()
                key = (id(binary), tuple(x.shape[1:]))
                if key not in dense_by_shape:
                    dense_by_shape[key] = fan_out_map(binary, x.shape[1:]).sum().item()
                ops["dense"] += dense_by_shape[key] * len(x)

            hooks[module] = count_ops
        elif isinstance(module, ACTIVATION_LAYERS):

            def count_zeros(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                ops["zeros"] += int((output == 0).sum().item())
                ops["activations"] += output.numel()

            hooks[module] = count_zeros
    _hooked_passes(model, split, batch_size, hooks)
    n = len(split)
    return NeuroBenchMetrics(
        effective_macs=ops["macs"] / n, effective_acs=ops["acs"] / n, dense_synops=ops["dense"] / n,
        activation_sparsity=ops["zeros"] / ops["activations"] if ops["activations"] else 0.0)


def float_footprint_bytes(model: nn.Module) -> int:
    """NeuroBench's `Footprint` of the float network: every parameter and buffer at its own width
    (4 bytes for float32)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def chip_footprint_bytes(quantized: QuantizedNetwork) -> int:
    """The quantised network's parameters at the chip's widths: weights and biases at
    `weight_bits` (8; sinabs discretises biases to the weights' width) and one threshold per layer
    at `membrane_bits` (16). Neuron states are not counted (as in NeuroBench's footprint); their
    memory is `pipeline.chip.neuron_memory`."""
    chip = quantized.chip
    weights = sum(layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
                  for layer in quantized.layers)
    return math.ceil(weights * chip.weight_bits / 8) + len(quantized.layers) * chip.membrane_bits // 8
