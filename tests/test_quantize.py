"""Quantisation for Speck: 8-bit weights with the threshold as the scale, problems as data, the chip's
integer arithmetic, a trained network's accuracy after quantisation, and NeuroBench-style metrics
against hand counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.chip_profiles import SPECK
from pipeline.config import SNNConfig
from pipeline.data import Split, batches
from pipeline.deploy import deploy
from pipeline.evaluate import evaluate
from pipeline.layers import NeuromorphicReLU, SumPool2d
from pipeline.quantize import (
    MembraneRange,
    NeuroBenchMetrics,
    chip_footprint_bytes,
    float_footprint_bytes,
    membrane_ranges,
    neurobench_metrics,
    quantize_for_chip,
)
from tests.test_chip import tutorial_net

# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = pytest.mark.xdist_group(__name__)


def linear(weights: list[list[float]]) -> nn.Linear:
    """A Linear layer without bias holding `weights` (out x in)."""
    layer = nn.Linear(len(weights[0]), len(weights), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights))
    return layer


def counts(rows: list[list[int]]) -> Split:
    """Samples of integer spike counts (N, features), labels 0."""
    return Split(torch.tensor(rows, dtype=torch.uint8), torch.zeros(len(rows), dtype=torch.long))


def test_every_layer_uses_the_full_8_bit_range_and_the_copy_runs_w_q_over_threshold() -> None:
    net = tutorial_net()
    original = [p.clone() for p in net.parameters()]
    quantized = quantize_for_chip(net, SPECK)
    modules = dict(quantized.model.named_modules())
    assert [layer.name for layer in quantized.layers] == ["0", "3", "6", "9"]
    for layer in quantized.layers:
        assert layer.levels_used == 127 and layer.weight.abs().max() == 127
        assert layer.zero_weights < layer.weight.numel() and 1 <= layer.threshold <= 32767
        assert torch.equal(modules[layer.name].weight, layer.weight.float() / layer.threshold)
    assert quantized.problems == ()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), original, strict=True))


def test_the_threshold_is_the_largest_scale_that_keeps_weights_in_range() -> None:
    # 127.5 / 0.5 = 255, so theta = 254: 0.5 * 254 = 127 and -0.25 * 254 = -63.5, rounded to even: -64
    (layer,) = quantize_for_chip(nn.Sequential(linear([[0.5, -0.25]])), SPECK).layers
    assert layer.threshold == 254 and layer.weight.tolist() == [[127, -64]]


@pytest.mark.parametrize(("scale", "problems", "levels"), [
    (0.0, ["all-zero"], 0),
    (1e-9, ["all-zero", "threshold-range"], 0),
    (1e-3, ["threshold-range"], 33),  # theta capped at 32767: 1e-3 * 32767 rounds to 33
    (2.0, ["weight-over-threshold"], 126),  # theta 63: 2 * 63 = 126 > 63
    (300.0, ["weight-clipped", "weight-over-threshold"], 127),
], ids=["zero", "tiny", "small", "above-threshold", "huge"])
def test_a_scale_that_cannot_keep_the_spike_counts_is_recorded(scale: float, problems: list[str],
                                                                levels: int) -> None:
    (layer,) = quantize_for_chip(nn.Sequential(linear([[scale, -scale / 2]])), SPECK).layers
    assert [p.rule for p in layer.problems] == problems and layer.levels_used == levels
    assert all(p.reason.startswith("layer '0' (Linear): ") for p in layer.problems)


def test_the_float_copy_counts_the_spikes_of_the_chips_integer_neurons() -> None:
    torch.manual_seed(0)
    quantized = quantize_for_chip(nn.Sequential(nn.Conv2d(2, 6, 3), NeuromorphicReLU()), SPECK)
    (layer,) = quantized.layers
    x = torch.randint(0, 6, (64, 2, 10, 10)).float()
    with torch.no_grad():
        spikes = quantized.model(x).double()
    # the chip: integer membrane w_q * x + b_q, one spike per threshold (exact in float64)
    membrane = F.conv2d(x.double(), layer.weight.double(), layer.bias.double())
    chip_spikes = torch.div(membrane.clamp(min=0), layer.threshold, rounding_mode="floor")
    differ = spikes != chip_spikes
    # float32 can round w_q / theta so that an exact multiple of theta loses one spike, nowhere else
    at_a_multiple = (membrane > 0) & (membrane.remainder(layer.threshold) == 0)
    assert not (differ & ~at_a_multiple).any()
    assert differ.double().mean() < 1e-3 and chip_spikes.sum() > 1000


def test_membrane_values_beyond_16_bits_are_counted() -> None:
    # theta = ceil(127.5 / 0.9) - 1 = 141, w_q = round(0.9 * 141) = 127: four inputs of 100 spikes
    # reach 4 * 127 * 100 = 50800 > 32767; of 10 spikes, 5080
    quantized = quantize_for_chip(nn.Sequential(linear([[0.9] * 4])), SPECK)
    assert quantized.layers[0].threshold == 141
    assert membrane_ranges(quantized, counts([[100] * 4, [10] * 4])) == (
        MembraneRange("0", values=2, overflows=1, peak=50800),)


def test_neurobench_metrics_equal_hand_counts() -> None:
    # Linear(3 -> 2) with weights [[1, 0, 2], [0, 0, 3]], spikes, Linear(2 -> 1) with [[1, -1]].
    # Sample [2, 0, 1] (counts, so MACs): 2 + 1 nonzero pairs; hidden floor([4, 3]): 2 more MACs.
    # Sample [1, 0, 0] (binary, so ACs): 1 pair; hidden [1, 0] (binary): 1 AC.
    # Dense: 3 * 2 + 2 * 1 = 8 connections a sample; activations [4, 3, 1, 0]: 1 zero of 4.
    net = nn.Sequential(linear([[1, 0, 2], [0, 0, 3]]), NeuromorphicReLU(), linear([[1, -1]]))
    expected = NeuroBenchMetrics(effective_macs=5 / 2, effective_acs=2 / 2, dense_synops=8.0,
                                 activation_sparsity=0.25)
    for batch_size in (1, 2):  # ACs and MACs are told apart per sample, so the batch does not matter
        assert neurobench_metrics(net, counts([[2, 0, 1], [1, 0, 0]]), batch_size) == expected
    # Conv2d(1 -> 1, 2x2) with weights [[1, 0], [0, 1]] on the 3x3 diagonal: the 4 outputs see
    # 2, 0, 0 and 2 nonzero pairs; 4 outputs x 4 weights = 16 connections
    conv = nn.Conv2d(1, 1, 2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]))
        conv.bias.fill_(5.0)  # NeuroBench leaves the bias out of synaptic operations
    diagonal = Split(torch.eye(3, dtype=torch.uint8).view(1, 1, 3, 3), torch.zeros(1, dtype=torch.long))
    assert neurobench_metrics(nn.Sequential(conv), diagonal) == NeuroBenchMetrics(0.0, 4.0, 16.0, 0.0)


def test_footprints_count_each_tensor_at_its_width() -> None:
    # 400 + 12800 + 61440 + 1200 = 75840 weights: 4 bytes each as float32; 1 byte each on the chip,
    # plus a 16-bit threshold for each of the 4 layers
    net = tutorial_net()
    assert float_footprint_bytes(net) == 75840 * 4
    assert chip_footprint_bytes(quantize_for_chip(net, SPECK)) == 75840 + 4 * 2


def toy_split(n: int, seed: int) -> Split:
    """A learnable 10-class set of 12x12 spike-count images: noise of 1..3 spikes on a fifth of the
    pixels, and 1..3 more spikes on a 3x3 block whose place is the class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    noise = torch.rand(n, 1, 12, 12, generator=generator) < 0.2
    images = noise * torch.randint(1, 4, (n, 1, 12, 12), generator=generator)
    for i, k in enumerate(labels.tolist()):
        row, column = 1 + 3 * (k // 4), 3 * (k % 4)
        images[i, 0, row:row + 3, column:column + 3] += torch.randint(1, 4, (3, 3), generator=generator)
    return Split(images.to(torch.uint8), labels)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Split]:
    """A small spiking CNN trained 200 steps on the toy set (about 99% test accuracy), and a test
    split."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), NeuromorphicReLU(), SumPool2d(2),
                        nn.Conv2d(8, 16, 3, bias=False), NeuromorphicReLU(), nn.Flatten(),
                        nn.Linear(144, 10, bias=False))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    train, step = toy_split(4000, seed=1), 0
    generator = torch.Generator().manual_seed(0)
    while step < 200:
        for images, labels in batches(train, 32, generator):
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == 200:
                break
    return net, toy_split(2000, seed=2)


@pytest.mark.slow  # 5-20 s on 2 cores: 200 training steps, then a few passes over 2000 images
def test_a_trained_network_keeps_its_accuracy_on_the_chips_integers(trained: tuple[nn.Module, Split]) -> None:
    net, test = trained
    quantized = quantize_for_chip(net, SPECK)
    assert quantized.problems == ()
    float_ann = evaluate(net, test)
    report = deploy(net, (1, 12, 12), test, "speck", SNNConfig(steps=1, max_samples=0))
    assert report.fits and float_ann.accuracy > 0.95
    assert abs(float_ann.accuracy - report.quantized.accuracy) <= 0.005  # within half a point
    # all input at once (one step): the integrate-and-fire network is the quantised ANN
    snn = report.spiking
    assert snn.agreement == 1.0 and snn.accuracy == pytest.approx(report.quantized.accuracy)
    assert snn.synops_mean == pytest.approx(report.quantized.synops_mean, rel=1e-5)
    assert report.quantized.synops_mean == pytest.approx(float_ann.synops_mean, rel=0.01)
    assert report.membrane_overflows == 0
    assert report.dense_synops == neurobench_metrics(net, test).dense_synops
    # 8 * 9 + 16 * 8 * 9 + 144 * 10 = 2664 weights: 4 bytes each in float32, 1 on the chip, plus
    # three 16-bit thresholds
    assert (report.float_footprint_bytes, report.chip_footprint_bytes) == (2664 * 4, 2664 + 3 * 2)
    assert evaluate(quantized.model, test, with_synops=False).accuracy == report.quantized.accuracy
