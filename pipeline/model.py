"""Model stage: build the convolutional network described by a `ModelConfig`."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.layers import NeuromorphicReLU, SumPool2d


def build_model(config: ModelConfig) -> nn.Sequential:
    """Conv blocks (conv, spiking ReLU, sum pooling where `pooling` > 1), then linear layers.

    The default config is the SynOps tutorial's network; weights are drawn with `init_seed`, so
    the same config always starts from the same network. The global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return _layers(config).to(memory_format=torch.channels_last)


def _layers(config: ModelConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = config.in_channels
    for out_channels, kernel, pool in zip(
        config.channels, config.kernel_sizes, config.pooling, strict=True
    ):
        layers += [nn.Conv2d(channels, out_channels, kernel, bias=config.bias), NeuromorphicReLU()]
        channels = out_channels
        if pool > 1:
            layers.append(SumPool2d(pool))
    size = config.feature_map_sizes()[-1]
    layers.append(nn.Flatten())
    features = channels * size * size
    for hidden in config.hidden_features:
        layers += [nn.Linear(features, hidden, bias=config.bias), NeuromorphicReLU()]
        features = hidden
    layers.append(nn.Linear(features, config.num_classes, bias=config.bias))
    # Channels-last weights (see `build_model`) make every feature map channels-last: on CPU, sum
    # pooling then runs ~4x and the convolutions ~1.1x faster than in the default layout.
    return nn.Sequential(*layers)
