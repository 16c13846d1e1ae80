"""The Speck deployment check: memory formulas against hand counts, the layer pattern a DynapCNN core
runs, and the exact placement of layers on distinct cores."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipeline.chip import (
    ChipLayer,
    chip_layers,
    kernel_memory,
    map_to_chip,
    neuron_memory,
)
from pipeline.chip_profiles import CHIP_NAMES, CHIPS, KI, SPECK
from pipeline.layers import NeuromorphicReLU, SumPool2d


def tutorial_net() -> nn.Sequential:
    """The SynOps tutorial's network (NOTES.md §2), without biases."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, bias=False), NeuromorphicReLU(), SumPool2d(2),
        nn.Conv2d(16, 32, 5, bias=False), NeuromorphicReLU(), SumPool2d(2),
        nn.Conv2d(32, 120, 4, bias=False), NeuromorphicReLU(), nn.Flatten(),
        nn.Linear(120, 10, bias=False))


def rules(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, list[str]]:
    """Each broken rule of `model` on speck, with the reasons given for it."""
    found: dict[str, list[str]] = {}
    for problem in map_to_chip(chip_layers(model, input_shape), SPECK).problems:
        found.setdefault(problem.rule, []).append(problem.reason)
    return found


def test_speck_profile_is_sinabs_constraints_and_the_only_chip() -> None:
    # sinabs 3.1.3 chips/dynapcnn.py get_constraints, in Ki entries per core
    assert [c.kernel // KI for c in SPECK.cores] == [16, 16, 16, 32, 32, 64, 64, 16, 16]
    assert [c.neuron // KI for c in SPECK.cores] == [64, 64, 64, 32, 32, 16, 16, 16, 16]
    assert SPECK.bias_entries == 1024
    assert (SPECK.weight_max, SPECK.membrane_min, SPECK.membrane_max) == (127, -32768, 32767)
    assert CHIP_NAMES == ("speck",) and CHIPS["speck"] is SPECK


def test_memory_formulas_equal_hand_counts() -> None:
    # Conv2d(2, 16, 5) on 34x34 -> 30x30: kernel 2 * 2^(ceil log2 25 + log2 16) = 2 * 2^(5 + 4);
    # neuron 16 * 2^(ceil log2 30 + ceil log2 30) = 16 * 2^(5 + 5)
    assert kernel_memory(2, 5, 5, 16) == 2 * 2 ** (5 + 4) == 1024
    assert neuron_memory(16, 30, 30) == 16 * 2 ** (5 + 5) == 16384
    # sides round up separately for neurons, the kernel area rounds as a whole: 3x5 -> 2^4, 1x20 -> 2^5
    assert kernel_memory(1, 3, 5, 1) == 16 and neuron_memory(1, 20, 1) == 32
    (layer,) = chip_layers(nn.Sequential(nn.Conv2d(2, 16, 5), NeuromorphicReLU()), (2, 34, 34))
    assert (layer.kernel_memory, layer.neuron_memory, layer.bias_memory) == (1024, 16384, 16)
    assert (layer.input_size, layer.output_size, layer.spiking) == ((34, 34), (30, 30), True)
    with pytest.raises(ValueError, match="kx must be >= 1"):
        kernel_memory(1, 0, 3, 1)


def test_a_linear_layer_is_a_conv_over_its_flattened_input() -> None:
    # Conv2d(2, 8, 3, stride 2) on 33x33 -> 16x16, pooled by 4 -> 8 channels of 4x4; the Linear runs as
    # a 4x4 kernel over 8 channels: 8 * 2^(log2 16 + log2 16) = 2048 kernel entries, 10 neurons
    net = nn.Sequential(nn.Conv2d(2, 8, 3, stride=2), NeuromorphicReLU(), SumPool2d(4), nn.Flatten(),
                        nn.Dropout(), nn.Linear(8 * 4 * 4, 10))
    conv, linear = chip_layers(net, (2, 33, 33))
    assert (conv.output_size, conv.pooling, conv.stride) == ((16, 16), 4, (2, 2))
    assert (linear.in_channels, linear.kernel, linear.input_size) == (8, (4, 4), (4, 4))
    assert (linear.kernel_memory, linear.neuron_memory, linear.spiking) == (2048, 10, False)


def test_the_tutorial_net_fits_speck_on_four_cores() -> None:
    layers = chip_layers(tutorial_net(), (1, 28, 28))
    # by hand: conv1 1*2^(5+4), 16*2^(5+5); conv2 16*2^(5+5), 32*2^(3+3); conv3 32*2^(4+7), 120;
    # the Linear 120*2^(0+4), 10
    assert [(x.kernel_memory, x.neuron_memory) for x in layers] == [
        (512, 16384), (16384, 2048), (65536, 120), (1920, 10)]
    mapping = map_to_chip(layers, SPECK)
    assert mapping.fits and mapping.cores_used == 4
    assert mapping.summary() == "fits speck: 4 of 9 cores"
    cores = [p.core for p in mapping.placements]
    assert len(set(cores)) == 4 and cores[2] in (5, 6)  # only cores 5 and 6 hold 64 Ki kernel entries
    for placement in mapping.placements:
        assert placement.kernel_memory <= placement.kernel_limit
        assert placement.neuron_memory <= placement.neuron_limit


def test_any_module_tree_is_walked_and_the_copy_leaves_the_model_alone() -> None:
    block = lambda c_in, c_out, k: nn.Sequential(  # noqa: E731
        nn.Conv2d(c_in, c_out, k, bias=False), nn.BatchNorm2d(c_out), NeuromorphicReLU(), SumPool2d(2))
    net = nn.Sequential(OrderedDict(features=nn.Sequential(block(1, 16, 5), block(16, 32, 5)),
                                    head=nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 10, bias=False))))
    net.train()
    before = net.features[0][1].running_mean.clone()
    layers = chip_layers(net, (1, 28, 28))
    assert [x.name for x in layers] == ["features.0.0", "features.1.0", "head.1"]
    assert [x.has_bias for x in layers] == [True, True, False]  # batch norm folds into a bias
    assert map_to_chip(layers, SPECK).fits
    assert net.training and torch.equal(net.features[0][1].running_mean, before)


