"""Networks from a factory: the built-in conv net, a user's factory, and the check that every
counted layer receives spike counts (each failure named, with the layer and the fix)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.layers import NeuromorphicReLU, SumPool2d
from pipeline.model import build_model, check_network, model_fingerprint

MNIST = (1, 28, 28)
COUNTS = torch.randint(0, 4, (8, 1, 28, 28)).float()


def test_the_built_in_net_is_the_tutorials_and_starts_the_same_every_time() -> None:
    model = build_model(ModelConfig(), MNIST, 10)
    assert sum(p.numel() for p in model.parameters()) == 75_840  # the tutorial's weights
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "NeuromorphicReLU", "SumPool2d", "Conv2d", "NeuromorphicReLU", "SumPool2d",
        "Conv2d", "NeuromorphicReLU", "Flatten", "Linear"]
    again = build_model(ModelConfig(), MNIST, 10)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    colour = build_model(ModelConfig(args={"channels": [4, 8], "kernel_sizes": [3, 3], "pooling": [2, 1]}),
                         (3, 20, 16), 5)
    assert colour(torch.zeros(2, 3, 20, 16)).shape == (2, 5)


def user_factory(tmp_path: Path, body: str) -> str:
    """A factory `make` in a module of its own (a fresh name: modules are imported once)."""
    name = f"user_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\nfrom pipeline.layers import NeuromorphicReLU, SumPool2d\n\n" + body)
    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))
    return f"{name}:make"


def refusal(config: ModelConfig) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_network(build_model(config, MNIST, 10), COUNTS, 10)
    return info.value


def test_a_factory_that_cannot_be_used_is_refused_naming_why(tmp_path: Path) -> None:
    assert "cannot resolve 'nowhere_at_all:net'" in str(refusal(ModelConfig(factory="nowhere_at_all:net")))
    assert "standard library" in str(refusal(ModelConfig(factory="os:system")))
    raises = user_factory(tmp_path, "def make(input_shape, num_classes):\n    raise ValueError('bad')\n")
    error = refusal(ModelConfig(factory=raises))
    assert error.key == "model.factory" and "raised ValueError: bad" in str(error)
    number = user_factory(tmp_path, "def make(input_shape, num_classes):\n    return 42\n")
    assert "returned a int, not a torch.nn.Module" in str(refusal(ModelConfig(factory=number)))
    error = refusal(ModelConfig(args={"depth": 3}))
    assert error.key == "model.args" and "does not accept ['depth']" in str(error)
    error = refusal(ModelConfig(args={"kernel_sizes": [5, 5, 9]}))
    assert error.key == "model.args.kernel_sizes" and "too large for a 28x28 input" in str(error)


LAYER_FAULTS = {
    "relu": ("nn.Sequential(nn.Conv2d(1, 4, 5, bias=False), nn.ReLU(), nn.Flatten(), "
             "nn.Linear(2304, num_classes))", "layer '3' (Linear) receives non-integer inputs"),
    "no activation": ("nn.Sequential(nn.Conv2d(1, 4, 5), nn.Conv2d(4, 4, 3), NeuromorphicReLU(), "
                      "nn.Flatten(), nn.Linear(1936, num_classes))",
                      "layer '1' (Conv2d) receives negative inputs"),
    "average pooling": ("nn.Sequential(nn.Conv2d(1, 4, 5, bias=False), NeuromorphicReLU(), "
                        "nn.AvgPool2d(2), nn.Flatten(), nn.Linear(576, num_classes))",
                        "layer '4' (Linear) receives non-integer inputs"),
}


@pytest.mark.parametrize("fault", LAYER_FAULTS)
def test_a_layer_that_would_not_receive_spike_counts_is_named_with_the_fix(tmp_path: Path,
                                                                           fault: str) -> None:
    body, message = LAYER_FAULTS[fault]
    factory = user_factory(tmp_path, f"def make(input_shape, num_classes):\n    return {body}\n")
    error = refusal(ModelConfig(factory=factory))
    assert error.key == "model.factory" and message in str(error)
    assert "NeuromorphicReLU" in str(error)


def test_a_network_with_the_wrong_output_or_no_counted_layer_is_refused(tmp_path: Path) -> None:
    wrong = user_factory(tmp_path, "def make(input_shape, num_classes):\n"
                                   "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))\n")
    assert "returns (8, 3)" in str(refusal(ModelConfig(factory=wrong)))
    empty = user_factory(tmp_path, "def make(input_shape, num_classes):\n"
                                   "    return nn.Sequential(SumPool2d(2), nn.Flatten())\n")
    assert "no conv or linear layer" in str(refusal(ModelConfig(factory=empty)))


def test_nested_blocks_with_a_skip_connection_pass_the_check() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.spike = NeuromorphicReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.spike(self.conv(x) + x)

    model = nn.Sequential(nn.Conv2d(1, 4, 5, bias=False), NeuromorphicReLU(), nn.Sequential(Block()),
                          SumPool2d(4), nn.Flatten(), nn.Linear(144, 10, bias=False))
    check_network(model, COUNTS, 10)  # no error: the skip adds counts to counts


def test_the_fingerprint_holds_the_parameter_shapes() -> None:
    small = model_fingerprint(ModelConfig(), build_model(ModelConfig(), MNIST, 10))
    assert small["parameter_shapes"]["0.weight"] == [16, 1, 5, 5]
    wider = ModelConfig(args={"channels": [32, 32, 120]})
    assert model_fingerprint(wider, build_model(wider, MNIST, 10))["hash"] != small["hash"]
