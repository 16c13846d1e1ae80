"""Deployment check for Speck-class (DynapCNN) neuromorphic processors, on the CPU.

Two questions, answered as data and never as exceptions: does the network have the layer pattern a
DynapCNN core runs (`chip_layers`, chip-independent), and do its layers meet one chip's numbers and
fit its cores' memories, one layer per core (`map_to_chip`)? Each chip's numbers are one
`ChipProfile` in `CHIPS`.

Sources, read rather than imported (`sinabs.backend.dynapcnn` imports the vendor's `samna`, which
does not install here):
- sinabs 3.1.3 `backend/dynapcnn`: `chips/dynapcnn.py` `get_constraints` (per-core memory, shared
  by Speck 2e and 2f), `dynapcnn_layer.py` `memory_summary` (the memory formulas, with sides rounded
  up to powers of two) and `convert_linear_to_conv` (a Linear runs as a convolution whose kernel is
  its whole input), `mapping.py` `get_valid_mapping` (layers to distinct cores as a bipartite
  matching), `discretize.py` (8-bit weights and biases, 16-bit neuron state),
  `connectivity_specs.py` (weight -> neuron -> pooling; only `sinabs.layers.Merge` may take two
  inputs, only neuron and pooling layers may feed two cores), `dynapcnn_layer_utils.py` (pooling
  stride equals its kernel; average pooling becomes sum pooling).
- sinabs docs `docs/speck/overview.md` and `docs/speck/faqs/available_network_arch.md`: kernel up to
  16x16, strides 1, 2, 4, 8, padding 0..7, sum pooling 1, 2, 4, input up to 128x128, output up to
  64x64, up to 1024 channels, two destinations per core.

Graphs: sinabs 3.1.x's `DynapcnnNetwork` extracts the module graph with nirtorch, which sees no
computation outside modules; it maps a branch from a spiking or pooling layer to at most two cores
and a join through `sinabs.layers.Merge`. This check maps chains only: it reports every branch and
join as a problem, pointing at sinabs' `DynapcnnNetwork` for graphs.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.chip_profiles import CHIPS, ChipProfile, CoreMemory
from pipeline.layers import NeuromorphicReLU, SumPool2d

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)
SPIKING_LAYERS: tuple[type[nn.Module], ...] = (NeuromorphicReLU,)
POOLING_LAYERS: tuple[type[nn.Module], ...] = (SumPool2d, nn.AvgPool2d)
MAX_POOLING_LAYERS: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                                                   nn.AdaptiveMaxPool2d)
BATCH_NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules sinabs drops from the graph (its `COMPLETELY_IGNORED_LAYER_TYPES`), and Flatten, which
# only reshapes what a Linear layer reads.
PASS_THROUGH_LAYERS: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten)
TORCH_ACTIVATIONS_MODULE = nn.modules.activation.__name__  # nn.ReLU, nn.Sigmoid, ... live here

def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length()


def _require_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def kernel_memory(c: int, kx: int, ky: int, f: int) -> int:
    """Kernel-memory entries of a layer with `c` input channels, a `kx` x `ky` kernel and `f` output
    channels: c · 2^(⌈log2(kx·ky)⌉ + ⌈log2 f⌉), as sinabs' `DynapcnnLayer.memory_summary` computes
    it (the chip addresses kernels and output channels in powers of two). Raises ValueError for a
    size below 1."""
    _require_positive(c=c, kx=kx, ky=ky, f=f)
    return c * 2 ** (_ceil_log2(kx * ky) + _ceil_log2(f))


def neuron_memory(f: int, fx: int, fy: int) -> int:
    """Neuron-memory entries of a layer with `f` output channels of `fx` x `fy` neurons:
    f · 2^(⌈log2 fy⌉ + ⌈log2 fx⌉), each side rounded up to a power of two on its own (sinabs'
    `memory_summary`; its docs print f · fx · fy, which the mapping does not use). Raises ValueError
    for a size below 1."""
    _require_positive(f=f, fx=fx, fy=fy)
    return f * 2 ** (_ceil_log2(fy) + _ceil_log2(fx))


@dataclass(frozen=True)
class MappingProblem:
    """Why (part of) a network does not map to a chip: the layer (its qualified name, or "" for
    the whole network), a short rule name, and a sentence with the fix."""

    layer: str
    rule: str
    reason: str


@dataclass(frozen=True)
class ChipLayer:
    """One weight layer as a DynapCNN core would run it: conv (a Linear as a conv over its whole
    input), integrate-and-fire neurons, then pooling. Sizes are (height, width)."""

    name: str
    module_type: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    input_size: tuple[int, int]
    output_size: tuple[int, int]  # of the neurons, before pooling
    pooling: int  # product of the pooling windows after the neurons; 1 for none
    has_bias: bool  # its own bias or one folded in from batch norm
    spiking: bool  # followed by a spiking activation (False for an output layer)
    problems: tuple[MappingProblem, ...] = ()

    @property
    def kernel_memory(self) -> int:
        """Kernel-memory entries this layer needs on a core."""
        return kernel_memory(self.in_channels, self.kernel[1], self.kernel[0], self.out_channels)

    @property
    def neuron_memory(self) -> int:
        """Neuron-memory entries this layer needs on a core."""
        return neuron_memory(self.out_channels, self.output_size[1], self.output_size[0])

    @property
    def bias_memory(self) -> int:
        """Bias entries: one per output channel when the layer has a bias."""
        return self.out_channels if self.has_bias else 0


@dataclass
class _ModuleCall:
    """One call of a leaf module in the traced forward pass."""

    name: str
    module: nn.Module
    inputs: list[torch.Tensor]
    output: torch.Tensor | None


@dataclass
class _LayerDraft:
    """A `ChipLayer` while the walk is still finding what follows the weight layer."""

    layer: ChipLayer
    stage: str = "weight"  # weight -> spiking -> pooled
    pooling: int = 1
    has_bias: bool = False
    problems: list[MappingProblem] = field(default_factory=list)

    def freeze(self) -> ChipLayer:
        return dataclasses.replace(self.layer, pooling=self.pooling, has_bias=self.has_bias,
                                   spiking=self.stage in ("spiking", "pooled"), problems=tuple(self.problems))


def _trace(model: nn.Module, input_shape: tuple[int, int, int]
           ) -> tuple[list[_ModuleCall], torch.Tensor, object]:
    """Every leaf-module call of one forward pass of a zero sample through a copy of `model` (in eval
    mode, so batch norm accepts one sample), with the sample and the network's output."""
    traced = copy.deepcopy(model).eval()
    calls: list[_ModuleCall] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            calls.append(_ModuleCall(name, module, tensors, output if isinstance(output, torch.Tensor)
                                     else None))
        return hook

    for name, module in traced.named_modules():
        if name and not any(True for _ in module.children()):
            module.register_forward_hook(record(name))
    parameter = next(traced.parameters(), torch.zeros(()))
    sample = torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        output = traced(sample)
    # The calls keep every tensor alive, so no id is reused while the walk reads them.
    return calls, sample, output


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _described(call: _ModuleCall) -> str:
    return f"layer '{call.name}' ({type(call.module).__name__})"


