"""Numbers a user chooses from, with their noise: Wilson intervals, seed repeats of the front (the
confirmation stage) and choices made on the seed means."""

from __future__ import annotations

import dataclasses
import functools
import json
import urllib.parse
from pathlib import Path

import optuna
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.evaluate import Evaluation
from pipeline.front import (
    Confirmation,
    best_within_budgets,
    choice_of,
    choose,
    choose_knee,
    chosen_trials,
    confirmations,
    detectable_difference,
    indistinguishable_neighbours,
    on_means,
    wilson_interval,
)
from pipeline.inputs import load_inputs
from pipeline.sweep.bases import BaseTraining
from pipeline.sweep.confirm import ConfirmationError, confirm_front, pending
from pipeline.sweep.objective import VariantBases
from pipeline.sweep.workers import run_sweep
from pipeline.tracking import TAG_ROLE, Tracker
from tests.conftest import EXPERIMENTS, prepare, smoke_overrides


@pytest.mark.parametrize(("hits", "n", "low", "high"), [
    (95, 100, 0.8883, 0.9785),  # Newcombe (1998), and statsmodels' proportion_confint(method="wilson")
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
])
def test_the_wilson_interval_matches_published_values(hits: int, n: int, low: float, high: float) -> None:
    assert wilson_interval(hits / n, n) == pytest.approx((low, high), abs=1e-4)


def test_the_detectable_difference_on_5000_validation_images() -> None:
    # 98.7% measured twice on 5,000 images: 1.96 * sqrt(2 * 0.987 * 0.013 / 5000) = 0.44 points.
    assert detectable_difference(0.987, 5000) == pytest.approx(0.00444, abs=1e-5)


def evaluation(accuracy: float, synops: float) -> Evaluation:
    return Evaluation(accuracy=accuracy, samples=5000, synops_mean=synops, synops_per_layer={"0": 1.0})


def hand_made_front() -> tuple[pd.DataFrame, dict[int, list[Confirmation]]]:
    """Three members; trial 2's first run was lucky: on the means it is dominated by trial 1."""
    rows = [(1, 0.985, 1.0e6), (2, 0.990, 1.5e6), (3, 0.992, 3.0e6)]
    front = pd.DataFrame([{"trial": t, "val_accuracy": a, "val_synops_mean": s, "val_samples": 5000,
                           "test_accuracy": a, "test_synops_mean": s, "on_front": True}
                          for t, a, s in rows])
    repeats = {1: [0.986, 0.984], 2: [0.978, 0.976], 3: [0.993, 0.991]}
    found = {t: [Confirmation(t, seed, f"run-{t}-{seed}", evaluation(a, s), evaluation(a, s))
                 for seed, a in enumerate(repeats[t], start=2)] for t, _, s in rows}
    return front, found


def test_choices_are_made_on_the_seed_means() -> None:
    from pipeline.front import with_seed_means

    front, found = hand_made_front()
    single = front.sort_values("val_synops_mean").reset_index(drop=True)
    assert int(single.loc[choose_knee(single).row, "trial"]) == 2  # the lucky run is the knee

    members = with_seed_means(front, found)
    assert members["seeds"].tolist() == [2, 2, 2]  # the confirmations; the selection run is left out
    assert members.loc[1, "val_accuracy_mean"] == pytest.approx(0.977, abs=1e-5)
    assert members["dominated_on_means"].tolist() == [False, True, False]
    candidates = on_means(members)
    assert candidates["trial"].tolist() == [1, 3]
    assert int(candidates.loc[choose_knee(candidates).row, "trial"]) != 2
    ((_, within),) = best_within_budgets(candidates, [2e6])
    assert int(within["trial"]) == 1  # trial 2's 99.0% was one run; its mean is below trial 1's
    assert indistinguishable_neighbours(members) == [(1, 2)]  # trial 2 spreads widely


