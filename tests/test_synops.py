"""The SynOps counter against sinabs 3.1.3 (the reference implementation) and on nested models."""

from __future__ import annotations

import copy

import pytest
import torch
from sinabs.hooks import register_synops_hooks
from torch import nn

from pipeline import synops
from pipeline.config import ModelConfig
from pipeline.layers import NeuromorphicReLU, SumPool2d
from pipeline.model import build_model
from pipeline.synops import SynOpsCounter, fan_out_map


def spikes(*shape: int) -> torch.Tensor:
    return torch.randint(0, 4, shape).float()


FLAT_MODELS = {
    "padding_stride": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), NeuromorphicReLU(),
            nn.Conv2d(4, 6, 3, padding=2), NeuromorphicReLU(),
            nn.Flatten(), nn.Linear(6 * 10 * 10, 5),
        ),
        (3, 2, 16, 16),
    ),
    "dilation_groups": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 8, 3, dilation=2, groups=2), NeuromorphicReLU(),
            nn.Conv2d(8, 8, (3, 2), stride=(2, 1), groups=4, padding=(1, 0)), NeuromorphicReLU(),
            nn.Flatten(), nn.Linear(8 * 6 * 11, 7), NeuromorphicReLU(), nn.Linear(7, 3),
        ),
        (5, 4, 16, 16),
    ),
    "stride_skips_rows": (
        lambda: nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), NeuromorphicReLU(), nn.Conv2d(3, 2, 2)),
        (2, 1, 6, 6),
    ),
    "tutorial_net": (lambda: build_model(ModelConfig(), (1, 28, 28), 10), (4, 1, 28, 28)),
}


@pytest.mark.parametrize("name", FLAT_MODELS)
def test_matches_sinabs_on_flat_sequential(name: str) -> None:
    make, shape = FLAT_MODELS[name]
    torch.manual_seed(0)
    model = make()
    x = spikes(*shape) * 30
    reference = make()
    reference.load_state_dict(model.state_dict())
    register_synops_hooks(reference)
    reference(x)
    expected = reference.hook_data["synops_per_timestep"]

    with SynOpsCounter(model) as counter:
        model(x)
    assert set(counter.per_layer) == {str(i) for i in expected}
    for index, value in expected.items():
        torch.testing.assert_close(counter.per_layer[str(index)], value.float(), rtol=1e-6, atol=0)
    total = reference.hook_data["total_synops_per_timestep"]
    torch.testing.assert_close(counter.total, total.float(), rtol=1e-6, atol=0)


def test_fan_out_of_a_strided_conv_matches_the_documented_example() -> None:
    fan_out = fan_out_map(nn.Conv2d(1, 1, 3, stride=2), (1, 6, 6))
    assert fan_out[0, 0].tolist() == [1, 1, 2, 1, 1, 0]
    assert fan_out[0, :, 0].tolist() == [1, 1, 2, 1, 1, 0]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = NeuromorphicReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def test_counts_layers_at_any_depth_like_the_flattened_model() -> None:
    torch.manual_seed(0)
    nested = nn.Sequential(Block(), nn.Sequential(SumPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)))
    twin = copy.deepcopy(nested)
    flat = nn.Sequential(twin[0].conv, twin[0].act, *twin[1])
    x = spikes(3, 1, 8, 8)
    with SynOpsCounter(nested) as deep, SynOpsCounter(flat) as shallow:
        nested(x)
        flat(x)
    assert list(deep.per_layer) == ["0.conv", "1.2"]
    torch.testing.assert_close(deep.total, shallow.total)
    torch.testing.assert_close(deep.per_sample, shallow.per_sample)
    assert deep.per_sample.shape == (3,)
    torch.testing.assert_close(deep.per_sample.mean(), deep.total)


def test_total_is_differentiable_and_resets_each_forward_pass() -> None:
    model = build_model(ModelConfig(), (1, 28, 28), 10)
    with SynOpsCounter(model) as counter:
        model(spikes(2, 1, 28, 28) * 50)
        first = counter.total.item()
        model(torch.zeros(2, 1, 28, 28))
        assert counter.total.item() == 0.0
        model(spikes(2, 1, 28, 28) * 50)
        counter.total.backward()
    assert first > 0
    assert model[3].weight.grad is not None and model[3].weight.grad.abs().sum() > 0


