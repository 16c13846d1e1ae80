"""Choices made from a study, on hand-made fronts: the knee, budgets, the hypervolume."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from pipeline.config import ExperimentConfig, ModelConfig, replace_train
from pipeline.evaluate import Evaluation
from pipeline.front import (
    KNEE_BULGE,
    KNEE_IDEAL,
    KNEE_SINGLE,
    Confirmation,
    SearchBounds,
    StudyRecord,
    best_within_budgets,
    choose_knee,
    front_table,
    hypervolume,
    hypervolume_history,
    hypervolume_reference,
    seed_noise,
    with_seed_means,
)
from pipeline.variants import Variant


def frame(points: list[tuple[int, float, float]]) -> pd.DataFrame:
    """(trial, val accuracy, val SynOps) rows, all on the front."""
    return pd.DataFrame([{"trial": t, "val_accuracy": a, "val_synops_mean": s, "on_front": True}
                         for t, a, s in points])


def knee_trial(points: list[tuple[int, float, float]]) -> tuple[int, str]:
    front = front_table(frame(points))
    knee = choose_knee(front)
    return int(front.loc[knee.row, "trial"]), knee.rule


def test_a_convex_front_takes_the_member_that_bulges_towards_the_ideal_corner() -> None:
    # Accuracy climbs fast, then flattens: trial 2 is the elbow.
    points = [(1, 0.90, 1e6), (2, 0.985, 2e6), (3, 0.988, 4e6), (4, 0.99, 8e6)]
    assert knee_trial(points) == (2, KNEE_BULGE)


def test_a_concave_front_takes_the_member_closest_to_the_ideal_point_not_the_most_concave() -> None:
    # The front of docs/report-mnist/front.csv (validation numbers): every interior member lies on
    # the far side of the chord. Farthest from the chord on either side was trial 23, the worst
    # compromise; closest to the ideal corner is trial 28.
    points = [(6, 0.9856, 15048014.9), (22, 0.9860, 16897810.0), (28, 0.9866, 21303328.3),
              (23, 0.9872, 24822475.1), (17, 0.9886, 29364881.0)]
    assert knee_trial(points) == (28, KNEE_IDEAL)


def test_a_single_member_is_its_own_knee() -> None:
    assert knee_trial([(7, 0.9, 1e6)]) == (7, KNEE_SINGLE)


def test_two_members_tie_on_distance_and_the_more_accurate_wins() -> None:
    assert knee_trial([(1, 0.90, 1e6), (2, 0.95, 4e6)]) == (2, KNEE_IDEAL)


def test_duplicate_members_do_not_break_the_choice() -> None:
    points = [(1, 0.90, 1e6), (2, 0.985, 2e6), (5, 0.985, 2e6), (3, 0.988, 4e6), (4, 0.99, 8e6)]
    trial, rule = knee_trial(points)
    assert (trial, rule) in ((2, KNEE_BULGE), (5, KNEE_BULGE))
    same = [(1, 0.9, 1e6), (2, 0.9, 1e6)]
    assert knee_trial(same)[0] in (1, 2)


def test_the_best_within_a_budget_is_chosen_on_validation_and_ties_take_fewer_synops() -> None:
    table = frame([(1, 0.95, 1e6), (2, 0.97, 3e6), (3, 0.97, 2e6), (4, 0.99, 9e6)])
    chosen = {budget: (None if row is None else int(row["trial"]))
              for budget, row in best_within_budgets(table, [5e5, 2.5e6, 3e6, 1e7])}
    assert chosen == {5e5: None, 2.5e6: 3, 3e6: 3, 1e7: 4}


def test_hypervolume_of_a_staircase_in_error_and_log_synops() -> None:
    # Reference: accuracy 0.5 (error 0.5) and 1e4 SynOps (log10 4). Two points: (0.9, 100) is
    # (error 0.1, log 2), (0.7, 10) is (error 0.3, log 1). Area, cheapest first:
    # (4 - 1) * (0.5 - 0.3) + (4 - 2) * (0.3 - 0.1) = 0.6 + 0.4.
    assert hypervolume([(0.9, 100.0), (0.7, 10.0)], (0.5, 1e4)) == pytest.approx(1.0)
    # (0.8, 1000) is dominated by (0.9, 100): only (4 - 2) * (0.5 - 0.1) counts.
    assert hypervolume([(0.9, 100.0), (0.8, 1000.0)], (0.5, 1e4)) == pytest.approx(0.8)
    # Below the reference accuracy or beyond its SynOps, a point adds nothing.
    assert hypervolume([(0.4, 100.0), (0.9, 2e4)], (0.5, 1e4)) == 0.0


def test_halving_the_low_end_of_the_front_grows_the_hypervolume_by_its_area_in_log_synops() -> None:
    # Reference: chance on 10 classes (error 0.9) and 1e8 SynOps (log10 8).
    reference = (0.1, 1e8)
    before = [(0.85, 4e5), (0.95, 2e6), (0.99, 1e7)]
    after = [*before, (0.85, 2e5)]  # the cheapest member again, at half its SynOps
    # By hand, cheapest first: (8 - log10 4e5) * (0.9 - 0.15) + (8 - log10 2e6) * (0.15 - 0.05)
    # + (8 - 7) * (0.05 - 0.01) = 2.39794 * 0.75 + 1.69897 * 0.1 + 0.04 = 2.00835; halving adds
    # log10(2) * (0.9 - 0.15) = 0.30103 * 0.75 = 0.22577, 11% more. On linear SynOps from the same
    # reference it added 2e5 * 0.75 = 1.5e5 to 8.4e7, 0.18%: the progress figure stayed flat.
    assert hypervolume(before, reference) == pytest.approx(2.00835, abs=1e-5)
    assert hypervolume(after, reference) - hypervolume(before, reference) == pytest.approx(0.22577, abs=1e-5)


def record(num_classes: int, config: ExperimentConfig | None = None,
           target_synops: tuple[float, float] = (0.0, 0.0)) -> StudyRecord:
    """A study's record before any base model is trained."""
    config = config or ExperimentConfig(name="x", model=ModelConfig())
    bounds = SearchBounds((1.0, 2.0), target_synops, ("hinge",), None, None, (Variant(255), Variant(7)))
    return StudyRecord("x", config, bounds, {}, "parent", "intensity", num_classes, {})