def test_confirming_the_choices_follows_a_choice_that_moves_until_all_are_confirmed() -> None:
    """Five members, one budget of 4e6 SynOps. On single runs the knee is trial 2 (it bulges
    farthest towards the ideal corner) and the budget's most accurate member and pick is trial 4:
    both are confirmed. Trial 4's confirmations show its run was lucky: dominated on the means by
    trial 3, which becomes the budget's most accurate member (the one ties are judged against), so
    trial 3 is confirmed next. On its seeds it is 0.35 points above trial 2, beyond the seed noise
    (t at 2 df times the pooled sd): trial 3 is the pick. Trials 1 and 5, which no choice fell on,
    are never confirmed."""
    rows = [(1, 0.970, 1.0e6), (2, 0.985, 1.5e6), (3, 0.988, 2.0e6), (4, 0.990, 3.0e6), (5, 0.991, 5.0e6)]
    front = pd.DataFrame([{"trial": t, "val_accuracy": a, "val_synops_mean": s, "val_samples": 5000,
                           "test_accuracy": a, "test_synops_mean": s, "on_front": True}
                          for t, a, s in rows])
    synops = {t: s for t, _, s in rows}
    repeats = {2: [0.9845, 0.9855], 3: [0.9880, 0.9890], 4: [0.9835, 0.9845]}
    found: dict[int, list[Confirmation]] = {}
    rounds = []
    while (chosen := chosen_trials(choice_of(front, found), [4e6]) - set(found)) and len(rounds) < 5:
        rounds.append(sorted(chosen))
        found |= {t: [Confirmation(t, seed, f"run-{t}-{seed}", evaluation(a, synops[t]),
                                   evaluation(a, synops[t]))
                      for seed, a in enumerate(repeats.get(t, []), start=2)] for t in chosen}
    assert rounds == [[2, 4], [3]]
    final = choice_of(front, found)
    assert chosen_trials(final, [4e6]) == {2, 3}
    assert int(best_within_budgets(final.candidates, [4e6])[0][1]["trial"]) == 3
    assert int(final.knee_member["trial"]) == 2


def test_the_budget_table_prefers_fewer_synops_when_the_seeds_cannot_tell_members_apart() -> None:
    def table(sd: float) -> pd.DataFrame:
        return pd.DataFrame([{"trial": t, "val_accuracy": a, "val_synops_mean": s,
                              "val_accuracy_sd": sd, "seeds": 3}
                             for t, a, s in ((1, 0.9860, 1.5e7), (2, 0.9880, 1.7e7))])

    # 0.2 points apart: with seed sd 0.05 points that is 4.9 standard errors, so trial 2 is better;
    # with seed sd 0.3 points the two cannot be told apart and the cheaper one is chosen.
    assert int(best_within_budgets(table(0.0005), [2e7])[0][1]["trial"]) == 2
    assert int(best_within_budgets(table(0.003), [2e7])[0][1]["trial"]) == 1
    single = table(float("nan")).drop(columns=["val_accuracy_sd", "seeds"])
    assert int(best_within_budgets(single, [2e7])[0][1]["trial"]) == 2


@pytest.fixture
def swept(idx_root: Path, tmp_path: Path):
    """A smoke study run without confirmations, and what confirm_front needs."""
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root)
                         | {"study.n_trials": 3, "study.confirm_seeds": 0})
    run_sweep(config, storage, uri, progress=False, echo=lambda line: None)
    config = dataclasses.replace(config, study=dataclasses.replace(  # every member: 2 runs each
        config.study, confirm_seeds=2, confirm_members="front"))
    tracker = Tracker(uri)
    prepared = prepare(config, storage, uri)
    bases = VariantBases(config, prepared, load_inputs(config),
                         BaseTraining(tracker, prepared.experiment_id, progress=False))
    confirm = functools.partial(confirm_front, config, prepared, bases, False)
    return config, prepared, tracker, confirm


def confirmation_runs(tracker: Tracker, prepared) -> list:
    client = MlflowClient(tracker.uri)
    return [r for r in client.search_runs([prepared.experiment_id])
            if r.data.tags.get(TAG_ROLE) == "confirmation"]


def test_a_stopped_confirmation_is_redone_and_none_is_duplicated(swept) -> None:
    config, prepared, tracker, confirm = swept
    study = prepared.study
    expected = 2 * len(study.best_trials)
    calls = iter(range(1_000_000))
    with pytest.raises(KeyboardInterrupt):  # stop inside the first confirmation's training
        confirm(lambda: next(calls) >= 1, lambda line: None)
    (stopped,) = confirmation_runs(tracker, prepared)
    assert stopped.info.status == "KILLED"
    assert len(pending(study, config)) == expected

    lines: list[str] = []
    assert confirm(lambda: False, lines.append) == expected
    assert len(lines) == expected and not pending(study, config)
    runs = confirmation_runs(tracker, prepared)
    assert len(runs) == expected + 1
    assert sum(r.info.status == "FINISHED" for r in runs) == expected
    assert sum(len(c) for c in confirmations(study).values()) == expected
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == prepared.record.parent_run_id
        assert int(run.data.tags["synops.confirms_trial"]) in {t.number for t in study.best_trials}

    assert confirm(lambda: False, lines.append) == 0  # a re-run adds nothing
    assert len(confirmation_runs(tracker, prepared)) == expected + 1


def test_a_confirmation_whose_process_died_is_closed_and_redone(swept) -> None:
    config, prepared, tracker, confirm = swept
    study = prepared.study
    (trial, seed), *_ = [(t.number, s) for t, s in pending(study, config)]
    # What a SIGKILL leaves: the claim stored, the run RUNNING, no result.
    orphan = tracker.start_run(prepared.experiment_id, "confirm-orphan", {TAG_ROLE: "confirmation"},
                               prepared.record.parent_run_id)
    study.set_user_attr(f"confirm_claim.{trial}.{seed}", orphan.run_id)
    assert confirm(lambda: False, lambda line: None) == 2 * len(study.best_trials)
    assert tracker.status(orphan.run_id) == "KILLED"
    redone = [c for c in confirmations(optuna.load_study(study_name="smoke", storage=study._storage))
              .get(trial, []) if c.seed == seed]
    assert len(redone) == 1 and redone[0].run_id != orphan.run_id


