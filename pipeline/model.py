"""Model stage: build the convolutional network described by a `ModelConfig`."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ConfigError, ModelConfig
from pipeline.layers import NeuromorphicReLU, SumPool2d


def build_model(config: ModelConfig) -> nn.Sequential:
    """Conv blocks (conv, spiking ReLU, sum pooling where `pooling` > 1), then linear layers.

    The default config is the SynOps tutorial's network; weights are drawn with `init_seed`, so
    the same config always starts from the same network.
    """
    torch.manual_seed(config.init_seed)
    layers: list[nn.Module] = []
    channels, size = config.in_channels, config.input_size
    for out_channels, kernel, pool in zip(
        config.channels, config.kernel_sizes, config.pooling, strict=True
    ):
        layers += [nn.Conv2d(channels, out_channels, kernel, bias=config.bias), NeuromorphicReLU()]
        channels, size = out_channels, size - kernel + 1
        if pool > 1:
            layers.append(SumPool2d(pool))
            size //= pool
        if size < 1:
            raise ConfigError("model.kernel_sizes", f"the {size}x{size} feature map is too small")
    layers.append(nn.Flatten())
    features = channels * size * size
    for hidden in config.hidden_features:
        layers += [nn.Linear(features, hidden, bias=config.bias), NeuromorphicReLU()]
        features = hidden
    layers.append(nn.Linear(features, config.num_classes, bias=config.bias))
    # Channels-last weights make every feature map channels-last: on CPU, sum pooling then runs
    # ~4x and the convolutions ~1.1x faster than in the default layout (see `synops bench`).
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)
