"""Report stage: turn a study into figures and a table a person can choose a network from.

Everything is read from the Optuna study (trial params and user attrs hold each trial's val/test
metrics and MLflow run id) plus the base model's MLflow run. Choices (the front, the knee, the
best network within a budget) use validation numbers only; test numbers are what is reported.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.config import ExperimentConfig  # noqa: E402
from pipeline.evaluate import CHIP_PROFILES  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.sweep import ATTR_METRICS, ATTR_REFERENCE, ATTR_RUN_ID, ATTR_SECONDS  # noqa: E402
from pipeline.synops import counted_layer_names  # noqa: E402

PARAM_COLUMNS = ("penalty", "penalty_strength", "target_synops", "epochs", "lr")
FIGURES = ("pareto.png", "hypervolume.png", "layers.png")
HYPERVOLUME_ACCURACY_FLOOR = 0.9


class EmptyStudyError(RuntimeError):
    """The study has no finished trial to report on."""


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per finished (COMPLETE) trial: params, val/test metrics, MLflow run id, and whether
    it is on the Pareto front (Optuna's `best_trials`, computed on the validation objectives)."""
    front = {t.number for t in study.best_trials}
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        rows.append({
            "trial": trial.number,
            "kind": "reference" if attrs.get(ATTR_REFERENCE) else "trial",
            **{k: trial.params.get(k) for k in PARAM_COLUMNS},
            **attrs.get(ATTR_METRICS, {}),
            "seconds": attrs.get(ATTR_SECONDS),
            "mlflow_run_id": attrs.get(ATTR_RUN_ID),
            "on_front": trial.number in front,
        })
    frame = pd.DataFrame(rows)
    return frame.dropna(axis=1, how="all") if not frame.empty else frame


def front_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The front members of a `trials_frame`, fewest validation SynOps first."""
    if frame.empty:
        return frame
    return frame[frame["on_front"]].sort_values("val_synops_mean").reset_index(drop=True)


def knee_index(front: pd.DataFrame) -> int:
    """Row of `front` farthest from the straight line joining its two extremes, with validation
    error and log SynOps each scaled to [0, 1]: where giving up SynOps starts costing accuracy
    fastest. (Hand-written: neither Optuna nor pandas offers a knee.)"""
    if len(front) < 3:
        return int(front["val_accuracy"].idxmax())
    x = front["val_synops_mean"].map(math.log)
    y = 1 - front["val_accuracy"]
    x = (x - x.min()) / ((x.max() - x.min()) or 1)
    y = (y - y.min()) / ((y.max() - y.min()) or 1)
    first, last = x.idxmin(), x.idxmax()
    dx, dy = x[last] - x[first], y[last] - y[first]
    distance = ((dy * (x - x[first]) - dx * (y - y[first])).abs()) / math.hypot(dx, dy)
    return int(distance.idxmax())


@dataclass(frozen=True)
class Landmarks:
    """Points every figure is read against: the unpenalised base model and the SynOps floor."""

    base_accuracy: float
    base_synops: float
    base_val_synops: float
    floor_synops: float
    base_run_id: str


def landmarks(study: optuna.Study, model: nn.Module) -> Landmarks:
    """Read the base model's test metrics from its MLflow run (the study records its id)."""
    bounds = study.user_attrs["search_bounds"]
    metrics = mlflow.get_run(bounds["base_run_id"]).data.metrics
    input_layer = counted_layer_names(model)[0]
    return Landmarks(
        base_accuracy=metrics["test_accuracy"],
        base_synops=metrics["test_synops_mean"],
        base_val_synops=bounds["base_val_synops"],
        floor_synops=metrics[f"test_synops_{input_layer}"],
        base_run_id=bounds["base_run_id"],
    )


def layer_columns(frame: pd.DataFrame) -> list[str]:
    """The per-layer test SynOps columns, in network order."""
    summary = {"test_synops_mean", "test_synops_p50", "test_synops_p95", "test_synops_max"}
    return [c for c in frame.columns if c.startswith("test_synops_") and c not in summary]