def test_confirming_the_choices_confirms_every_member_a_choice_falls_on_and_no_other(
        idx_root: Path, tmp_path: Path) -> None:
    """Only the knee is chosen (no budgets): the stage confirms it, and any member the knee moves
    to on the means, until the knee is on a confirmed member; the rest of the front is not run."""
    storage, uri = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root)
                         | {"study.n_trials": 6, "study.confirm_members": "choices", "report.budgets": []})
    lines: list[str] = []
    study = run_sweep(config, storage, uri, progress=False, echo=lines.append)
    found = confirmations(study)
    front = {t.number for t in study.best_trials}
    assert len(front) >= 2 and set(found) < front  # fewer members than the front's
    assert all(len(runs) == 1 for runs in found.values())  # smoke.toml: confirm_seeds = 1
    assert sum(line.startswith("confirm trial") for line in lines) == len(found)
    assert chosen_trials(choose(study), []) <= set(found)
    assert not pending(study, config)
    everyone = dataclasses.replace(config, study=dataclasses.replace(config.study, confirm_members="front"))
    assert len(pending(study, everyone)) == len(front) - len(found)


# Failures are reported as failures: a confirmation, the front's publication, the data's files.


def test_a_failed_confirmation_fails_the_stage_after_the_others_and_is_redone(swept) -> None:
    config, prepared, tracker, confirm = swept
    study, bases = prepared.study, confirm.args[2]
    expected = pending(study, config)
    # Confirmations whose training fails (a learning rate of 1e38 overflows float32): every member
    # fine-tuned from its base; the tutorial's reference trial, trained from scratch at the
    # tutorial's own rate, still succeeds if it is on the front.
    diverging = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=1e38))
    lines: list[str] = []
    with pytest.raises(ConfirmationError, match=r"confirmations failed.*re-run `synops sweep`") as raised:
        confirm_front(diverging, prepared, bases, False, lambda: False, lines.append)
    assert raised.value.exit_code == 1
    runs = confirmation_runs(tracker, prepared)
    assert len(runs) == len(expected)  # every confirmation was tried, not only up to the first failure
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert failed and f"{len(failed)} of {len(expected)} confirmations failed" in str(raised.value)
    for run in failed:  # each named with its reason, as its run records it
        assert run.data.tags["synops.failure_reason"] in str(raised.value)
    assert len(pending(study, config)) == len(failed)  # the finished ones are kept

    assert confirm(lambda: False, lines.append) == len(failed)  # a re-run redoes only those
    assert not pending(study, config)


def sweep_args(idx_root: Path, folder: Path, **overrides: object) -> list[str]:
    sets = smoke_overrides(idx_root) | {"study.confirm_seeds": 0, "study.space.spikes_per_pixel": [255]}
    return ["sweep", "--config", str(EXPERIMENTS / "smoke.toml"), "--quiet",
            "--storage", f"sqlite:///{folder / 'optuna.db'}", "--tracking-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            *[f"--set={k}={json.dumps(v)}" for k, v in (sets | overrides).items()]]


def test_a_front_that_cannot_be_published_fails_the_sweep_after_its_trials(
    idx_root: Path, tmp_path: Path
) -> None:
    config = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root)
                         | {"study.confirm_seeds": 0, "study.space.spikes_per_pixel": [255],
                            "study.n_trials": 2})
    prepared = prepare(config, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = prepared.record.parent_run_id
    # The parent run's artifact folder cannot be written (a file stands where it goes): a real
    # OSError from MLflow, while the trials' own runs write theirs.
    artifacts = Path(urllib.parse.urlparse(client.get_run(parent_id).info.artifact_uri).path)
    aside = artifacts.with_name("aside")
    if artifacts.exists():
        artifacts.rename(aside)
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_text("in the way")

    result = CliRunner().invoke(main, sweep_args(idx_root, tmp_path, **{"study.n_trials": 2}))
    assert result.exit_code == 1, result.output
    assert "the front could not be published" in result.output and "Error" in result.output
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2  # kept
    assert client.get_run(parent_id).info.status == "FINISHED"  # closed as the trials ended

    artifacts.unlink()
    if aside.exists():
        aside.rename(artifacts)
    again = CliRunner().invoke(main, sweep_args(idx_root, tmp_path, **{"study.n_trials": 2}))
    assert again.exit_code == 0, again.output
    assert "front.csv" in {a.path for a in client.list_artifacts(parent_id)}