def test_a_layer_over_every_cores_neuron_memory_is_refused_by_name() -> None:
    # sinabs' overview example: Conv2d(16, 32, 3, padding 1) on 64x64 needs 32 * 64 * 64 = 128 Ki neurons
    net = nn.Sequential(OrderedDict(wide=nn.Conv2d(16, 32, 3, padding=1), spikes=NeuromorphicReLU()))
    mapping = map_to_chip(chip_layers(net, (16, 64, 64)), SPECK)
    assert not mapping.fits and [p.rule for p in mapping.problems] == ["neuron-memory"]
    assert mapping.problems[0].layer == "wide"
    assert "layer 'wide' (Conv2d): needs 131072 neuron entries" in mapping.summary()
    assert "65536" in mapping.summary() and mapping.placements[0].core is None


def test_ten_weight_layers_are_refused_for_nine_cores() -> None:
    net = nn.Sequential(*[m for _ in range(10) for m in (nn.Conv2d(2, 2, 3, padding=1), NeuromorphicReLU())])
    mapping = map_to_chip(chip_layers(net, (2, 8, 8)), SPECK)
    assert [(p.rule, p.layer) for p in mapping.problems] == [("core-count", "")]
    assert "10 weight layers but speck has 9 cores" in mapping.summary()
    assert mapping.cores_used == 9


def test_max_pooling_is_refused_naming_the_layer_and_the_fix() -> None:
    net = nn.Sequential(OrderedDict(features=nn.Sequential(
        nn.Conv2d(1, 4, 3), NeuromorphicReLU(), SumPool2d(2), nn.MaxPool2d(2)),
        flatten=nn.Flatten(), fc=nn.Linear(4 * 6 * 6, 10)))
    assert rules(net, (1, 28, 28)) == {"max-pooling": [
        "layer 'features.3' (MaxPool2d): max pooling does not map to the chip; use SumPool2d"]}


@pytest.mark.parametrize(("layer", "size", "rule", "words"), [
    (nn.Conv2d(1, 4, 17), 40, "kernel-size", "kernel 17x17 exceeds speck's 16x16"),
    (nn.Conv2d(1, 4, 3, stride=3), 30, "stride", "stride 3x3 is not among speck's strides 1, 2, 4, 8"),
    (nn.Conv2d(1, 4, 3, stride=2), 129, "input-size", "input 129x129 exceeds speck's 128x128"),
    (nn.Conv2d(1, 1, 1), 100, "output-size", "output 100x100 exceeds speck's 64x64"),
    (nn.Conv2d(1, 4, 9, padding=8), 20, "padding", "padding 8 exceeds speck's 7"),
    (nn.Conv2d(1, 4, (3, 5)), 20, "kernel-shape", "kernels are square"),
    (nn.Conv2d(1, 4, 3, dilation=2), 20, "dilation", "use dilation 1"),
], ids=["kernel-17", "stride-3", "input-129", "output-100", "padding-8", "kernel-3x5", "dilation"])
def test_a_layer_the_chip_cannot_run_names_the_rule(layer: nn.Module, size: int, rule: str,
                                                    words: str) -> None:
    found = rules(nn.Sequential(layer, NeuromorphicReLU()), (1, size, size))
    assert list(found) == [rule] and words in found[rule][0] and "layer '0'" in found[rule][0]


def test_a_linear_layer_over_a_large_map_breaks_the_kernel_limit() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), NeuromorphicReLU(), nn.Flatten(), nn.Linear(2 * 18 * 18, 10))
    found = rules(net, (1, 20, 20))
    assert list(found) == ["kernel-size"] and "layer '3' (Linear): kernel 18x18" in found["kernel-size"][0]


