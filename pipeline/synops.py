"""Count synaptic operations (SynOps): spikes a weight layer receives times each input's fan-out.

The count follows sinabs 3.1.3's `register_synops_hooks` numerically, but hooks layers at any depth
of the module tree (sinabs only sees the top level of a flat `nn.Sequential`) and also keeps the
per-sample totals that evaluation needs for percentiles.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn
from torch.func import functional_call

COUNTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
REDUCED_PRECISION = (torch.bfloat16, torch.float16)  # spike counts in these are counted in float32
# What decides a layer's fan-out map besides its weight's shape (`nn.Linear` has none of these).
GEOMETRY_ATTRIBUTES = ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding")
_FAN_OUT_MAPS: dict[tuple, torch.Tensor] = {}  # by geometry: computed once per process


def counted_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers whose SynOps are counted, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, COUNTED_LAYERS)]


def fan_out_map(layer: nn.Module, input_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Number of output elements that read each element of one sample's input (shape `input_shape`).

    It is the gradient of the summed output with respect to the input when every weight is one,
    so padding, stride, dilation, groups and padding modes are all accounted for exactly.
    """
    weight = layer.weight
    probe = torch.zeros((1, *input_shape), device=weight.device, requires_grad=True)
    params = {"weight": torch.ones_like(weight, dtype=probe.dtype)}
    if getattr(layer, "bias", None) is not None:
        params["bias"] = torch.zeros_like(layer.bias, dtype=probe.dtype)
    with torch.enable_grad(), torch.autocast(probe.device.type, enabled=False):  # counts are exact
        functional_call(layer, params, (probe,)).sum().backward()
    return probe.grad[0].detach()


def _geometry(layer: nn.Module) -> tuple:
    """What the layer's fan-out map depends on: its type, weight shape and connection pattern."""
    return (type(layer), tuple(layer.weight.shape),
            *(str(getattr(layer, name, None)) for name in GEOMETRY_ATTRIBUTES))


class _MeanFanOutDot(torch.autograd.Function):
    """mean over samples of (input . fan-out), given the per-sample dots already computed.

    Hand-written backward: the gradient is the fan-out map / N for every sample, returned as an
    expanded view instead of a materialised (N, D) outer product. That keeps the penalty's
    backward to one add into the layer input's gradient.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, fan_out: torch.Tensor,  # type: ignore[override]
                per_sample: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(fan_out)
        ctx.batch, ctx.dtype = flat.shape[0], flat.dtype
        return per_sample.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (fan_out,) = ctx.saved_tensors
        grad_flat = (fan_out * (grad / ctx.batch)).to(ctx.dtype).expand(ctx.batch, -1)
        return grad_flat, None, None


class SynOpsCounter:
    """Context manager that hooks every conv and linear layer of `model` and counts its SynOps.

    After each forward pass inside the context, `total` is the mean SynOps per sample (a 0-d tensor
    that stays in the autograd graph, so it can be penalised in the loss), `per_layer` maps each
    layer's qualified name to its mean, and `per_sample` holds each sample's total.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        modules = dict(model.named_modules())
        self._layers = {name: modules[name] for name in counted_layer_names(model)}
        # Read once: hooks run every forward pass, and a layer's connection pattern is fixed.
        self._geometries = {name: _geometry(layer) for name, layer in self._layers.items()}
        self._per_sample_by_layer: dict[str, torch.Tensor] = {}
        self._mean_by_layer: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._probing = False  # True while fan_out_map runs a layer, so the hook must not count

    def __enter__(self) -> SynOpsCounter:
        self._handles.append(self.model.register_forward_pre_hook(self._reset))
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook_for(name)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self._per_sample_by_layer = {}
        self._mean_by_layer = {}

    def _fan_out(self, name: str, dtype: torch.dtype, device: torch.device,
                 sample_shape: torch.Size, channels_last: bool) -> torch.Tensor:
        """The layer's fan-out map for one sample of `sample_shape`, flattened in the memory order
        of the layer's inputs (channels last or not), in `dtype` on `device`. Maps depend on the
        layer's geometry only, so they are shared by every counter of the process (a network is
        evaluated after every epoch, each time with a new counter)."""
        layer = self._layers[name]
        key = (self._geometries[name], tuple(sample_shape), device, dtype, channels_last)
        if key not in _FAN_OUT_MAPS:
            self._probing = True
            try:
                fan_out = fan_out_map(layer, sample_shape).to(dtype)
            finally:
                self._probing = False
            if channels_last:
                fan_out = fan_out.permute(1, 2, 0)
            _FAN_OUT_MAPS[key] = fan_out.flatten()
        return _FAN_OUT_MAPS[key]

    def _hook_for(self, name: str):
        def count(module: nn.Module, args: tuple) -> None:
            if self._probing:
                return
            x = args[0]
            # Read channels-last inputs in their own memory order: no copy on the hot path.
            channels_last = (
                x.dim() == 4
                and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)
            )
            flat = (x.permute(0, 2, 3, 1) if channels_last else x).reshape(x.shape[0], -1)
            # Under autocast the inputs are bfloat16: counted in float32 all the same, while the
            # penalty's gradient goes to the input in its own dtype (no float32 copy to cast back).
            dtype = torch.float32 if flat.dtype in REDUCED_PRECISION else flat.dtype
            fan_out = self._fan_out(name, dtype, flat.device, x.shape[1:], channels_last)
            with torch.autocast(flat.device.type, enabled=False):  # CUDA autocast would take mv
                per_sample = torch.mv(flat.detach().to(dtype), fan_out)
            mean = _MeanFanOutDot.apply(flat, fan_out, per_sample) if x.requires_grad else per_sample.mean()
            if name in self._mean_by_layer:  # a layer called twice in one forward pass
                per_sample = per_sample + self._per_sample_by_layer[name]
                mean = mean + self._mean_by_layer[name]
            self._per_sample_by_layer[name] = per_sample
            self._mean_by_layer[name] = mean

        return count

    def _require_forward(self) -> None:
        if not self._mean_by_layer:
            raise RuntimeError("no forward pass has run inside the SynOpsCounter context")

    @property
    def per_layer(self) -> dict[str, torch.Tensor]:
        """Mean SynOps per sample of each counted layer in the last forward pass, by qualified
        name: differentiable 0-d tensors."""
        return dict(self._mean_by_layer)

    @property
    def per_sample(self) -> torch.Tensor:
        """Total SynOps of each sample in the last forward pass, shape (batch,), for statistics
        (not part of the autograd graph)."""
        self._require_forward()
        return torch.stack(list(self._per_sample_by_layer.values())).sum(0)

    @property
    def total(self) -> torch.Tensor:
        """Mean SynOps per sample in the last forward pass: a differentiable 0-d tensor."""
        self._require_forward()
        return torch.stack(list(self._mean_by_layer.values())).sum()