def _marker_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    front = frame[frame["on_front"]].sort_values("test_synops_mean")
    return frame[~frame["on_front"]], front, frame[frame["kind"] == "reference"]


def pareto_png(frame: pd.DataFrame, title: str, path: Path, marks: Landmarks | None = None,
               knee: pd.Series | None = None) -> None:
    """Test accuracy vs mean test SynOps of every finished trial (a `trials_frame`): the front
    (chosen on validation) connected, dominated trials faded, the tutorial recipe, base model,
    floor and knee marked."""
    dominated, front, reference = _marker_rows(frame)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(dominated["test_synops_mean"], dominated["test_accuracy"] * 100, color="0.6",
               alpha=0.4, label="dominated trials")
    ax.plot(front["test_synops_mean"], front["test_accuracy"] * 100, "o-", color="tab:blue",
            label="Pareto front")
    ax.scatter(reference["test_synops_mean"], reference["test_accuracy"] * 100, marker="*", s=220,
               color="tab:red", zorder=5, label="tutorial recipe")
    if marks is not None:
        ax.scatter([marks.base_synops], [marks.base_accuracy * 100], marker="D", s=70,
                   color="black", zorder=5, label="unpenalised base model")
        ax.axvline(marks.floor_synops, color="tab:gray", linestyle="--",
                   label="input-layer floor (set by the data)")
    if knee is not None:
        ax.scatter([knee["test_synops_mean"]], [knee["test_accuracy"] * 100], s=260,
                   facecolors="none", edgecolors="tab:orange", linewidths=2.5, zorder=6,
                   label=f"knee: trial {int(knee['trial'])}")
    ax.set(xscale="log", xlabel="mean SynOps per test sample (log scale)",
           ylabel="test accuracy (%)",
           title=f"{title}: accuracy vs SynOps (front chosen on validation)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center right", fontsize=8)  # the empty band between the front and the reference
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _hover(rows: pd.DataFrame) -> list[str]:
    texts = []
    for _, row in rows.iterrows():
        params = ", ".join(f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                           for k in PARAM_COLUMNS if k in row and pd.notna(row[k]))
        texts.append(
            f"trial {int(row['trial'])} ({row['kind']})<br>{params or 'tutorial recipe'}<br>"
            f"val {row['val_accuracy']:.2%} at {row['val_synops_mean']:.3g} SynOps<br>"
            f"test {row['test_accuracy']:.2%} at {row['test_synops_mean']:.3g} SynOps<br>"
            f"MLflow run {row['mlflow_run_id']}"
        )
    return texts


def pareto_html(frame: pd.DataFrame, title: str, path: Path, marks: Landmarks,
                knee: pd.Series) -> None:
    """The Pareto plot as interactive plotly HTML; plotly.js is written next to it (no CDN)."""
    dominated, front, reference = _marker_rows(frame)
    fig = go.Figure()
    for rows, name, style in (
        (dominated, "dominated trials", {"mode": "markers", "marker": {"color": "lightgray"}}),
        (front, "Pareto front", {"mode": "lines+markers", "marker": {"color": "royalblue"}}),
        (reference, "tutorial recipe",
         {"mode": "markers", "marker": {"symbol": "star", "size": 16, "color": "crimson"}}),
    ):
        fig.add_trace(go.Scatter(x=rows["test_synops_mean"], y=rows["test_accuracy"] * 100,
                                 name=name, text=_hover(rows), hoverinfo="text", **style))
    fig.add_trace(go.Scatter(
        x=[marks.base_synops], y=[marks.base_accuracy * 100], name="unpenalised base model",
        mode="markers", marker={"symbol": "diamond", "size": 12, "color": "black"},
        text=[f"base model, MLflow run {marks.base_run_id}"], hoverinfo="text"))
    fig.add_trace(go.Scatter(
        x=[knee["test_synops_mean"]], y=[knee["test_accuracy"] * 100],
        name=f"knee: trial {int(knee['trial'])}", mode="markers", hoverinfo="skip",
        marker={"size": 22, "color": "rgba(0,0,0,0)", "line": {"color": "orange", "width": 3}}))
    fig.add_vline(x=marks.floor_synops, line_dash="dash", line_color="gray",
                  annotation_text="input-layer floor")
    fig.update_layout(title=f"{title}: accuracy vs SynOps (front chosen on validation)",
                      xaxis={"type": "log", "title": "mean SynOps per test sample"},
                      yaxis={"title": "test accuracy (%)"}, template="plotly_white")
    fig.write_html(path, include_plotlyjs="directory")