def test_pooling_outside_the_chips_windows_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), NeuromorphicReLU(), nn.AvgPool2d(2), SumPool2d(4), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 10))
    found = rules(net, (1, 26, 26))
    assert list(found) == ["pooling"] and "pooling 8 after it" in found["pooling"][0]


def test_an_unconverted_relu_and_a_missing_activation_are_refused() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), NeuromorphicReLU())
    found = rules(net, (1, 12, 12))
    assert found["activation"] == ["layer '1' (ReLU): an unconverted activation does not map: the chip's "
                                   "neurons are integrate-and-fire; use NeuromorphicReLU"]
    assert "feeds '2' without a spiking activation" in found["missing-activation"][0]


class Residual(nn.Module):
    """conv -> spikes -> conv -> spikes, plus the first spikes again: a skip connection by `+`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.spikes1 = nn.Conv2d(1, 4, 3, padding=1), NeuromorphicReLU()
        self.conv2, self.spikes2 = nn.Conv2d(4, 4, 3, padding=1), NeuromorphicReLU()
        self.pool = SumPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.spikes1(self.conv1(x))
        return self.pool(self.spikes2(self.conv2(skip)) + skip)


class Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class TwoBranches(nn.Module):
    """One spiking output read by two convs whose outputs a module adds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.spikes = nn.Conv2d(1, 4, 3), NeuromorphicReLU()
        self.left, self.right, self.add = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikes = self.spikes(self.conv(x))
        return self.add(self.left(spikes), self.right(spikes))


def test_skip_connections_and_branches_are_refused_without_crashing() -> None:
    found = rules(Residual(), (1, 8, 8))
    assert list(found) == ["outside-module"] and "layer 'pool' (SumPool2d)" in found["outside-module"][0]
    found = rules(TwoBranches(), (1, 8, 8))
    assert "it reads an output that 'left' also reads" in found["branch"][0]
    assert "joins 2 tensors" in found["join"][0] and "sinabs.layers.Merge" in found["join"][0]


def layer(name: str, in_channels: int, out_channels: int, output_side: int) -> ChipLayer:
    """A 3x3 conv layer record with the given sizes, for placement tests."""
    return ChipLayer(name=name, module_type="Conv2d", in_channels=in_channels, out_channels=out_channels,
                     kernel=(3, 3), stride=(1, 1), padding=(1, 1), input_size=(output_side, output_side),
                     output_size=(output_side, output_side), pooling=1, has_bias=False, spiking=True)


def test_placement_is_exact_where_first_fit_fails() -> None:
    # 'a' (32 Ki kernel, 16 Ki neurons) fits cores 3, 4, 5, 6; 'b' and 'c' (32 Ki, 32 Ki) only 3 and 4.
    # First fit puts 'a' on core 3 and finds no core for 'c'; the matching moves 'a' to 5 or 6.
    a, b, c = layer("a", 32, 64, 16), layer("b", 64, 32, 32), layer("c", 64, 32, 32)
    assert [(x.kernel_memory, x.neuron_memory) for x in (a, b, c)] == [
        (32 * KI, 16 * KI), (32 * KI, 32 * KI), (32 * KI, 32 * KI)]
    mapping = map_to_chip([a, b, c], SPECK)
    assert mapping.fits, mapping.summary()
    assert mapping.placements[0].core in (5, 6) and {p.core for p in mapping.placements[1:]} == {3, 4}


def test_layers_competing_for_too_few_cores_are_named() -> None:
    mapping = map_to_chip([layer(name, 64, 32, 32) for name in ("a", "b", "c")], SPECK)
    assert [p.rule for p in mapping.problems] == ["core-assignment"]
    assert mapping.problems[0].reason.startswith(
        "layers 'a', 'b', 'c' fit only cores 3, 4: 3 layers for 2 cores, so no assignment of distinct "
        "cores exists")
    assert mapping.cores_used == 2


def test_no_weight_layer_is_a_problem_not_a_crash() -> None:
    assert map_to_chip(chip_layers(nn.Sequential(SumPool2d(2)), (1, 4, 4)), SPECK).summary() == (
        "does not fit speck: the network has no Conv2d or Linear layer to map")
    with pytest.raises(ValueError, match="channels, height, width"):
        chip_layers(nn.Sequential(nn.Linear(3, 2)), (3,))


def test_a_layer_no_single_core_holds_is_refused() -> None:
    # 64 Ki kernel entries (64 * 2^(4 + 6)) fit only cores 5 and 6, which hold 16 Ki neurons; its
    # 64 * 2^(4 + 5) = 32 Ki neurons fit only cores 0 to 4
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), NeuromorphicReLU())
    found = rules(net, (64, 16, 32))
    assert list(found) == ["no-core"]
    assert "no core holds both its 65536 kernel and 32768 neuron entries" in found["no-core"][0]
    assert "cores with enough kernel memory, 5, 6, hold at most 16384 neurons" in found["no-core"][0]
