"""Evaluation stage: accuracy (torchmetrics) and SynOps per sample over a whole split, and energy."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from pipeline.data import EVAL_BATCH_SIZE, Split, batches
from pipeline.synops import SynOpsCounter


@dataclass(frozen=True)
class EnergyProfile:
    """Energy one synaptic operation costs on a chip, with where the figure comes from."""

    picojoules_per_synop: float
    source: str


_SENECA_TABLE = "Tang et al. 2023, SENECA, Frontiers in Neuroscience, Table 3"
ENERGY_PROFILES: dict[str, EnergyProfile] = {
    "loihi": EnergyProfile(23.6, _SENECA_TABLE),
    "truenorth": EnergyProfile(2.5, _SENECA_TABLE),
    "tianjic": EnergyProfile(1.54, _SENECA_TABLE),
    "odin": EnergyProfile(12.7, _SENECA_TABLE),
    "reckon": EnergyProfile(5.3, _SENECA_TABLE),
    "spinnaker": EnergyProfile(45.0, _SENECA_TABLE),
    "spinnaker2": EnergyProfile(10.0, _SENECA_TABLE),
    "seneca": EnergyProfile(2.8, _SENECA_TABLE),
}
# For comparison: one 32-bit float MAC at 45 nm (Horowitz, ISSCC 2014).
FLOAT32_MAC_PICOJOULES = 4.6


def energy_per_sample(synops: float) -> dict[str, float]:
    """Microjoules per sample on each chip profile for a network needing `synops` per sample."""
    return {chip: synops * p.picojoules_per_synop * 1e-6 for chip, p in ENERGY_PROFILES.items()}


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and the distribution of per-sample SynOps over one split."""

    accuracy: float
    samples: int
    synops_mean: float = float("nan")
    synops_p50: float = float("nan")
    synops_p95: float = float("nan")
    synops_max: float = float("nan")
    synops_per_layer: dict[str, float] = field(default_factory=dict)

    @property
    def input_layer_synops(self) -> float:
        """SynOps of the first weight layer: set by the data alone, a floor training cannot move."""
        return next(iter(self.synops_per_layer.values()))

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict that `from_record` turns back into the same Evaluation."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Evaluation:
        return cls(**record)

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metric names as logged: `<prefix>_accuracy`, `<prefix>_synops_mean`, ...,
        and `<prefix>_synops_<layer>` for each layer."""
        values = {
            "accuracy": self.accuracy,
            "synops_mean": self.synops_mean,
            "synops_p50": self.synops_p50,
            "synops_p95": self.synops_p95,
            "synops_max": self.synops_max,
        }
        values |= {f"synops_{name}": v for name, v in self.synops_per_layer.items()}
        return {f"{prefix}_{key}": float(v) for key, v in values.items()}


@dataclass(frozen=True)
class SpikingEvaluation:
    """A trained network run as a spiking network on `samples` test images, beside the ANN's own
    numbers on the same images: how far the SynOps estimate and the predictions carry over."""

    settings: dict[str, Any]
    samples: int
    accuracy: float
    ann_accuracy: float
    agreement: float  # fraction of images where the SNN predicts what the ANN predicts
    synops_mean: float
    ann_synops_mean: float
    synops_per_layer: dict[str, float]
    ann_synops_per_layer: dict[str, float]

    @property
    def synops_ratio(self) -> float:
        """Measured SNN SynOps over the ANN's estimate."""
        return self.synops_mean / self.ann_synops_mean

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SpikingEvaluation:
        return cls(**record)

    def metrics(self) -> dict[str, float]:
        """Flat metric names as logged to the member's run."""
        return {"snn_test_accuracy": self.accuracy, "snn_test_synops_mean": self.synops_mean,
                "snn_synops_ratio": self.synops_ratio, "snn_agreement": self.agreement,
                "snn_samples": float(self.samples),
                **{f"snn_test_synops_{name}": v for name, v in self.synops_per_layer.items()}}


@dataclass(frozen=True)
class SpikingFailure:
    """Why a network could not be checked as a spiking network: the layer and the rule."""

    reason: str

    def to_record(self) -> dict[str, Any]:
        return {"failure": self.reason}


def spiking_result_from_record(record: dict[str, Any]) -> SpikingEvaluation | SpikingFailure:
    """A stored spiking check: its measurements, or the reason there are none."""
    if "failure" in record:
        return SpikingFailure(record["failure"])
    return SpikingEvaluation.from_record(record)