class _ChainWalk:
    """Reads the traced calls in order and builds one `_LayerDraft` per weight-layer call.

    Each tensor is attributed to the call that produced it, so every module knows which weight
    layer's output it processes, whatever the module tree looks like. (Hand-written: sinabs' graph
    extraction is part of the samna-dependent backend.)
    """

    def __init__(self, sample_id: int) -> None:
        self.drafts: list[_LayerDraft] = []
        self.producer: dict[int, int] = {sample_id: -1}  # tensor id -> call index; -1: the input
        self.owner: dict[int, int | None] = {-1: None}  # call index -> draft index
        self.unflattened: dict[int, tuple[int, ...]] = {}  # call index -> (C, H, W) before Flatten
        self.consumers: dict[int, list[str]] = {}  # call index -> names of the calls reading it
        self.unplaced: list[MappingProblem] = []  # problems found before any weight layer

    def problem(self, owner: int | None, call: _ModuleCall, rule: str, reason: str) -> None:
        target = self.drafts[owner].problems if owner is not None else self.unplaced
        target.append(MappingProblem(call.name, rule, f"{_described(call)}: {reason}"))

    def latest(self) -> int | None:
        """The last weight layer seen: the owner of a tensor the walk cannot attribute."""
        return len(self.drafts) - 1 if self.drafts else None

    def visit(self, index: int, call: _ModuleCall) -> None:
        sources = [self.producer.get(id(t)) for t in call.inputs]
        known = [s for s in sources if s is not None]
        owner = self.owner[known[0]] if known else self.latest()
        self._check_graph(call, sources, owner)
        module = call.module
        if isinstance(module, WEIGHT_LAYERS):
            owner = self._weight_layer(call, known[0] if known else -1, owner)
        elif isinstance(module, SPIKING_LAYERS):
            self._spiking(call, owner)
        elif isinstance(module, POOLING_LAYERS):
            self._pooling(call, owner)
        elif isinstance(module, BATCH_NORM_LAYERS):
            self._batch_norm(call, owner)
        elif isinstance(module, MAX_POOLING_LAYERS):
            self.problem(owner, call, "max-pooling", "max pooling does not map to the chip; use SumPool2d")
        elif type(module).__module__ == TORCH_ACTIVATIONS_MODULE:
            self.problem(owner, call, "activation", "an unconverted activation does not map: the chip's "
                         "neurons are integrate-and-fire; use NeuromorphicReLU")
        elif not isinstance(module, PASS_THROUGH_LAYERS):
            self.problem(owner, call, "unsupported-module", "a DynapCNN core runs Conv2d or Linear, "
                         "integrate-and-fire neurons, sum or average pooling and Flatten; remove or "
                         "replace this module")
        if isinstance(module, nn.Flatten) and call.inputs and call.inputs[0].dim() == 4:
            self.unflattened[index] = tuple(call.inputs[0].shape[1:])
        elif known and known[0] in self.unflattened and isinstance(module, PASS_THROUGH_LAYERS):
            self.unflattened[index] = self.unflattened[known[0]]
        self.owner[index] = owner
        if call.output is not None:
            self.producer[id(call.output)] = index

    def finish(self, output: object) -> None:
        """Check that the network returns a module's output, not one computed in its forward()."""
        if isinstance(output, torch.Tensor) and id(output) not in self.producer and self.drafts:
            draft = self.drafts[-1]
            draft.problems.append(MappingProblem("", "outside-module", (
                "the network's output is computed outside any module (in a forward()); the chip maps "
                "modules only: end the network with a module")))

    def _check_graph(self, call: _ModuleCall, sources: list[int | None], owner: int | None) -> None:
        if None in sources:
            self.problem(owner, call, "outside-module", "it reads a tensor computed outside any module "
                         "(an add, a reshape or a functional call in a forward()), which the chip cannot "
                         "run; use modules (nn.Flatten, NeuromorphicReLU, SumPool2d)")
        if len(call.inputs) > 1:
            self.problem(owner, call, "join", f"it joins {len(call.inputs)} tensors (a residual or "
                         "skip connection); DynapCNN joins branches only through sinabs.layers.Merge "
                         "(sinabs >= 3.1 DynapcnnNetwork), which this chain check does not map: verify "
                         "the graph with sinabs")
        for source in {s for s in sources if s is not None}:
            readers = self.consumers.setdefault(source, [])
            readers.append(call.name)
            if len(readers) == 2:
                self.problem(owner, call, "branch", f"it reads an output that '{readers[0]}' also reads; "
                             "DynapCNN sends a spiking or pooling layer's output to at most two cores "
                             "(sinabs >= 3.1 DynapcnnNetwork), which this chain check does not map: "
                             "verify the graph with sinabs")

    def _weight_layer(self, call: _ModuleCall, source: int, previous: int | None) -> int:
        if previous is not None and self.drafts[previous].stage not in ("spiking", "pooled"):
            feeding = self.drafts[previous]
            feeding.problems.append(MappingProblem(
                feeding.layer.name, "missing-activation",
                f"layer '{feeding.layer.name}' ({feeding.layer.module_type}) feeds '{call.name}' without "
                "a spiking activation between them; each core runs conv -> integrate-and-fire -> "
                "pooling: add a NeuromorphicReLU"))
        module, x, y = call.module, call.inputs[0], call.output
        draft = _LayerDraft(self._geometry(call, source), has_bias=module.bias is not None,
                            problems=self.unplaced)
        self.unplaced = []
        if isinstance(module, nn.Conv2d):
            self._conv_problems(draft, call)
        elif x.dim() != 2 or y is None or y.dim() != 2:
            self.drafts.append(draft)
            self.problem(len(self.drafts) - 1, call, "linear-input",
                         f"a Linear layer on a {x.dim()}-D tensor does not map; flatten its input first")
            return len(self.drafts) - 1
        if draft.layer.kernel[0] != draft.layer.kernel[1]:
            kind = "kernel" if isinstance(module, nn.Conv2d) else "flattened input (its kernel on the chip)"
            draft.problems.append(MappingProblem(call.name, "kernel-shape", (
                f"{_described(call)}: its {kind} is {draft.layer.kernel[0]}x{draft.layer.kernel[1]}; "
                "DynapCNN kernels are square")))
        self.drafts.append(draft)
        return len(self.drafts) - 1

    def _geometry(self, call: _ModuleCall, source: int) -> ChipLayer:
        module, x, y = call.module, call.inputs[0], call.output
        common = {"name": call.name, "module_type": type(module).__name__, "pooling": 1,
                  "has_bias": module.bias is not None, "spiking": False}
        if isinstance(module, nn.Conv2d):
            kernel = _pair(module.kernel_size)
            padding = ((0, 0) if module.padding == "valid" else
                       tuple((k - 1) // 2 for k in kernel) if module.padding == "same" else
                       _pair(module.padding))
            return ChipLayer(in_channels=module.in_channels, out_channels=module.out_channels,
                             kernel=kernel, stride=_pair(module.stride), padding=padding,
                             input_size=(x.shape[-2], x.shape[-1]), output_size=(y.shape[-2], y.shape[-1]),
                             **common)
        # sinabs' convert_linear_to_conv: a Linear is a conv whose kernel covers its whole input,
        # (C, H, W) as it was before Flatten, or (features, 1, 1).
        channels, height, width = self.unflattened.get(source, (module.in_features, 1, 1))
        if channels * height * width != module.in_features:
            channels, height, width = module.in_features, 1, 1
        return ChipLayer(in_channels=channels, out_channels=module.out_features, kernel=(height, width),
                         stride=(1, 1), padding=(0, 0), input_size=(height, width), output_size=(1, 1),
                         **common)

    def _conv_problems(self, draft: _LayerDraft, call: _ModuleCall) -> None:
        conv: nn.Conv2d = call.module
        checks = [
            (_pair(conv.dilation) != (1, 1), "dilation", "dilated kernels do not map; use dilation 1"),
            (conv.groups != 1, "groups", "grouped (depthwise) convolutions do not map; use groups=1"),
            (conv.padding_mode != "zeros", "padding-mode",
             "only zero padding maps; use padding_mode='zeros'"),
            (conv.padding == "same" and any(k % 2 == 0 for k in _pair(conv.kernel_size)), "padding",
             "padding='same' with an even kernel pads one side more; the chip pads both sides equally"),
        ]
        draft.problems += [MappingProblem(call.name, rule, f"{_described(call)}: {reason}")
                           for failed, rule, reason in checks if failed]

    def _spiking(self, call: _ModuleCall, owner: int | None) -> None:
        if owner is None:
            self.problem(owner, call, "missing-weight-layer", "a spiking layer needs a Conv2d or Linear "
                         "layer before it; each core runs conv -> integrate-and-fire -> pooling")
        elif self.drafts[owner].stage != "weight":
            self.problem(owner, call, "double-activation", "a second spiking activation after "
                         f"'{self.drafts[owner].layer.name}' needs its own weight layer; remove it")
        else:
            self.drafts[owner].stage = "spiking"

    def _pooling(self, call: _ModuleCall, owner: int | None) -> None:
        window, stride = _pair(call.module.kernel_size), _pair(call.module.stride or call.module.kernel_size)
        if owner is None:
            self.problem(owner, call, "pooling-order", "pooling the raw input runs on the DVS "
                         "pre-processing layer, which this check does not map; pool inside the network")
            return
        draft = self.drafts[owner]
        if draft.stage == "weight":
            self.problem(owner, call, "pooling-order", f"it pools '{draft.layer.name}' before its "
                         "spiking activation; a core pools after its neurons: move it after NeuromorphicReLU")
        if window[0] != window[1] or window != stride:
            self.problem(owner, call, "pooling-shape", f"pooling window {window[0]}x{window[1]} with stride "
                         f"{stride[0]}x{stride[1]}; DynapCNN pools square windows with a stride equal to "
                         "the window")
        draft.pooling *= window[0]
        draft.stage = "pooled" if draft.stage == "spiking" else draft.stage

    def _batch_norm(self, call: _ModuleCall, owner: int | None) -> None:
        if owner is None or self.drafts[owner].stage != "weight":
            self.problem(owner, call, "batchnorm-order", "batch norm folds only into a Conv2d or Linear "
                         "directly before it; move it there")
        else:
            self.drafts[owner].has_bias = True  # folding adds a bias (sinabs' merge_bn)


def chip_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[ChipLayer]:
    """Each Conv2d/Linear call of `model` (any module tree) as a DynapCNN core would run it, with
    the structure problems the chip family cannot run attached to the layer they concern.

    One forward pass of a zero sample of `input_shape` (C, H, W) through a copy of the network,
    with hooks on every leaf module, gives each layer's sizes and what follows it. Problems found
    here hold for every DynapCNN-class chip (max pooling, unconverted activations, modules a core
    lacks, branches and joins, layer order); the chip's numbers are checked by `map_to_chip`.
    Raises ValueError if `input_shape` is not (C, H, W); the model's own errors propagate.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
    calls, sample, output = _trace(model, input_shape)
    walk = _ChainWalk(id(sample))
    for index, call in enumerate(calls):
        walk.visit(index, call)
    walk.finish(output)
    return [draft.freeze() for draft in walk.drafts]


@dataclass(frozen=True)
class LayerPlacement:
    """Where one layer went: its core (None if it could not be placed), what it needs and what
    that core holds (None when unplaced), in entries."""

    layer: str
    core: int | None
    kernel_memory: int
    neuron_memory: int
    bias_memory: int
    kernel_limit: int | None
    neuron_limit: int | None


@dataclass(frozen=True)
class ChipMapping:
    """The answer of `map_to_chip`: every layer's placement and every reason the network does not
    run on the chip (none when it fits)."""

    chip: str
    core_count: int
    placements: tuple[LayerPlacement, ...]
    problems: tuple[MappingProblem, ...]

    @property
    def fits(self) -> bool:
        """Whether the network runs on the chip as it is."""
        return not self.problems

    @property
    def cores_used(self) -> int:
        """Number of cores holding a layer."""
        return sum(p.core is not None for p in self.placements)

    def summary(self) -> str:
        """One line: "fits speck: 4 of 9 cores", or the first reason it does not fit."""
        if self.fits:
            return f"fits {self.chip}: {self.cores_used} of {self.core_count} cores"
        more = len(self.problems) - 1
        return (f"does not fit {self.chip}: {self.problems[0].reason}"
                + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""))


def _rule_problems(layer: ChipLayer, chip: ChipProfile) -> list[MappingProblem]:
    """The chip's per-layer numbers: kernel, stride, padding, pooling, sizes, channels."""
    where = f"layer '{layer.name}' ({layer.module_type})"
    side = max(layer.kernel)
    kernel_fix = ("pool or stride before flattening, so it reads a smaller map"
                  if layer.module_type == "Linear" else "use a smaller kernel")
    checks = [
        (side > chip.max_kernel_side, "kernel-size",
         f"kernel {layer.kernel[0]}x{layer.kernel[1]} exceeds {chip.name}'s "
         f"{chip.max_kernel_side}x{chip.max_kernel_side}; {kernel_fix}"),
        (any(s not in chip.strides for s in layer.stride), "stride",
         f"stride {layer.stride[0]}x{layer.stride[1]} is not among {chip.name}'s strides "
         f"{', '.join(map(str, chip.strides))}"),
        (max(layer.padding) > chip.max_padding, "padding",
         f"padding {max(layer.padding)} exceeds {chip.name}'s {chip.max_padding}"),
        (layer.pooling not in chip.poolings, "pooling",
         f"pooling {layer.pooling} after it is not among {chip.name}'s poolings "
         f"{', '.join(map(str, chip.poolings))}"),
        (max(layer.input_size) > chip.max_input_side, "input-size",
         f"input {layer.input_size[0]}x{layer.input_size[1]} exceeds {chip.name}'s "
         f"{chip.max_input_side}x{chip.max_input_side}; downsample the input"),
        (max(layer.output_size) > chip.max_output_side, "output-size",
         f"output {layer.output_size[0]}x{layer.output_size[1]} exceeds {chip.name}'s "
         f"{chip.max_output_side}x{chip.max_output_side}; use a stride"),
        (max(layer.in_channels, layer.out_channels) > chip.max_channels, "channels",
         f"{max(layer.in_channels, layer.out_channels)} channels exceed {chip.name}'s {chip.max_channels}"),
    ]
    return [MappingProblem(layer.name, rule, f"{where}: {reason}")
            for failed, rule, reason in checks if failed]


def _fits(layer: ChipLayer, core: CoreMemory, chip: ChipProfile) -> bool:
    return (layer.kernel_memory <= core.kernel and layer.neuron_memory <= core.neuron
            and layer.bias_memory <= chip.bias_entries)


def _memory_problem(layer: ChipLayer, chip: ChipProfile) -> MappingProblem:
    """Why `layer` fits none of the chip's cores."""
    where = f"layer '{layer.name}' ({layer.module_type})"
    largest_kernel = max(c.kernel for c in chip.cores)
    largest_neuron = max(c.neuron for c in chip.cores)
    if layer.neuron_memory > largest_neuron:
        return MappingProblem(layer.name, "neuron-memory", (
            f"{where}: needs {layer.neuron_memory} neuron entries ({layer.out_channels} channels x "
            f"{layer.output_size[0]}x{layer.output_size[1]} outputs, sides rounded up to powers of two); "
            f"the largest core of {chip.name} holds {largest_neuron}: use fewer channels or a stride"))
    if layer.kernel_memory > largest_kernel:
        return MappingProblem(layer.name, "kernel-memory", (
            f"{where}: needs {layer.kernel_memory} kernel entries ({layer.in_channels} input channels x "
            f"{layer.kernel[0]}x{layer.kernel[1]} kernel x {layer.out_channels} outputs, rounded up to "
            f"powers of two); the largest core of {chip.name} holds {largest_kernel}: use fewer channels"))
    if layer.bias_memory > chip.bias_entries:
        return MappingProblem(layer.name, "bias-memory", (
            f"{where}: {layer.bias_memory} biases exceed {chip.name}'s {chip.bias_entries} per core; "
            "drop the bias"))
    kernel_cores = [i for i, c in enumerate(chip.cores) if layer.kernel_memory <= c.kernel]
    return MappingProblem(layer.name, "no-core", (
        f"{where}: no core holds both its {layer.kernel_memory} kernel and {layer.neuron_memory} neuron "
        f"entries (cores with enough kernel memory, {', '.join(map(str, kernel_cores))}, hold at most "
        f"{max(chip.cores[i].neuron for i in kernel_cores)} neurons); shrink the layer"))


def _match(candidates: list[list[int]], core_count: int) -> list[int | None]:
    """A maximum matching of layers to distinct cores (Kuhn's augmenting paths), as a core per
    layer or None. Hand-written: sinabs' own matcher (Edmonds-Karp max flow in `mapping.py`) sits
    in the samna-dependent backend, and no declared dependency offers one."""
    layer_on_core: list[int | None] = [None] * core_count

    def place(layer: int, visited: set[int]) -> bool:
        free = [core for core in candidates[layer] if layer_on_core[core] is None]
        if free:  # the lowest free core, so layers take cores in order unless they must move
            layer_on_core[free[0]] = layer
            return True
        for core in candidates[layer]:
            if core not in visited:
                visited.add(core)
                holder = layer_on_core[core]
                if holder is None or place(holder, visited):
                    layer_on_core[core] = layer
                    return True
        return False

    for layer in range(len(candidates)):
        place(layer, set())
    assignment: list[int | None] = [None] * len(candidates)
    for core, layer in enumerate(layer_on_core):
        if layer is not None:
            assignment[layer] = core
    return assignment


def _competing(unplaced: int, candidates: list[list[int]], assignment: list[int | None]
               ) -> tuple[list[int], list[int]]:
    """The layers and cores behind a failed placement (Hall's condition): from an unplaced layer,
    every layer reachable through cores that hold a layer, and those cores. They are one core short."""
    holder = {core: layer for layer, core in enumerate(assignment) if core is not None}
    layers, cores = [unplaced], []
    for layer in layers:
        for core in candidates[layer]:
            if core not in cores:
                cores.append(core)
                if holder[core] not in layers:
                    layers.append(holder[core])
    return sorted(layers), sorted(cores)


def map_to_chip(layers: list[ChipLayer], chip: ChipProfile) -> ChipMapping:
    """Check `layers` (from `chip_layers`) against `chip` and place each on its own core.

    A layer can go on a core whose kernel, neuron and bias memory all hold it; the layers fit when
    each gets a distinct core: a bipartite matching, solved exactly (a greedy first-fit can fail
    where an assignment exists). Every reason it does not fit is a `MappingProblem` in the record:
    the layers' structure problems, the chip's per-layer rules, memory, the core count and, when
    layers compete for too few cores, which layers and cores. Raises nothing for chip limits.
    """
    problems = [p for layer in layers for p in layer.problems]
    if not layers:
        problems.append(MappingProblem("", "no-layers", "the network has no Conv2d or Linear layer to map"))
    for layer in layers:
        problems += _rule_problems(layer, chip)
    candidates = [[i for i, core in enumerate(chip.cores) if _fits(layer, core, chip)] for layer in layers]
    problems += [_memory_problem(layer, chip) for layer, cores in zip(layers, candidates, strict=True)
                 if not cores]
    too_many = len(layers) > len(chip.cores)
    if too_many:
        problems.append(MappingProblem("", "core-count", (
            f"{len(layers)} weight layers but {chip.name} has {len(chip.cores)} cores, one layer each; "
            "merge or remove layers")))
    assignment = _match(candidates, len(chip.cores))
    reported: set[tuple[int, ...]] = set()
    for index, core in enumerate(assignment):
        if core is not None or not candidates[index]:
            continue
        competing, cores = _competing(index, candidates, assignment)
        if tuple(competing) in reported or (too_many and len(cores) == len(chip.cores)):
            continue
        reported.add(tuple(competing))
        names = ", ".join(f"'{layers[i].name}'" for i in competing)
        problems.append(MappingProblem(layers[index].name, "core-assignment", (
            f"layers {names} fit only cores {', '.join(map(str, cores))}: {len(competing)} layers for "
            f"{len(cores)} cores, so no assignment of distinct cores exists; shrink one of them")))
    placements = tuple(
        LayerPlacement(layer.name, core, layer.kernel_memory, layer.neuron_memory, layer.bias_memory,
                       chip.cores[core].kernel if core is not None else None,
                       chip.cores[core].neuron if core is not None else None)
        for layer, core in zip(layers, assignment, strict=True))
    return ChipMapping(chip.name, len(chip.cores), placements, tuple(problems))


def chip_fit(network: nn.Module, input_shape: tuple[int, int, int], chip: str) -> ChipMapping:
    """Where each weight layer of `network` goes on the cores of the chip named `chip` (a key of
    `CHIPS`), or why it cannot: it depends on the network's structure and input shape only, so an
    untrained network answers for every network of its variant."""
    return map_to_chip(chip_layers(network, input_shape), CHIPS[chip])
