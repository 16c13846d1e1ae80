"""Tracking: where MLflow runs go and how a pipeline run is written to them.

The default store is SQLite at `mlruns/mlflow.db` with artifacts beside it in `mlruns/artifacts`
(MLflow's plain file store is deprecated). Runs are logged with the MLflow API directly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
# A progress bar per downloaded checkpoint would interleave with the pipeline's own output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
CHECKPOINT_ARTIFACT = "model/state_dict.pt"
TAG_ROLE = "synops.role"  # "base", "trial", "study" or "train"
TAG_BASE_KEY = "synops.base_model_key"
TAG_FAILURE = "synops.failure_reason"
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests runs in its UI


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the project's SQLite store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///"))


def init_tracking(uri: str) -> MlflowClient:
    """Point MLflow at `uri` and create (or migrate) its store now, once, before any worker starts:
    several processes first touching a fresh SQLite file race on the schema."""
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)
    return client


def experiment_id(name: str, uri: str) -> str:
    """Id of the MLflow experiment `name`, created if needed. For a SQLite store its artifacts go
    in `artifacts/` next to the database file."""
    client = init_tracking(uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    db = _sqlite_path(uri)
    location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # another worker created it first
        return client.get_experiment_by_name(name).experiment_id


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat


def log_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Log a state dict as an artifact of the active run (load it with `weights_only=True`);
    cheaper than `mlflow.pytorch.log_model`, which infers requirements in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
        torch.save(dict(state_dict), path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(CHECKPOINT_ARTIFACT).parent))


def load_checkpoint(run_id: str) -> dict[str, torch.Tensor]:
    """The state dict logged by `log_checkpoint` in run `run_id`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp
        )
        return torch.load(path, weights_only=True, map_location="cpu")


def log_curves(step_task_loss: list[float], step_penalty_loss: list[float],
               step_synops: list[float]) -> None:
    """Log the training curves (loss parts and SynOps per step) as a figure of the active run."""
    fig, (loss_ax, synops_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_ax.plot(step_task_loss, label="cross-entropy")
    if any(step_penalty_loss):
        loss_ax.plot(step_penalty_loss, label="SynOps penalty")
    loss_ax.set(xlabel="training step", ylabel="loss", yscale="log", title="Loss")
    loss_ax.legend()
    synops_ax.plot(step_synops)
    synops_ax.set(xlabel="training step", ylabel="SynOps per sample", title="Train SynOps")
    fig.tight_layout()
    mlflow.log_figure(fig, "curves.png")
    plt.close(fig)


def find_finished_run(experiment: str, tags: Mapping[str, str]) -> str | None:
    """Id of the newest FINISHED run of `experiment` carrying all `tags`, or None."""
    conditions = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    conditions.append("attributes.status = 'FINISHED'")
    runs = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string=" and ".join(conditions),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None
