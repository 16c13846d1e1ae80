"""Will it run on the chip? A trained network's fit on a chip's cores (`pipeline.chip`), and what its
accuracy and SynOps become on the chip's integers (`pipeline.quantize`), with the metrics a chip
team asks for (NeuroBench's effective ACs/MACs and activation sparsity, the 8-bit footprint), as one
typed record that trials, `synops deploy` and the report share.

What this simulates and what only the hardware can tell: the mapping is the chip's published memory
arithmetic and layer rules; the quantised network is evaluated as the chip computes (integer
weights, integer thresholds, all of a sample's input at once, or spread over time steps in the
spiking simulation), not on the chip. Timing, power and the chip's own event routing are not
modelled.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from pipeline.chip import chip_fit
from pipeline.chip_profiles import CHIPS
from pipeline.config import SNNConfig
from pipeline.data import Split
from pipeline.evaluate import Deployment, SpikingEvaluation, SpikingFailure, evaluate
from pipeline.quantize import (
    chip_footprint_bytes,
    float_footprint_bytes,
    membrane_ranges,
    neurobench_metrics,
    quantize_for_chip,
)
from pipeline.snn import check_spiking, require_enough_steps


def deploy(model: nn.Module, input_shape: tuple[int, int, int], test: Split, chip: str,
           spiking: SNNConfig | None = None, progress: bool = False) -> Deployment:
    """Check the trained `model` for `chip`: its mapping, and its quantised copy evaluated on
    `test` (as an ANN, and with `spiking` settings also as an integrate-and-fire network on the
    first `spiking.max_samples` samples, or why it cannot run as one). Chip incompatibilities are
    data in the record; nothing is raised for them. Raises `ConfigError` for `spiking` settings
    that need more steps than a pixel of `test` carries spikes."""
    if spiking is not None:
        require_enough_steps(spiking, {0: int(test.images.max())})
    mapping = chip_fit(model, input_shape, chip)
    quantized = quantize_for_chip(model, CHIPS[chip])
    metrics = neurobench_metrics(quantized.model, test)
    simulated = (check_spiking(quantized.model, test, spiking, f"{chip}, 8-bit", progress)
                 if spiking is not None else None)
    return Deployment(
        chip=chip, fits=mapping.fits, cores_used=mapping.cores_used, core_count=mapping.core_count,
        summary=mapping.summary(),
        placements=[dataclasses.asdict(p) for p in mapping.placements],
        problems=[dataclasses.asdict(p) for p in mapping.problems],
        quantized=evaluate(quantized.model, test),
        quantization_problems=[p.reason for p in quantized.problems],
        thresholds={layer.name: layer.threshold for layer in quantized.layers},
        effective_macs=metrics.effective_macs, effective_acs=metrics.effective_acs,
        dense_synops=metrics.dense_synops, activation_sparsity=metrics.activation_sparsity,
        chip_footprint_bytes=chip_footprint_bytes(quantized),
        float_footprint_bytes=float_footprint_bytes(model),
        membrane_overflows=sum(m.overflows for m in membrane_ranges(quantized, test)),
        membrane_bits=CHIPS[chip].membrane_bits,
        spiking=simulated if isinstance(simulated, SpikingEvaluation) else None,
        spiking_failure=simulated.reason if isinstance(simulated, SpikingFailure) else None,
    )