def hypervolume_png(study: optuna.Study, path: Path, marks: Landmarks) -> tuple[float, float]:
    """Hypervolume of the validation front after each trial; returns the reference point."""
    reference_point = (HYPERVOLUME_ACCURACY_FLOOR, marks.base_val_synops)
    # Optuna's plot sets the ggplot style globally and is marked experimental: contain both.
    with plt.style.context("default"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_hypervolume_history(study, reference_point)
    ax.set_title(f"Hypervolume of the front (validation), reference point: accuracy "
                 f"{reference_point[0]:.0%}, {reference_point[1]:.3g} SynOps (base model)",
                 fontsize=9)
    ax.figure.set_size_inches(8, 4.5)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=130)
    plt.close(ax.figure)
    return reference_point


def layers_png(front: pd.DataFrame, model: nn.Module, path: Path) -> None:
    """Per-layer test SynOps of each front member, stacked."""
    columns = layer_columns(front)
    modules = dict(model.named_modules())
    table = front.set_index(front["trial"].map(lambda n: f"trial {n}"))[columns]
    names = [c.removeprefix("test_synops_") for c in columns]
    table.columns = [f"{n}: {type(modules[n]).__name__}" if n in modules else n for n in names]
    ax = table.plot.bar(stacked=True, figsize=(max(6, 0.6 * len(table) + 2), 4.5), rot=45)
    ax.set(ylabel="mean SynOps per test sample", xlabel="front member (fewest SynOps first)",
           title="Where each front member spends its SynOps, by weight layer")
    ax.legend(title="layer (its input is counted)", fontsize=8)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=130)
    plt.close(ax.figure)