def test_the_hypervolume_reference_needs_no_base_model() -> None:
    # Chance accuracy, and a decade above the largest SynOps the stored config names: its own
    # target (4e7 by default, 2e7 here; the tutorial recipe's 4e7 only when its trial runs) or an
    # explicit upper bound of the searched targets.
    config = replace_train(ExperimentConfig(name="x", model=ModelConfig()), target_synops=2e7)
    assert hypervolume_reference(record(10, config)) == (0.1, 4e8)
    study = dataclasses.replace(config.study, reference_trial=False)
    assert hypervolume_reference(record(10, dataclasses.replace(config, study=study))) == (0.1, 2e8)
    assert hypervolume_reference(record(4, config, (0.0, 6e7))) == (0.25, 6e8)


def test_the_hypervolume_reference_is_chance_level_so_a_harder_dataset_still_has_a_volume() -> None:
    # Fashion-MNIST trials reach ~87%: a fixed 90% reference accuracy made the hypervolume 0.
    reference = hypervolume_reference(record(10))
    trials = frame([(0, 0.85, 3e7), (1, 0.87, 4e7), (2, 0.84, 2e7)])
    history = hypervolume_history(trials, reference)
    assert list(history.index) == [0, 1, 2]
    assert 0 < history[0] < history[1] < history[2]


def confirmed(accuracies: list[float], samples: int) -> list[Confirmation]:
    return [Confirmation(1, seed, f"run-{seed}", evaluation, evaluation)
            for seed, a in enumerate(accuracies, start=2)
            for evaluation in [Evaluation(accuracy=a, samples=samples, synops_mean=1e6,
                                          synops_per_layer={"0": 1.0})]]


def member(accuracy: float, samples: int) -> pd.DataFrame:
    """Trial 1 alone on the front: its selection run."""
    return pd.DataFrame([{"trial": 1, "val_accuracy": accuracy, "val_synops_mean": 1e6,
                          "val_samples": samples, "test_accuracy": accuracy,
                          "test_synops_mean": 1e6, "on_front": True}])


def test_the_seed_means_leave_out_the_run_that_put_the_member_on_the_front() -> None:
    # Trial 1 reached the front with a lucky 99%; its two confirmations score 97% and 96%. The
    # mean that confirms it is theirs: (0.97 + 0.96) / 2, not (0.99 + 0.97 + 0.96) / 3.
    (row,) = with_seed_means(member(0.99, 5000), {1: confirmed([0.97, 0.96], 5000)}).to_dict("records")
    assert row["seeds"] == 2 and row["mean_over"] == "confirmations"
    assert row["val_accuracy_mean"] == pytest.approx(0.965)
    assert row["test_accuracy_mean"] == pytest.approx(0.965)
    assert row["val_accuracy_sd"] == pytest.approx(math.sqrt(0.00005))
    (alone,) = with_seed_means(member(0.99, 5000), {}).to_dict("records")
    assert alone["seeds"] == 1 and alone["mean_over"] == "selection run"
    assert alone["val_accuracy_mean"] == pytest.approx(0.99)


