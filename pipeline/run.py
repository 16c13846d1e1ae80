"""One tracked training run: build, (warm-)start, train, evaluate, and record it with a `Tracker`.

The stages themselves (data, model, train, evaluate) know nothing of MLflow; this module wires them
together and records everything a run produced, including how it failed. Each run also stores its
evaluations as `evaluation.json`, so that what is read back is a typed record, not metric names.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.config import ExperimentConfig, flatten  # noqa: E402
from pipeline.data import Dataset, load_dataset  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.evaluate import Evaluation, energy_per_sample, evaluate  # noqa: E402
from pipeline.interrupt import shielded  # noqa: E402
from pipeline.model import base_fingerprints, build_model, check_network, model_fingerprint  # noqa: E402
from pipeline.tracking import TAG_BASE_KEY, TAG_ROLE, Tracker, TrackingError  # noqa: E402
from pipeline.train import EpochStats, TrainHistory, TrainingCut, train, training_precision  # noqa: E402

EVALUATION_ARTIFACT = "evaluation.json"
BASE_UNUSABLE_ROLE = "base-unusable"  # a cached base model whose artifacts cannot be read


@dataclass(frozen=True)
class RunResult:
    """What a finished training run produced, and where it is in MLflow."""

    run_id: str
    val: Evaluation
    test: Evaluation
    history: TrainHistory
    state_dict: dict[str, torch.Tensor]
    seconds: float


def final_metrics(val: Evaluation, test: Evaluation) -> dict[str, float]:
    """The metrics every finished run carries in MLflow: val_/test_ accuracy and SynOps, energy
    per chip. For people comparing runs in the UI; the pipeline reads `evaluation.json`."""
    energy = {f"test_energy_uj_{chip}": e for chip, e in energy_per_sample(test.synops_mean).items()}
    return val.metrics("val") | test.metrics("test") | energy


def curves_figure(history: TrainHistory) -> Any:
    """The training curves: loss parts and SynOps per step."""
    fig, (loss_ax, synops_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_ax.plot(history.step_task_loss, label="cross-entropy")
    if any(history.step_penalty_loss):
        loss_ax.plot(history.step_penalty_loss, label="SynOps penalty")
    loss_ax.set(xlabel="training step", ylabel="loss", yscale="log", title="Loss")
    loss_ax.legend()
    synops_ax.plot(history.step_synops)
    synops_ax.set(xlabel="training step", ylabel="SynOps per sample", title="Train SynOps")
    fig.tight_layout()
    return fig


def run_params(config: ExperimentConfig) -> dict[str, Any]:
    """A training run's MLflow params: what defines it (the study's settings are its parent's)."""
    values = config.to_dict()
    for table in ("study", "report", "snn"):
        values.pop(table)
    return flatten(values)


