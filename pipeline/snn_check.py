"""The spiking check of a study's members: simulate each chosen member as a spiking network on the
test set, log the result to its MLflow run, and keep it in the study for the report."""

from __future__ import annotations

import dataclasses

import optuna

from pipeline.config import ConfigError, ExperimentConfig, SNNConfig
from pipeline.data import load_pixels
from pipeline.evaluate import SpikingEvaluation
from pipeline.front import (
    NoSuchTrialError,
    StudyRecord,
    TrialRecord,
    choose,
    finished_trials,
    snn_attr,
)
from pipeline.model import build_model
from pipeline.snn import simulate_with_progress
from pipeline.tracking import Tracker


def chosen_members(study: optuna.Study, trial: int | None, knee: bool) -> list[TrialRecord]:
    """The finished trial `trial`, the knee (`knee`), or else every front member."""
    records = {r.number: r for r in finished_trials(study)}
    choice = choose(study)
    if knee:
        trial = int(choice.knee_member["trial"])
    if trial is not None:
        if trial not in records:
            raise NoSuchTrialError(f"trial {trial} is not a finished trial "
                                    f"(finished: {', '.join(map(str, sorted(records)))})")
        return [records[trial]]
    return [records[int(n)] for n in choice.members["trial"]]


def require_enough_steps(settings: SNNConfig, encodings: dict[int, int]) -> None:
    """Refuse, before any simulation, settings that need a step per input spike (`single`,
    `rate`) with fewer steps than a member's encoding has spikes per pixel (`encodings`: trial
    number -> spikes per pixel)."""
    short = {n: k for n, k in encodings.items() if settings.needs_step_per_spike() and settings.steps < k}
    if short:
        listed = ", ".join(f"trial {n}: {k}" for n, k in sorted(short.items()))
        raise ConfigError("snn.steps", f"{settings.encoding} input with {settings.spike_fn}-spike "
                          f"neurons needs a step for each spike a pixel carries, at least "
                          f"{max(short.values())} here ({listed} spikes per pixel); "
                          f"got {settings.steps}")


def check_members(study: optuna.Study, members: list[TrialRecord], config: ExperimentConfig,
                  tracker: Tracker, progress: bool = True) -> list[SpikingEvaluation]:
    """Simulate `members` with `config.snn` on the study's test set (read from `config.data.root`)
    in each member's own input encoding, log each result to the member's run (metrics `snn_*`,
    settings as `snn.*` tags) and store it in the study (`snn_check.<trial>`), replacing an
    earlier check of the same member."""
    require_enough_steps(config.snn, {m.number: m.spikes_per_pixel for m in members})
    record = StudyRecord.load(study)
    data = dataclasses.replace(record.config.data, root=config.data.root,
                               verify_checksums=config.data.verify_checksums)
    pixels = load_pixels(data)
    results = []
    for member in members:
        model = build_model(record.config.model)
        model.load_state_dict(tracker.load_checkpoint(member.run_id))
        test = pixels.encoded(member.spikes_per_pixel).test
        result = simulate_with_progress(model, test, config.snn, f"trial {member.number}", progress)
        run = tracker.run(member.run_id)
        run.log_metrics(result.metrics())
        run.set_tags({f"snn.{k}": v for k, v in result.settings.items()})
        study.set_user_attr(snn_attr(member.number), result.to_record())
        results.append(result)
    return results


def describe(member: TrialRecord, result: SpikingEvaluation) -> str:
    """One line for people: accuracy, agreement and the SynOps measured against the estimate."""
    layers = ", ".join(f"{name} {v / result.ann_synops_per_layer[name]:.4f}"
                       for name, v in result.synops_per_layer.items())
    settings = result.settings
    return (f"trial {member.number}: SNN {result.accuracy:.2%} (ANN {result.ann_accuracy:.2%}, "
            f"{result.agreement:.1%} same predictions) at {result.synops_mean:.4g} SynOps = "
            f"{result.synops_ratio:.4f} x the ANN estimate (per layer: {layers}); "
            f"{result.samples} test images, {settings['encoding']} encoding, {settings['steps']} "
            f"steps, {settings['spike_fn']}-spike")