def test_a_seed_mean_over_two_runs_takes_students_t_with_one_degree_of_freedom() -> None:
    # On a billion images the images' term vanishes: mean 0.50, sd 0.014142 over 2 seeds, so the
    # standard error is 0.01 and the half-width t(0.975, 1) * 0.01 = 12.706 * 0.01 (1.96 * 0.01
    # with the normal quantile).
    (row,) = with_seed_means(member(0.6, 10**9), {1: confirmed([0.49, 0.51], 10**9)}).to_dict("records")
    assert (row["val_mean_low"], row["val_mean_high"]) == pytest.approx((0.37294, 0.62706), abs=1e-5)


def test_a_seed_mean_with_the_images_noise_takes_satterthwaites_degrees_of_freedom() -> None:
    # Runs 0.79 and 0.81 on 1600 images: images' variance 0.8 * 0.2 / 1600 = 1e-4, seeds' variance
    # of the mean 0.014142^2 / 2 = 1e-4. Only the second is estimated (1 degree of freedom), so
    # df = (1e-4 + 1e-4)^2 / (1e-4^2 / 1) = 4, t(0.975, 4) = 2.7764, half-width
    # 2.7764 * sqrt(2e-4) = 0.039265.
    (row,) = with_seed_means(member(0.9, 1600), {1: confirmed([0.79, 0.81], 1600)}).to_dict("records")
    assert (row["val_mean_low"], row["val_mean_high"]) == pytest.approx((0.760735, 0.839265), abs=1e-5)


def test_every_accuracy_interval_stays_within_zero_and_one() -> None:
    (high,) = with_seed_means(member(1.0, 1000), {1: confirmed([0.999, 0.989], 1000)}).to_dict("records")
    assert high["val_mean_high"] == 1.0 and 0.0 <= high["val_mean_low"] < 0.994
    (low,) = with_seed_means(member(0.02, 1000), {1: confirmed([0.001, 0.011], 1000)}).to_dict("records")
    assert low["val_mean_low"] == 0.0 and low["val_mean_high"] > 0.006


def test_the_budget_tie_rule_pools_the_seed_noise_of_every_member() -> None:
    # The best (99.00%) is a mean over 3 seeds with variance 6e-6, the cheaper one (98.55%) over 2
    # with 2e-6. Pooled: s^2 = (2 * 6e-6 + 1 * 2e-6) / 3 = 4.667e-6, s = 0.0021602 on 3 degrees of
    # freedom; margin t(0.975, 3) * s * sqrt(1/3 + 1/2) = 3.1824 * 0.0021602 * 0.91287 = 0.0062757:
    # the 0.45-point gap is a tie and the cheaper one is chosen; a 0.70-point gap is not.
    table = pd.DataFrame([
        {"trial": 1, "val_accuracy": 0.9855, "val_synops_mean": 1e6, "val_accuracy_sd": math.sqrt(2e-6),
         "seeds": 2},
        {"trial": 2, "val_accuracy": 0.9900, "val_synops_mean": 2e6, "val_accuracy_sd": math.sqrt(6e-6),
         "seeds": 3}])
    noise = seed_noise(table)
    assert (noise.df, noise.sd) == (3, pytest.approx(0.0021602, rel=1e-4))
    assert noise.margin(3, 2) == pytest.approx(0.0062757, rel=1e-4)
    assert int(best_within_budgets(table, [3e6])[0][1]["trial"]) == 1
    assert int(best_within_budgets(table.assign(val_accuracy=[0.9830, 0.99]), [3e6])[0][1]["trial"]) == 2


def test_one_noisy_member_does_not_tie_a_point_and_more_to_the_best() -> None:
    # The default study's front (validation means over 2 confirmation seeds each). Judged by its own
    # 2 seeds and the best's (Welch, about 1 degree of freedom, t = 12), trial 27 (97.79%, sd 0.16
    # points) "tied" with trial 15 (98.96%) 1.17 points above it, and the 8e5 budget quoted a
    # network less accurate than the 5e5 budget's. The pooled noise (sd 0.095 points, 9 degrees of
    # freedom) ties only members within 0.21 points.
    front = pd.DataFrame([
        {"trial": t, "val_accuracy": a, "val_accuracy_sd": sd, "val_synops_mean": s, "seeds": 2}
        for t, a, sd, s in ((28, 0.9694, 0.0020, 2.09e5), (27, 0.9779, 0.0016, 2.22e5),
                            (14, 0.9812, 0.0006, 2.41e5), (25, 0.9833, 0.0004, 2.45e5),
                            (0, 0.9853, 0.0004, 3.35e5), (11, 0.9883, 0.0004, 3.76e5),
                            (29, 0.9891, 0.0007, 4.58e5), (15, 0.9896, 0.0003, 5.18e5),
                            (7, 0.9913, 0.0004, 1.02e6))])
    chosen = {budget: int(row["trial"]) for budget, row in best_within_budgets(front, [5e5, 8e5, 2e6])}
    assert chosen == {5e5: 11, 8e5: 11, 2e6: 15}
