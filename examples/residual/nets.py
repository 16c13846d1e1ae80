"""A network of your own, next to its config: a small residual conv net for spike-count input.

The pipeline calls `residual_net(input_shape=(C, H, W), num_classes=N, **[model.args])` and counts,
trains, sweeps and reports whatever `nn.Module` comes back, as long as every conv and linear layer
receives spike counts: put a `NeuromorphicReLU` before each (a skip connection adds counts to
counts, which stays a count) and sum pooling instead of average or max pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.layers import NeuromorphicReLU, SumPool2d


class ResidualBlock(nn.Module):
    """Two 3x3 convs whose result is added to the block's input spikes before spiking again."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.spike1 = NeuromorphicReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.spike2 = NeuromorphicReLU()

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        return self.spike2(self.conv2(self.spike1(self.conv1(spikes))) + spikes)


def residual_net(input_shape: tuple[int, int, int], num_classes: int, width: int = 8,
                 blocks: int = 1) -> nn.Module:
    """Stem conv, `blocks` residual blocks of `width` channels, sum pooling, a linear read-out."""
    channels, height, width_px = input_shape
    side = ((height - 4) // 2 // 2, (width_px - 4) // 2 // 2)
    return nn.Sequential(
        nn.Conv2d(channels, width, 5, bias=False), NeuromorphicReLU(), SumPool2d(2),
        *[ResidualBlock(width) for _ in range(blocks)],
        SumPool2d(2), nn.Flatten(),
        nn.Linear(width * side[0] * side[1], num_classes, bias=False),
    )
