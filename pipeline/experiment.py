"""Orchestration of one tracked training run: build, (warm-)start, train, evaluate, log to MLflow.

The stages themselves (data, model, train, evaluate) stay free of MLflow; this module wires them
together and records everything a run produced, including how it failed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from pipeline import tracking
from pipeline.config import ExperimentConfig
from pipeline.data import Dataset, load_dataset
from pipeline.evaluate import Evaluation, energy_per_sample, evaluate
from pipeline.interrupt import shielded
from pipeline.model import build_model
from pipeline.synops import counted_layer_names
from pipeline.train import EpochStats, TrainHistory, train


@dataclass(frozen=True)
class RunResult:
    """What a finished training run produced, and where it is in MLflow."""

    run_id: str
    val: Evaluation
    test: Evaluation
    history: TrainHistory
    state_dict: dict[str, torch.Tensor]
    seconds: float


def _log_epoch(stats: EpochStats) -> None:
    values = dataclasses.asdict(stats)
    epoch = values.pop("epoch")
    mlflow.log_metrics({f"epoch_{k}": v for k, v in values.items()}, step=epoch)


def final_metrics(val: Evaluation, test: Evaluation) -> dict[str, float]:
    """The metrics every finished run carries: val_/test_ accuracy and SynOps, energy per chip."""
    energy = {f"test_energy_uj_{chip}": e for chip, e in energy_per_sample(test.synops_mean).items()}
    return val.metrics("val") | test.metrics("test") | energy


def run_tracked(
    config: ExperimentConfig,
    dataset: Dataset,
    experiment: str,
    tags: Mapping[str, str],
    init_state: Mapping[str, torch.Tensor] | None = None,
    run_name: str | None = None,
    progress: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> RunResult:
    """Train `config.train` as one MLflow run in `experiment`, starting from `init_state` if given.
    `on_start` receives the run id as soon as the run exists (so a crash can be traced to it).

    A run that raises (a diverging loss included) ends FAILED, one interrupted ends KILLED, with the
    reason in the tag `synops.failure_reason`; the exception is re-raised for the caller.
    """
    started = time.perf_counter()
    run = mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=dict(tags))
    try:
        if on_start is not None:
            on_start(run.info.run_id)
        mlflow.log_params(tracking.flatten(config.to_dict()))
        mlflow.log_text(config.to_toml(), "config.toml")
        model = build_model(config.model).to(config.device)
        if init_state is not None:
            model.load_state_dict(init_state)
        history = train(model, dataset, config.train, on_epoch=_log_epoch, progress=progress)
        val, test = evaluate(model, dataset.val), evaluate(model, dataset.test)
        mlflow.log_metrics(final_metrics(val, test))
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        tracking.log_checkpoint(state)
        tracking.log_curves(history.step_task_loss, history.step_penalty_loss, history.step_synops)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        with shielded():
            mlflow.set_tag(tracking.TAG_FAILURE, f"{type(err).__name__}: {err}"[:5000])
            mlflow.end_run(status=status)
        raise
    mlflow.end_run()
    return RunResult(run.info.run_id, val, test, history, state, time.perf_counter() - started)


@dataclass(frozen=True)
class BaseModel:
    """The unpenalised model that fine-tuning starts from, and its logged metrics."""

    run_id: str
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    input_layer: str

    @property
    def val_synops(self) -> float:
        return self.metrics["val_synops_mean"]

    @property
    def input_layer_synops(self) -> float:
        """SynOps of the first weight layer: set by the data alone, a floor training cannot move."""
        return self.metrics[f"val_synops_{self.input_layer}"]


def ensure_base_model(
    config: ExperimentConfig, dataset: Dataset, experiment: str, progress: bool = True
) -> BaseModel:
    """Reuse the finished base-model run for this data + model + pretraining, or train and log one.

    Runs are matched by `ExperimentConfig.base_model_key()`, so changing any of those retrains.
    """
    if config.pretrain is None:
        raise ValueError("the config has no [pretrain] table, so there is no base model")
    key = config.base_model_key()
    run_id = tracking.find_finished_run(
        experiment, {tracking.TAG_ROLE: "base", tracking.TAG_BASE_KEY: key}
    )
    if run_id is None:
        base_config = dataclasses.replace(config, train=config.pretrain, pretrain=None)
        result = run_tracked(
            base_config, dataset, experiment,
            tags={tracking.TAG_ROLE: "base", tracking.TAG_BASE_KEY: key},
            run_name=f"base-{key[:8]}", progress=progress,
        )
        run_id = result.run_id
    metrics = mlflow.get_run(run_id).data.metrics
    input_layer = counted_layer_names(build_model(config.model))[0]
    return BaseModel(run_id, tracking.load_checkpoint(run_id), metrics, input_layer)


def initial_state(
    config: ExperimentConfig, dataset: Dataset, experiment: str, progress: bool = True
) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
    """Where fine-tuning starts: `train.init_from`, else the base model, else scratch (None);
    with the tags that say so on the run."""
    if config.train.init_from:
        path = Path(config.train.init_from)
        try:
            return torch.load(path, weights_only=True, map_location="cpu"), {"synops.init_from": str(path)}
        except (OSError, RuntimeError) as err:
            raise FileNotFoundError(f"train.init_from: cannot load checkpoint {path}: {err}") from err
    if config.pretrain is not None:
        base = ensure_base_model(config, dataset, experiment, progress)
        return base.state_dict, {"synops.base_run_id": base.run_id}
    return None, {}


def run_experiment(config: ExperimentConfig, tracking_uri: str, progress: bool = True) -> RunResult:
    """`synops train`: load the data, warm-start as configured, train, evaluate, log."""
    dataset = load_dataset(config.data).to(config.device)
    experiment = tracking.experiment_id(config.name, tracking_uri)
    state, tags = initial_state(config, dataset, experiment, progress)
    tags = {tracking.TAG_ROLE: "train", **tags}
    return run_tracked(config, dataset, experiment, tags, state, run_name="train", progress=progress)