def run_tracked(
    config: ExperimentConfig,
    dataset: Dataset,
    tracker: Tracker,
    experiment_id: str,
    tags: Mapping[str, str],
    *,
    init_state: Mapping[str, torch.Tensor] | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    extra_params: Mapping[str, Any] | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    on_start: Callable[[str], None] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> RunResult:
    """Train `config.train` as one run, starting from `init_state` if given. `on_start` receives
    the run id as soon as the run exists (so a crash can be traced to it), `on_epoch` each
    epoch's numbers (for log lines where there are no progress bars).

    A run that raises (a diverging loss included) ends FAILED, one interrupted or cut short on
    purpose (`TrainingCut`) ends KILLED, with the reason in the tag `synops.failure_reason`; the
    exception is re-raised for the caller.
    """
    started = time.perf_counter()
    run = tracker.start_run(experiment_id, run_name or "run", tags, parent_run_id)
    try:
        if on_start is not None:
            on_start(run.run_id)
        used = training_precision(config.train.precision, config.device)
        run.log_params(run_params(config) | {"train.precision_used": used} | dict(extra_params or {}))
        run.log_text(config.to_toml(), "config.toml")
        model = build_model(config.model, dataset.input_shape, dataset.num_classes).to(config.device)
        if init_state is not None:
            model.load_state_dict(init_state)

        def log_epoch(stats: EpochStats) -> None:
            values = dataclasses.asdict(stats)
            epoch = values.pop("epoch")
            run.log_metrics({f"epoch_{k}": v for k, v in values.items()}, step=epoch)
            if on_epoch is not None:
                on_epoch(stats)

        history = train(model, dataset, config.train, on_epoch=log_epoch, progress=progress,
                        should_stop=should_stop)
        # The last epoch's validation is the final one (the model has not changed since).
        val = history.final_val or evaluate(model, dataset.val)
        test = evaluate(model, dataset.test)
        run.log_metrics(final_metrics(val, test))
        run.log_json({"val": val.to_record(), "test": test.to_record()}, EVALUATION_ARTIFACT)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        run.log_checkpoint(state)
        figure = curves_figure(history)
        run.log_figure(figure, "curves.png")
        plt.close(figure)
    except BaseException as err:
        with shielded():
            run.fail(f"{type(err).__name__}: {err}",
                     "KILLED" if isinstance(err, KeyboardInterrupt | TrainingCut) else "FAILED")
        raise
    run.finish()
    return RunResult(run.run_id, val, test, history, state, time.perf_counter() - started)


@dataclass(frozen=True)
class BaseModel:
    """The unpenalised model that fine-tuning starts from, and how it scored."""

    run_id: str
    state_dict: dict[str, torch.Tensor]
    val: Evaluation
    test: Evaluation


def load_base_model(tracker: Tracker, run_id: str) -> BaseModel:
    """A logged base model, read back typed; `TrackingError` if its artifacts are unreadable."""
    evaluations = tracker.load_json(run_id, EVALUATION_ARTIFACT)
    return BaseModel(run_id, tracker.load_checkpoint(run_id),
                     Evaluation.from_record(evaluations["val"]),
                     Evaluation.from_record(evaluations["test"]))


def ensure_base_model(
    config: ExperimentConfig, dataset: Dataset, tracker: Tracker, experiment_id: str,
    fingerprints: Mapping[str, str], progress: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> BaseModel:
    """Reuse the finished base-model run for this data + model + pretraining, or train and log one.

    Runs are matched by `ExperimentConfig.base_model_key(fingerprints)` (the data's and the
    network's fingerprints included), so changing any of those retrains. A cached run whose
    checkpoint is missing or truncated is re-tagged `base-unusable` (with the reason) and a new
    base model is trained.
    """
    if config.pretrain is None:
        raise ValueError("the config has no [pretrain] table, so there is no base model")
    key = config.base_model_key(fingerprints)
    tags = {TAG_ROLE: "base", TAG_BASE_KEY: key}
    run_id = tracker.find_finished_run(experiment_id, tags)
    if run_id is not None:
        try:
            return load_base_model(tracker, run_id)
        except TrackingError as err:
            print(f"the cached base model cannot be used, training it again: {err}", file=sys.stderr)
            tracker.set_tag(run_id, TAG_ROLE, BASE_UNUSABLE_ROLE)
            tracker.set_tag(run_id, "synops.unusable_reason", str(err)[:5000])
    base_config = dataclasses.replace(config, train=config.pretrain, pretrain=None)
    result = run_tracked(base_config, dataset, tracker, experiment_id, tags,
                         run_name=f"base-{key[:8]}", progress=progress, should_stop=should_stop,
                         on_epoch=on_epoch)
    return BaseModel(result.run_id, result.state_dict, result.val, result.test)


def _checkpoint_for(network: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The state dict at `path`, checked to fit `network`; `ConfigError("train.init_from")` if it
    cannot be read or does not fit."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        network.load_state_dict(state)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError("train.init_from", f"cannot start from checkpoint {path}: {err}") from None
    return state


def run_experiment(config: ExperimentConfig, tracking_uri: str, progress: bool = True,
                   should_stop: Callable[[], bool] = lambda: False,
                   on_epoch: Callable[[str, EpochStats], None] | None = None) -> RunResult:
    """`synops train`: load and check the data and the network (a `ConfigError` before the
    tracking store is opened), warm-start as configured (`train.init_from`, else the base model,
    else from scratch), train, evaluate, log. `on_epoch` gets the stage's name with each epoch's
    numbers."""
    dataset = load_dataset(config.data)
    network = build_model(config.model, dataset.input_shape, dataset.num_classes)
    check_network(network, dataset.train.images, dataset.num_classes)
    fingerprints = base_fingerprints(dataset.fingerprint, model_fingerprint(config.model, network))
    tags = {TAG_ROLE: "train"}
    init_state = None
    if config.train.init_from:
        init_state = _checkpoint_for(network, Path(config.train.init_from))
        tags["synops.init_from"] = config.train.init_from
    dataset = dataset.to(config.device)
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.experiment(config.name)
    if init_state is None and config.pretrain is not None:
        base = ensure_base_model(config, dataset, tracker, experiment_id, fingerprints, progress,
                                 should_stop, on_epoch and (lambda stats: on_epoch("base model", stats)))
        init_state, tags["synops.base_run_id"] = base.state_dict, base.run_id
    return run_tracked(config, dataset, tracker, experiment_id, tags, init_state=init_state,
                       run_name="train", progress=progress, should_stop=should_stop,
                       on_epoch=on_epoch and (lambda stats: on_epoch("train", stats)))
