"""The confirmation stage: once the study has `n_trials` finished trials, front members are
fine-tuned again from the same start with `study.confirm_seeds` further seeds, so that choices are
made on seed means rather than on one lucky or unlucky run. By default (`study.confirm_members`
"choices") only the members a choice falls on are confirmed, one member at a time: a member's
means can move a choice to another member, which is confirmed next, until every choice is on
confirmed members.

Each confirmation is a child run of the study's parent run, tagged with the trial it confirms. A
claim (its run id) is stored in the study when it starts and the result when it finishes, so a
re-run does only what is missing, and one that died or was stopped is redone. Workers on several
machines that finish together take turns under a lease: the first confirms, the others then find
nothing left to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

from pipeline.config import ExperimentConfig, replace_train
from pipeline.errors import PipelineError
from pipeline.front import (
    ATTR_REFERENCE,
    CONFIRM_CLAIM_PREFIX,
    CONFIRM_RESULT_PREFIX,
    Confirmation,
    choose,
    chosen_trials,
    confirm_key,
    confirmations,
)
from pipeline.run import RunResult, run_tracked
from pipeline.sweep.lease import Lease, lease, lease_name
from pipeline.sweep.objective import VariantBases
from pipeline.sweep.space import reference_config, suggest_config
from pipeline.sweep.storage import PreparedStudy
from pipeline.tracking import TAG_ROLE, Tracker
from pipeline.variants import Variant


class ConfirmationError(PipelineError, RuntimeError):
    """Some confirmations failed (each run records why); the others are kept, and a re-run of the
    sweep redoes the failed ones."""


def pending(study: optuna.Study, config: ExperimentConfig) -> list[tuple[FrozenTrial, int]]:
    """(front member, seed) pairs without a finished confirmation, members in trial order: of
    every member, or (`study.confirm_members` "choices") of those the choices made on the current
    means fall on (`chosen_trials`)."""
    seeds = [config.train.seed + i for i in range(1, config.study.confirm_seeds + 1)]
    done = {(c.trial, c.seed) for found in confirmations(study).values() for c in found}
    members = sorted(study.best_trials, key=lambda t: t.number)
    if config.study.confirm_members == "choices":
        chosen = chosen_trials(choose(study), config.report.budgets)
        members = [t for t in members if t.number in chosen]
    return [(t, seed) for t in members for seed in seeds if (t.number, seed) not in done]


def close_dead_confirmations(study: optuna.Study, tracker: Tracker) -> None:
    """Mark KILLED the runs of confirmations whose process died (claimed, no result, RUNNING)."""
    attrs = study.user_attrs
    for key, run_id in attrs.items():
        result = CONFIRM_RESULT_PREFIX + key.removeprefix(CONFIRM_CLAIM_PREFIX)
        if key.startswith(CONFIRM_CLAIM_PREFIX) and result not in attrs \
                and tracker.status(run_id) == "RUNNING":
            tracker.close(run_id, "KILLED", "confirmation process died; redone on the next run")


def member_config(trial: FrozenTrial, prepared: PreparedStudy, config: ExperimentConfig,
                  bases: VariantBases, seed: int) -> tuple[ExperimentConfig, Variant, bool]:
    """The member's own config (variant and fine-tuning) with another seed, its variant, and
    whether it starts from its variant's base model (the tutorial's reference trial trains from
    scratch)."""
    if trial.user_attrs.get(ATTR_REFERENCE):
        variant = bases.inputs.reference_variant
        return replace_train(reference_config(config, variant), seed=seed), variant, False
    tried, variant = suggest_config(optuna.trial.FixedTrial(trial.params), prepared.record.bounds,
                                    config, bases.target_range)
    return replace_train(tried, seed=seed), variant, True


def confirmation_line(trial: int, seed: int, result: RunResult) -> str:
    return (f"confirm trial {trial:3d} seed {seed} | val {result.val.accuracy:.2%} "
            f"{result.val.synops_mean:.3g} | test {result.test.accuracy:.2%} "
            f"{result.test.synops_mean:.3g} | {result.seconds:.0f} s")


def confirm_front(config: ExperimentConfig, prepared: PreparedStudy, bases: VariantBases,
                  progress: bool, should_stop: Callable[[], bool], echo: Callable[[str], None]) -> int:
    """Run the missing confirmations (`pending`, again after each member, as its means can move
    a choice) until none is left; returns how many ran. A confirmation that fails is
    reported (a line to `echo`, its run FAILED with the reason), not retried in this call, and the
    others are still run; then `ConfirmationError` (exit 1) names every failure, the finished ones
    kept and the failed ones left for the next run. A stop request raises KeyboardInterrupt."""
    study = config.study
    with lease(prepared.storage, lease_name(config.name, "confirm"), study.wait_timeout, echo,
               should_stop) as held:
        return _confirm(config, prepared, bases, progress, should_stop, echo, held)


def _confirm(config: ExperimentConfig, prepared: PreparedStudy, bases: VariantBases,
             progress: bool, should_stop: Callable[[], bool], echo: Callable[[str], None],
             held: Lease) -> int:
    study = prepared.study
    close_dead_confirmations(study, bases.training.tracker)
    ran, failures, tried = 0, [], set()
    # One member at a time, then `pending` again: its means can move a choice away from members
    # that were still waiting.
    while todo := [(t, s) for t, s in pending(study, config) if (t.number, s) not in tried]:
        member = todo[0][0].number
        for trial, seed in [(t, s) for t, s in todo if t.number == member]:
            tried.add((trial.number, seed))
            ran += _confirm_one(config, prepared, bases, progress, should_stop, echo, held,
                                trial, seed, failures)
    if failures:
        shown = "; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else "")
        raise ConfirmationError(
            f"{len(failures)} of {len(tried)} confirmations failed ({shown}). The {ran} others are "
            "kept; fix the cause and re-run `synops sweep` to redo the failed ones (those a choice "
            "still falls on, with study.confirm_members = \"choices\")")
    return ran


def _confirm_one(config: ExperimentConfig, prepared: PreparedStudy, bases: VariantBases,
                 progress: bool, should_stop: Callable[[], bool], echo: Callable[[str], None],
                 held: Lease, trial: FrozenTrial, seed: int, failures: list[str]) -> int:
    """One confirmation run, its result stored in the study: 1 if it finished, 0 if it failed
    (the reason appended to `failures`)."""
    study, record, tracker = prepared.study, prepared.record, bases.training.tracker
    if should_stop():
        raise KeyboardInterrupt("stop requested between confirmations")
    member, variant, from_base = member_config(trial, prepared, config, bases, seed)
    started = time.perf_counter()
    try:
        result = run_tracked(
            member, bases.data(variant), tracker, prepared.experiment_id,
            {TAG_ROLE: "confirmation", "synops.confirms_trial": str(trial.number),
             "synops.seed": str(seed), "synops.study": config.name},
            init_state=bases.state(variant) if from_base else None,
            run_name=f"confirm-{trial.number}-seed-{seed}",
            parent_run_id=record.parent_run_id,
            extra_params={f"search.{k}": v for k, v in trial.params.items()},
            progress=progress, should_stop=should_stop,
            on_start=lambda run_id: study.set_user_attr(
                confirm_key(CONFIRM_CLAIM_PREFIX, trial.number, seed), run_id),
        )
    except Exception as err:  # noqa: BLE001 - recorded on the run; the next run retries it
        echo(f"confirm trial {trial.number:3d} seed {seed} FAILED after "
             f"{time.perf_counter() - started:.0f} s: {type(err).__name__}: {err}")
        failures.append(f"trial {trial.number} seed {seed}: {type(err).__name__}: {err}")
        return 0
    confirmation = Confirmation(trial.number, seed, result.run_id, result.val, result.test)
    held.verify()  # a holder that lost the lease meanwhile must not record a confirmation
    study.set_user_attr(confirm_key(CONFIRM_RESULT_PREFIX, trial.number, seed),
                        confirmation.to_record())
    echo(confirmation_line(trial.number, seed, result))
    return 1
