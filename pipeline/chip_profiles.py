"""Chip profiles as data: what a Speck-class (DynapCNN) processor's cores hold and which layer
shapes they run, with where each number comes from. Another chip with published limits is one more
`ChipProfile` in `CHIPS`. Pure data (no torch), so a config can name a chip and be checked at load.
"""

from __future__ import annotations

from dataclasses import dataclass

KI = 1024  # memory sizes are counted in entries; 1 Ki = 1024 entries

_SINABS_DYNAPCNN = "sinabs 3.1.3 backend/dynapcnn (chips/dynapcnn.py, dynapcnn_layer.py, discretize.py)"
_SINABS_SPECK_DOCS = "sinabs docs/speck/overview.md and faqs/available_network_arch.md"


@dataclass(frozen=True)
class CoreMemory:
    """What one core holds, in entries: kernel (weights) and neuron (membrane states) memory."""

    kernel: int
    neuron: int


@dataclass(frozen=True)
class ChipProfile:
    """One chip's limits as data, with where each number comes from."""

    name: str
    cores: tuple[CoreMemory, ...]
    bias_entries: int  # per core
    max_kernel_side: int
    strides: tuple[int, ...]
    poolings: tuple[int, ...]  # sum-pooling windows a core applies after its neurons
    max_padding: int
    max_input_side: int
    max_output_side: int
    max_channels: int
    weight_bits: int  # signed, one scale per layer; biases have the same width
    membrane_bits: int  # signed
    source: str

    @property
    def weight_max(self) -> int:
        """Largest integer weight: 127 for 8 bits (the range is symmetric here: -127..127)."""
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def membrane_min(self) -> int:
        """Lowest membrane value the chip holds: -32768 for 16 bits."""
        return -(2 ** (self.membrane_bits - 1))

    @property
    def membrane_max(self) -> int:
        """Highest membrane value the chip holds, also the highest threshold: 32767 for 16 bits."""
        return 2 ** (self.membrane_bits - 1) - 1


SPECK = ChipProfile(
    name="speck",
    cores=(*[CoreMemory(16 * KI, 64 * KI)] * 3, *[CoreMemory(32 * KI, 32 * KI)] * 2,
           *[CoreMemory(64 * KI, 16 * KI)] * 2, *[CoreMemory(16 * KI, 16 * KI)] * 2),
    bias_entries=1 * KI,
    max_kernel_side=16,
    strides=(1, 2, 4, 8),
    poolings=(1, 2, 4),
    max_padding=7,
    max_input_side=128,
    max_output_side=64,
    max_channels=1024,
    weight_bits=8,
    membrane_bits=16,
    source=f"{_SINABS_DYNAPCNN}; {_SINABS_SPECK_DOCS}",
)
CHIPS: dict[str, ChipProfile] = {"speck": SPECK}
CHIP_NAMES: tuple[str, ...] = tuple(CHIPS)
