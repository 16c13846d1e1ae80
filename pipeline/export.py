"""Export: take one trained network out of a study, for a converter or a chip toolchain.

The export folder follows `pipeline.owned`'s rule: created fresh, or replaced whole when an earlier
export wrote it (it holds `MARKER`); any other non-empty folder is refused and left alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import torch

from pipeline.config import SNNConfig
from pipeline.errors import PipelineError
from pipeline.evaluate import energy_per_sample
from pipeline.front import StudyRecord, TrialRecord
from pipeline.members import chosen_member, member_network
from pipeline.owned import check_replaceable, replacing
from pipeline.tracking import Tracker

# Written into every export folder: only a folder holding it is ever replaced by a new export.
MARKER = ".synops-export"


class ExportError(PipelineError):
    """The chosen network cannot be written in the asked format (a layer NIR cannot hold)."""


def input_encoding(record: TrialRecord) -> str:
    """How a sample becomes the network's input spike counts, for people and toolchains."""
    k = record.spikes_per_pixel
    if k is None:
        return "spike counts as the data source gives them (no encoding)"
    return (f"pixel value v in 0..255 becomes floor(v * {k + 1} / 256) spikes (0..{k}): "
            "pipeline.data.encode_pixels")


def export_trial(study: optuna.Study, out: Path, tracker: Tracker, trial_number: int | None = None,
                 nir_settings: SNNConfig | None = None) -> Path:
    """Write `model.pt` (a state dict), its `config.toml` and `card.json` for trial `trial_number`,
    or for the front's knee when it is None; with `nir_settings`, also `model.nir`, the spiking
    network those settings describe. `out` is created, or replaced whole (nothing of an earlier
    export stays). Returns the card's path. Raises, before anything is written, `ExportError` when
    the network has no NIR equivalent (naming the layer) and `pipeline.owned.ForeignFolderError`
    (exit 2) when `out` holds files no export wrote; `pipeline.owned.OutputWriteError` when the
    files cannot be written (an earlier export there is kept)."""
    check_replaceable(out, MARKER, "export")
    record, reason = chosen_member(study, trial_number)
    on_front = record.number in {t.number for t in study.best_trials}
    study_record = StudyRecord.load(study)
    state = tracker.load_checkpoint(record.run_id)
    model = member_network(study_record.config, record)
    model.load_state_dict(state)
    nir_graph = None
    if nir_settings is not None:
        from pipeline.snn import SpikingConversionError, nir_graph_of  # loads sinabs and nir

        try:
            nir_graph = nir_graph_of(model, nir_settings, record.input_shape)
        except SpikingConversionError as err:
            raise ExportError(f"trial {record.number} cannot be exported as NIR: {err}") from None
    designed = record.variant.apply(study_record.config)
    input_shape = record.input_shape
    test = record.test
    card = {
        "study": study.study_name,
        "trial": record.number,
        "kind": record.kind,
        "chosen_as": reason,
        "on_front": on_front,
        "mlflow_run_id": record.run_id,
        "params": record.params,
        "variant": record.variant.label,
        "spikes_per_pixel": record.spikes_per_pixel,
        "target_synops": record.target_synops,
        "metrics": {
            "val_accuracy": record.val.accuracy, "val_synops_mean": record.val.synops_mean,
            "test_accuracy": test.accuracy, "test_synops_mean": test.synops_mean,
            "test_synops_p50": test.synops_p50, "test_synops_p95": test.synops_p95,
            "test_synops_max": test.synops_max,
        },
        "synops_per_layer": test.synops_per_layer,
        "energy_uj_per_sample": energy_per_sample(test.synops_mean),
        "input_shape": list(input_shape),
        "num_classes": record.num_classes,
        "network": {"factory": designed.model.factory, "args": designed.model.args,
                    "init_seed": designed.model.init_seed},
        "input_encoding": input_encoding(record),
        "activations": "NeuromorphicReLU: floor(relu(x)) spike counts; SumPool2d: window sums",
        "load_with": "pipeline.model.build_model(ModelConfig(factory, args), input_shape, "
                     "num_classes).load_state_dict(torch.load('model.pt', weights_only=True))",
    }
    if nir_graph is not None:
        card["nir"] = {
            "file": "model.nir",
            "spiking_settings": {k: getattr(nir_settings, k)
                                 for k in ("encoding", "steps", "spike_fn", "min_v_mem")},
            "input": f"{nir_settings.steps} time steps of {list(input_shape)} spike counts per "
                     f"sample ({nir_settings.encoding} encoding over time of each input's count)",
            "neurons": "NIR IF (integrate-and-fire, threshold 1, subtractive reset); NIR cannot "
                       "hold the membrane's lower bound or multi-spike output, which sinabs' "
                       "import rebuilds as -1 and multi-spike",
            "read_with": "sinabs.nir.from_nir(nir.read('model.nir'), "
                         f"num_timesteps={nir_settings.steps})",
        }
    note = "written by `synops export`; the folder is replaced whole by the next export to it\n"
    with replacing(out, MARKER, "export", note) as staging:
        torch.save(state, staging / "model.pt")
        tracker.download(record.run_id, "config.toml", staging)
        if nir_graph is not None:
            from pipeline.snn import save_nir

            save_nir(nir_graph, staging / "model.nir")
        (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out / "card.json"