def best_within_budgets(frame: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    """For each SynOps budget, the trial with the best validation accuracy among those whose
    validation SynOps fit in it, with its test numbers."""
    rows = []
    for budget in budgets:
        fitting = frame[frame["val_synops_mean"] <= budget]
        if fitting.empty:
            rows.append({"budget": f"{budget:.3g}", "trial": "none fits", "val accuracy": "",
                         "test accuracy": "", "test SynOps": ""})
            continue
        best = fitting.loc[fitting["val_accuracy"].idxmax()]
        rows.append({"budget": f"{budget:.3g}", "trial": int(best["trial"]),
                     "val accuracy": f"{best['val_accuracy']:.2%}",
                     "test accuracy": f"{best['test_accuracy']:.2%}",
                     "test SynOps": f"{best['test_synops_mean']:.3g}"})
    return pd.DataFrame(rows)


def display_front(front: pd.DataFrame, chips: tuple[str, ...] = ("loihi", "seneca")) -> pd.DataFrame:
    """The front formatted for people: percentages, 3 significant digits, short run ids."""
    shown = pd.DataFrame({"trial": front["trial"], "kind": front["kind"]})
    for column in PARAM_COLUMNS:
        if column in front:
            shown[column] = front[column].map(
                lambda v: "" if pd.isna(v) else (f"{v:.3g}" if isinstance(v, float) else str(v)))
    shown["val acc"] = front["val_accuracy"].map("{:.2%}".format)
    shown["test acc"] = front["test_accuracy"].map("{:.2%}".format)
    shown["test SynOps"] = front["test_synops_mean"].map("{:.3g}".format)
    shown["p95"] = front["test_synops_p95"].map("{:.3g}".format)
    for chip in chips:
        shown[f"µJ/sample {chip}"] = front[f"test_energy_uj_{chip}"].map("{:.3g}".format)
    shown["MLflow run"] = front["mlflow_run_id"].str[:8]
    return shown


def _duration(study: optuna.Study) -> tuple[dt.timedelta, float]:
    finished = [t for t in study.trials if t.datetime_complete and t.datetime_start]
    wall = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    training = sum(t.user_attrs.get(ATTR_SECONDS, 0.0) for t in finished)
    return wall, training


def _comparison(knee: pd.Series, name: str, accuracy: float, synops: float) -> str:
    ratio = synops / knee["test_synops_mean"]
    return (f"vs the {name} ({accuracy:.2%} at {synops:.3g} SynOps): {ratio:.2f}x "
            f"fewer SynOps ({1 - knee['test_synops_mean'] / synops:.0%} less), accuracy "
            f"{(knee['test_accuracy'] - accuracy) * 100:+.2f} points")


def summary_blocks(study: optuna.Study, config: ExperimentConfig, model: nn.Module,
                   frame: pd.DataFrame,
                   front: pd.DataFrame, knee: pd.Series, marks: Landmarks,
                   reference_point: tuple[float, float], tracking_uri: str) -> list[tuple[str, object]]:
    """The report's content as (kind, value) blocks, rendered to Markdown and HTML alike."""
    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    wall, training = _duration(study)
    weights = sum(p.numel() for p in model.parameters())
    experiment = mlflow.get_run(knee["mlflow_run_id"]).info.experiment_id
    blocks: list[tuple[str, object]] = [
        ("h1", f"Accuracy vs SynOps: study `{study.study_name}`"),
        ("p", f"Dataset **{config.data.dataset}** (validation: {config.data.val_size} held-out "
              f"training images; test set only reported). Model: conv channels "
              f"{config.model.channels}, kernels {config.model.kernel_sizes}, sum pooling "
              f"{config.model.pooling}, {weights:,} weights. "
              f"Trials: {counts['COMPLETE']} finished, {counts['FAIL']} failed, "
              f"{counts['RUNNING']} running; {wall.total_seconds() / 60:.1f} min wall clock, "
              f"{training / 60:.1f} min of training runs."),
        ("img", "pareto.png"),
        ("p", "Interactive version with every trial's params and MLflow run on hover: "
              "[pareto.html](pareto.html)."),
        ("h2", "The front"),
        ("p", "Non-dominated trials on (validation accuracy up, validation SynOps down), fewest "
              "SynOps first; test numbers and energy per sample on two chip profiles. "
              "All chip profiles and per-layer SynOps are in [front.csv](front.csv)."),
        ("table", display_front(front)),
        ("h2", f"Knee: trial {int(knee['trial'])}"),
        ("p", f"Test accuracy **{knee['test_accuracy']:.2%}** at **{knee['test_synops_mean']:.3g}** "
              f"SynOps per sample (p95 {knee['test_synops_p95']:.3g}). Method: on the validation "
              "front, with error and log SynOps each scaled to [0, 1], the knee is the member "
              "farthest from the straight line joining the front's two ends: past it, each further "
              "cut in SynOps costs more accuracy than before."),
        ("list", [_comparison(knee, "unpenalised base model", marks.base_accuracy, marks.base_synops)]
         + [_comparison(knee, "tutorial recipe", r["test_accuracy"], r["test_synops_mean"])
            for _, r in frame[frame["kind"] == "reference"].iterrows()]
         + [f"input-layer floor: {marks.floor_synops:.3g} SynOps per sample are set by the data "
            f"and cannot be trained away"]),
        ("h2", "Best accuracy within a SynOps budget"),
        ("p", "Chosen on validation (accuracy among trials whose validation SynOps fit)."),
        ("table", best_within_budgets(frame, config.report.budgets)),
        ("h2", "Energy per sample of the knee"),
        ("table", pd.DataFrame([
            {"chip": chip, "pJ/SynOp": p.picojoules_per_synop,
             "µJ/sample": f"{knee[f'test_energy_uj_{chip}']:.3g}", "source": p.source}
            for chip, p in CHIP_PROFILES.items()])),
        ("h2", "Progress of the search"),
        ("p", f"Hypervolume reference point: accuracy {reference_point[0]:.0%}, "
              f"{reference_point[1]:.3g} SynOps (the base model's, validation)."),
        ("img", "hypervolume.png"),
        ("img", "layers.png"),
        ("h2", "Open the chosen run"),
        ("list", [f"`make ui`, then http://127.0.0.1:5000/#/experiments/{experiment}/runs/"
                  f"{knee['mlflow_run_id']} (tracking store: `{tracking_uri}`)",
                  f"`synops export --config <config> --trial {int(knee['trial'])}` writes its "
                  "checkpoint and a JSON card for a converter or chip toolchain"]),
    ]
    return blocks


def render_markdown(blocks: list[tuple[str, object]]) -> str:
    parts = []
    for kind, value in blocks:
        if kind == "h1":
            parts.append(f"# {value}")
        elif kind == "h2":
            parts.append(f"## {value}")
        elif kind == "table":
            parts.append(value.to_markdown(index=False))
        elif kind == "img":
            parts.append(f"![{value}]({value})")
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in value))
        else:
            parts.append(str(value))
    return "\n\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then render the little Markdown the report uses: **bold**, `code`, [a](b)."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', text)


