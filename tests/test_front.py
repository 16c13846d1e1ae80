"""Choices made from a study, on hand-made fronts: the knee, budgets, the hypervolume."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.config import ExperimentConfig, ModelConfig
from pipeline.evaluate import Evaluation
from pipeline.front import (
    KNEE_BULGE,
    KNEE_IDEAL,
    KNEE_SINGLE,
    BaseRecord,
    SearchBounds,
    StudyRecord,
    best_within_budgets,
    choose_knee,
    front_table,
    hypervolume,
    hypervolume_history,
    hypervolume_reference,
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


def test_hypervolume_of_a_staircase() -> None:
    # Two points dominating (0.5, 10): (0.9, 2) and (0.7, 1).
    # Area: (10 - 1) * (0.7 - 0.5) + (10 - 2) * (0.9 - 0.7) = 1.8 + 1.6.
    assert hypervolume([(0.9, 2.0), (0.7, 1.0)], (0.5, 10.0)) == pytest.approx(3.4)
    assert hypervolume([(0.9, 2.0), (0.8, 3.0)], (0.5, 10.0)) == pytest.approx(8 * 0.4)
    assert hypervolume([(0.4, 2.0), (0.9, 11.0)], (0.5, 10.0)) == 0.0


def record(num_classes: int, base_synops: float) -> StudyRecord:
    evaluation = Evaluation(accuracy=0.8, samples=10, synops_mean=base_synops,
                            synops_per_layer={"0": 1.0})
    config = ExperimentConfig(name="x", model=ModelConfig())
    coarse = Evaluation(accuracy=0.8, samples=10, synops_mean=base_synops / 20,
                        synops_per_layer={"0": 1.0})
    tutorial, seven = Variant(255), Variant(7)
    bounds = SearchBounds((1.0, 2.0), (0.0, 0.0), ("hinge",), None, None, (tutorial, seven))
    # The first variant's base model sets the reference, whichever bases exist besides.
    bases = {seven.key: BaseRecord(seven, "run7", coarse, coarse, (1.0, 2.0)),
             tutorial.key: BaseRecord(tutorial, "run", evaluation, evaluation, (1.0, 2.0))}
    return StudyRecord("x", config, bounds, bases, "parent", "intensity", num_classes, {})


def test_the_hypervolume_reference_is_chance_level_so_a_harder_dataset_still_has_a_volume() -> None:
    # Fashion-MNIST trials reach ~87%: a fixed 90% reference accuracy made the hypervolume 0.
    reference = hypervolume_reference(record(10, 5e7))
    assert reference == (0.1, 5e7)
    trials = frame([(0, 0.85, 3e7), (1, 0.87, 4e7), (2, 0.84, 2e7)])
    history = hypervolume_history(trials, reference)
    assert list(history.index) == [0, 1, 2]
    assert 0 < history[0] < history[1] < history[2]
