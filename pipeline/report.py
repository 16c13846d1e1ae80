"""Report stage: turn a study into tables and figures a person can choose a network from."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

PARAM_COLUMNS = ("penalty", "penalty_strength", "target_synops", "epochs", "lr")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per finished (COMPLETE) trial: params, val/test metrics, MLflow run id, and whether
    it is on the Pareto front (Optuna's `best_trials`, computed on the validation objectives)."""
    front = {t.number for t in study.best_trials}
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        rows.append({
            "trial": trial.number,
            "kind": "reference" if attrs.get("reference") else "trial",
            **{k: trial.params.get(k) for k in PARAM_COLUMNS},
            **attrs.get("metrics", {}),
            "seconds": attrs.get("seconds"),
            "mlflow_run_id": attrs.get("mlflow_run_id"),
            "on_front": trial.number in front,
        })
    return pd.DataFrame(rows)


def front_table(study: optuna.Study) -> pd.DataFrame:
    """The front members, fewest SynOps first."""
    frame = trials_frame(study)
    if frame.empty:
        return frame
    return frame[frame["on_front"]].sort_values("val_synops_mean").reset_index(drop=True)


def pareto_png(study: optuna.Study, path: Path) -> None:
    """Test accuracy vs mean test SynOps of every finished trial, the front connected."""
    frame = trials_frame(study)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rest = frame[~frame["on_front"]]
    front = frame[frame["on_front"]].sort_values("test_synops_mean")
    ax.scatter(rest["test_synops_mean"], rest["test_accuracy"] * 100, color="0.7", label="dominated")
    ax.plot(front["test_synops_mean"], front["test_accuracy"] * 100, "o-", label="Pareto front")
    ax.set(xlabel="mean test SynOps per sample", ylabel="test accuracy (%)", xscale="log",
           title=f"{study.study_name}: accuracy vs SynOps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