def render_html(blocks: list[tuple[str, object]], title: str) -> str:
    body = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline_html(str(value))}</{kind}>")
        elif kind == "table":
            body.append(value.to_html(index=False, border=0, classes="front"))
        elif kind == "img":
            body.append(f'<img src="{value}" alt="{value}">')
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in value) + "</ul>")
        else:
            body.append(f"<p>{_inline_html(str(value))}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;"
             "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(study: optuna.Study, config: ExperimentConfig, out: Path,
                 tracking_uri: str) -> Path:
    """Write every report file into `out` (replacing it whole, never half-written) and log the
    folder to the study's parent MLflow run. Raises `EmptyStudyError` if nothing finished."""
    frame = trials_frame(study)
    if frame.empty:
        raise EmptyStudyError(f"study '{study.study_name}' has no finished trial yet: "
                              "run `synops sweep` first (or wait for its first trial)")
    front = front_table(frame)
    knee = front.loc[knee_index(front)]
    model = build_model(config.model)
    marks = landmarks(study, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pareto_png(frame, study.study_name, staging / "pareto.png", marks, knee)
        pareto_html(frame, study.study_name, staging / "pareto.html", marks, knee)
        reference_point = hypervolume_png(study, staging / "hypervolume.png", marks)
        layers_png(front, model, staging / "layers.png")
        columns = ["trial", "kind", *[c for c in PARAM_COLUMNS if c in front],
                   "val_accuracy", "val_synops_mean", "test_accuracy", "test_synops_mean",
                   "test_synops_p95", "test_synops_max", *layer_columns(front),
                   *[c for c in front if c.startswith("test_energy_uj_")], "mlflow_run_id"]
        front[columns].to_csv(staging / "front.csv", index=False)
        blocks = summary_blocks(study, config, model, frame, front, knee, marks, reference_point,
                                tracking_uri)
        (staging / "report.md").write_text(render_markdown(blocks))
        (staging / "index.html").write_text(render_html(blocks, f"{study.study_name} report"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        mlflow.MlflowClient().log_artifacts(parent, str(out), artifact_path="report")
    return out