def test_fan_out_maps_are_computed_once_per_layer_geometry_and_shape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[tuple] = []
    measure = synops.fan_out_map
    monkeypatch.setattr(synops, "fan_out_map",
                        lambda layer, shape: probed.append(shape) or measure(layer, shape))
    monkeypatch.setattr(synops, "_FAN_OUT_MAPS", {})  # as in a fresh process
    model = build_model(ModelConfig(), (1, 28, 28), 10)
    with SynOpsCounter(model):
        for batch in (2, 5, 2):
            model(spikes(batch, 1, 28, 28))
        model(spikes(2, 1, 32, 32)[:, :, :28, :28].contiguous())
    assert len(probed) == 4  # one per counted layer
    other = build_model(ModelConfig(init_seed=7), (1, 28, 28), 10)
    with SynOpsCounter(other):  # another counter, another network of the same geometry
        other(spikes(3, 1, 28, 28))
    assert len(probed) == 4
    wider = build_model(ModelConfig(args={"channels": [8, 32, 120]}), (1, 28, 28), 10)
    with SynOpsCounter(wider):
        wider(spikes(3, 1, 28, 28))
    assert len(probed) == 6  # its first two layers differ


def test_hooks_are_removed_on_exit() -> None:
    model = build_model(ModelConfig(), (1, 28, 28), 10)
    with SynOpsCounter(model) as counter:
        model(spikes(1, 1, 28, 28))
    model(torch.zeros(1, 1, 28, 28))
    assert counter.total.item() > 0
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_channels_last_feature_maps_count_the_same() -> None:
    model = build_model(ModelConfig(), (1, 28, 28), 10)
    reference = nn.Sequential(*[copy.deepcopy(m) for m in model]).to(memory_format=torch.contiguous_format)
    x = spikes(3, 1, 28, 28) * 40
    with SynOpsCounter(model) as fast, SynOpsCounter(reference) as plain:
        model(x)
        reference(x)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert reference[0].weight.is_contiguous()
    for name, value in plain.per_layer.items():
        torch.testing.assert_close(fast.per_layer[name], value, rtol=1e-6, atol=0)


def test_building_a_model_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(ModelConfig(), (1, 28, 28), 10)
    assert torch.equal(torch.rand(3), expected)
    second = build_model(ModelConfig(), (1, 28, 28), 10)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)  # the same config always starts from the same network


def test_under_bfloat16_autocast_the_counts_stay_float32_and_exact() -> None:
    """Autocast runs the convolutions in bfloat16, but what the counter adds up (spike counts
    times fan-outs, totals in the 1e5..1e7) is computed in float32: the input layer, whose spikes
    are the data's, is counted exactly as without autocast; deeper layers count the spikes that
    the bfloat16 network emits (`synops bench` measures how often those differ)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(), (1, 28, 28), 10)
    images = torch.randint(0, 256, (16, 1, 28, 28)).float()
    with torch.no_grad(), SynOpsCounter(model) as counter:
        model(images)
        exact = counter.per_layer["0"].item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
        assert counter.per_sample.dtype == torch.float32
        assert counter.per_layer["0"].item() == exact  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_of_the_mean_count_is_the_fan_out_per_sample(dtype: torch.dtype) -> None:
    """d(mean SynOps) / d(input) is each input's fan-out over the batch size (the number of
    outputs that read it: a 3x3 conv with padding 1 reads a corner pixel 4 times, an edge pixel
    6, an inner one 9), in the input's own dtype (bfloat16 past the first layer under autocast)."""
    layer = nn.Conv2d(2, 1, 3, padding=1, bias=False).to(dtype)
    x = torch.randint(0, 4, (4, 2, 5, 5)).to(dtype).requires_grad_()
    with SynOpsCounter(layer) as counter:
        layer(x)
        counter.total.backward()
    reads = torch.full((5, 5), 9.0)
    reads[0, :] = reads[-1, :] = reads[:, 0] = reads[:, -1] = 6.0
    reads[0, 0] = reads[0, -1] = reads[-1, 0] = reads[-1, -1] = 4.0
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, (reads / 4).expand(4, 2, 5, 5).to(dtype))