@dataclass(frozen=True)
class Deployment:
    """A network checked for `chip`: whether it fits (and on how many cores, per layer where, or why
    not), its test accuracy and SynOps with the chip's integer weights and thresholds (`quantized`,
    as the ANN evaluator runs them: all input at once), optionally as a spiking network
    (`spiking`), the quantisation's own problems, NeuroBench's metrics of the quantised network,
    its footprints and membrane values beyond the chip's range."""

    chip: str
    fits: bool
    cores_used: int
    core_count: int
    summary: str
    placements: list[dict[str, Any]]
    problems: list[dict[str, str]]
    quantized: Evaluation
    quantization_problems: list[str]
    thresholds: dict[str, int]
    effective_macs: float
    effective_acs: float
    dense_synops: float
    activation_sparsity: float
    chip_footprint_bytes: int
    float_footprint_bytes: int
    membrane_overflows: int
    membrane_bits: int
    spiking: SpikingEvaluation | None = None
    spiking_failure: str | None = None  # why it could not run as a spiking network (a layer)

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["quantized"] = self.quantized.to_record()
        record["spiking"] = self.spiking.to_record() if self.spiking is not None else None
        return record

    @classmethod
    def readable(cls, record: dict[str, Any]) -> bool:
        """Whether `record` holds this version's fields: a check recorded by another version
        (fields added since) is not read, but done again."""
        return set(record) == {field.name for field in dataclasses.fields(cls)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Deployment:
        values = dict(record)
        values["quantized"] = Evaluation.from_record(record["quantized"])
        values["spiking"] = (SpikingEvaluation.from_record(record["spiking"])
                             if record.get("spiking") else None)
        return cls(**values)

    def metrics(self) -> dict[str, float]:
        """Flat metric names as logged to the network's MLflow run (`<chip>_...`)."""
        values = {"fits": float(self.fits), "cores_used": float(self.cores_used),
                  "quantized_test_accuracy": self.quantized.accuracy,
                  "quantized_test_synops_mean": self.quantized.synops_mean,
                  "effective_macs": self.effective_macs, "effective_acs": self.effective_acs,
                  "activation_sparsity": self.activation_sparsity,
                  "footprint_bytes": float(self.chip_footprint_bytes),
                  "membrane_overflows": float(self.membrane_overflows)}
        if self.spiking is not None:
            values |= {"quantized_snn_test_accuracy": self.spiking.accuracy,
                       "quantized_snn_synops_mean": self.spiking.synops_mean}
        return {f"{self.chip}_{key}": value for key, value in values.items()}

    def lines(self) -> list[str]:
        """What a person reads: the fit, each layer's core and memory or the reasons, and the
        quantised numbers."""
        lines = [self.summary]
        for placement in self.placements:
            if placement["core"] is None:
                continue
            lines.append(f"  layer '{placement['layer']}': core {placement['core']}, kernel memory "
                         f"{placement['kernel_memory']} of {placement['kernel_limit']}, neuron memory "
                         f"{placement['neuron_memory']} of {placement['neuron_limit']}")
        lines += [f"  {p['reason']}" for p in self.problems]
        lines.append(f"  8-bit weights, thresholds {self.thresholds}: test accuracy "
                     f"{self.quantized.accuracy:.2%} at {self.quantized.synops_mean:.4g} SynOps per sample"
                     + (f"; as a spiking network {self.spiking.accuracy:.2%} at "
                        f"{self.spiking.synops_mean:.4g} ({self.spiking.samples} images)"
                        if self.spiking is not None else ""))
        lines += [f"  {problem}" for problem in self.quantization_problems]
        lines.append(f"  footprint {self.chip_footprint_bytes} bytes at 8 bits ({self.float_footprint_bytes} "
                     f"as float); NeuroBench: {self.effective_macs:.4g} effective MACs, "
                     f"{self.effective_acs:.4g} effective ACs per sample, activation sparsity "
                     f"{self.activation_sparsity:.3f}; membrane values beyond "
                     f"{self.membrane_bits} bits: {self.membrane_overflows}")
        if self.spiking_failure:
            lines.append(f"  not simulated as a spiking network: {self.spiking_failure}")
        return lines


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, batch_size: int = EVAL_BATCH_SIZE, with_synops: bool = True
) -> Evaluation:
    """Accuracy of `model` on `split` and, unless `with_synops` is False, its SynOps per sample
    over every sample (not one batch): mean, median, 95th percentile, max and per-layer means."""
    model.eval()
    accuracy: MulticlassAccuracy | None = None
    per_sample: list[torch.Tensor] = []
    layer_sums: dict[str, torch.Tensor] = {}
    with SynOpsCounter(model) if with_synops else contextlib.nullcontext() as counter:
        for images, labels in batches(split, batch_size):
            logits = model(images)
            if accuracy is None:
                accuracy = MulticlassAccuracy(logits.shape[1], average="micro").to(logits.device)
            accuracy.update(logits.argmax(1), labels)
            if counter is not None:
                per_sample.append(counter.per_sample)
                for name, mean in counter.per_layer.items():
                    layer_sums[name] = layer_sums.get(name, 0) + mean * len(labels)
    if accuracy is None:
        raise ValueError("cannot evaluate on an empty split")
    if not with_synops:
        return Evaluation(accuracy=accuracy.compute().item(), samples=len(split))
    synops = torch.cat(per_sample).double()
    levels = torch.tensor([0.5, 0.95], dtype=synops.dtype, device=synops.device)
    quantiles = torch.quantile(synops, levels)
    return Evaluation(
        accuracy=accuracy.compute().item(),
        samples=len(split),
        synops_mean=synops.mean().item(),
        synops_p50=quantiles[0].item(),
        synops_p95=quantiles[1].item(),
        synops_max=synops.max().item(),
        synops_per_layer={name: (s / len(split)).item() for name, s in layer_sums.items()},
    )
