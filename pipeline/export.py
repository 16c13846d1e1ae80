"""Export: take one trained network out of a study, for a converter or a chip toolchain."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import optuna
import torch

from pipeline import tracking
from pipeline.report import EmptyStudyError, front_table, knee_index, layer_columns, trials_frame


def export_trial(study: optuna.Study, out: Path, trial_number: int | None = None) -> Path:
    """Write `model.pt` (a state dict), its `config.toml` and `card.json` for trial `trial_number`,
    or for the front's knee when it is None. Returns the card's path."""
    frame = trials_frame(study)
    if frame.empty:
        raise EmptyStudyError(f"study '{study.study_name}' has no finished trial to export")
    if trial_number is None:
        front = front_table(frame)
        trial_number = int(front.loc[knee_index(front), "trial"])
    rows = frame[frame["trial"] == trial_number]
    if rows.empty:
        finished = ", ".join(str(n) for n in frame["trial"])
        raise EmptyStudyError(f"trial {trial_number} is not a finished trial (finished: {finished})")
    row = rows.iloc[0]
    run_id = row["mlflow_run_id"]
    out.mkdir(parents=True, exist_ok=True)
    torch.save(tracking.load_checkpoint(run_id), out / "model.pt")
    with tempfile.TemporaryDirectory() as tmp:
        config = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.toml",
                                                     dst_path=tmp)
        shutil.copy(config, out / "config.toml")
    summary = ["val_accuracy", "val_synops_mean", "test_accuracy", "test_synops_mean",
               "test_synops_p50", "test_synops_p95", "test_synops_max"]
    card = {
        "study": study.study_name,
        "trial": trial_number,
        "kind": row["kind"],
        "on_front": bool(row["on_front"]),
        "mlflow_run_id": run_id,
        "params": study.trials[trial_number].params,
        "metrics": {k: float(row[k]) for k in summary},
        "synops_per_layer": {c.removeprefix("test_synops_"): float(row[c]) for c in layer_columns(frame)},
        "energy_uj_per_sample": {c.removeprefix("test_energy_uj_"): float(row[c])
                                 for c in frame if c.startswith("test_energy_uj_")},
        "input_encoding": "pixel value 0..255 read as a spike count",
        "activations": "NeuromorphicReLU: floor(relu(x)) spike counts; SumPool2d: window sums",
        "load_with": "pipeline.model.build_model(config.model).load_state_dict("
                     "torch.load('model.pt', weights_only=True))",
    }
    path = out / "card.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path
