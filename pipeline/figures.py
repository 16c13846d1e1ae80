"""Figures of a study: the Pareto plot (PNG and interactive HTML), the hypervolume history and the
per-layer SynOps of the front. They draw what `pipeline.front` computed; they choose nothing."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

from pipeline.evaluate import SpikingEvaluation  # noqa: E402
from pipeline.front import (  # noqa: E402
    REFERENCE_SYNOPS_FACTOR,
    BaseRecord,
    layer_column,
    param_columns,
    variant_order,
)


def _marker_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    front = frame[frame["on_front"]].sort_values("test_synops_mean")
    trials, reference = frame[frame["kind"] == "trial"], frame[frame["kind"] == "reference"]
    return trials[~trials["on_variant_front"]], front, reference


def _variants(frame: pd.DataFrame, bases: dict[str, BaseRecord]
              ) -> list[tuple[str, str, pd.DataFrame, BaseRecord | None]]:
    """Per variant, in `variant_order`: its label, its colour, its own front's trials (fewest
    test SynOps first) and its base model, if trained."""
    palette = plt.get_cmap("tab10").colors
    return [(label, matplotlib.colors.to_hex(palette[i % len(palette)]),
             frame[(frame["variant_key"] == key) & frame["on_variant_front"]
                   & (frame["kind"] == "trial")].sort_values("test_synops_mean"), bases.get(key))
            for i, (key, label) in enumerate(variant_order(frame, bases).items())]


def _confirmed(members: pd.DataFrame | None) -> pd.DataFrame:
    """Front members trained with more than one seed."""
    if members is None or "seeds" not in members:
        return pd.DataFrame()
    return members[members["seeds"] > 1]


def pareto_png(frame: pd.DataFrame, title: str, path: Path, bases: dict[str, BaseRecord],
               knee: pd.Series | None = None, members: pd.DataFrame | None = None) -> None:
    """Test accuracy vs mean test SynOps of every finished trial (a `trials_frame`): the overall
    front (chosen on validation) as a broad band, each variant's own front, base model and
    input-layer floor in its colour, trials dominated within their variant faded, the tutorial
    recipe and knee marked, and the seed mean ± sd of each confirmed member (`members`); the
    legend sits outside the data."""
    dominated, front, reference = _marker_rows(frame)
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.scatter(dominated["test_synops_mean"], dominated["test_accuracy"] * 100, color="0.6",
               alpha=0.4, label="trials dominated within their variant")
    ax.plot(front["test_synops_mean"], front["test_accuracy"] * 100, "-", color="0.2", alpha=0.25,
            linewidth=9, solid_capstyle="round", label="overall Pareto front")
    for label, colour, own, base in _variants(frame, bases):
        ax.plot(own["test_synops_mean"], own["test_accuracy"] * 100, "o-", color=colour,
                label=f"{label}: its front")
        if base is not None:
            ax.scatter([base.test.synops_mean], [base.test.accuracy * 100], marker="D", s=60,
                       color=colour, edgecolors="black", zorder=5)
            ax.axvline(base.test.input_layer_synops, color=colour, linestyle="--", alpha=0.7)
    ax.scatter(reference["test_synops_mean"], reference["test_accuracy"] * 100, marker="*", s=220,
               color="tab:red", zorder=5, label="tutorial recipe")
    confirmed = _confirmed(members)
    if not confirmed.empty:
        ax.errorbar(confirmed["test_synops_mean_mean"], confirmed["test_accuracy_mean"] * 100,
                    xerr=confirmed["test_synops_mean_sd"], yerr=confirmed["test_accuracy_sd"] * 100,
                    fmt="s", markersize=4, color="black", capsize=3, alpha=0.8, zorder=4,
                    label=f"front member: mean ± sd over {int(confirmed['seeds'].max())} seeds")
    ax.scatter([], [], marker="D", color="white", edgecolors="black",
               label="unpenalised base model (its variant's colour)")
    ax.plot([], [], "--", color="0.4", label="input-layer floor (set by the data and its encoding)")
    if knee is not None:
        ax.scatter([knee["test_synops_mean"]], [knee["test_accuracy"] * 100], s=260,
                   facecolors="none", edgecolors="tab:orange", linewidths=2.5, zorder=6,
                   label=f"knee: trial {int(knee['trial'])}")
    ax.set(xscale="log", xlabel="mean SynOps per test sample (log scale)",
           ylabel="test accuracy (%)",
           title=f"{title}: accuracy vs SynOps (front chosen on validation)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _hover(rows: pd.DataFrame) -> list[str]:
    texts = []
    for _, row in rows.iterrows():
        params = ", ".join(f"{k}={row[k]:.3g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                           for k in param_columns(rows) if pd.notna(row[k]))
        texts.append(
            f"trial {int(row['trial'])} ({row['kind']}, {row['variant']})<br>"
            f"{params or 'tutorial recipe'}<br>"
            f"val {row['val_accuracy']:.2%} [{row['val_accuracy_low']:.2%}, "
            f"{row['val_accuracy_high']:.2%}] at {row['val_synops_mean']:.3g} SynOps<br>"
            f"test {row['test_accuracy']:.2%} [{row['test_accuracy_low']:.2%}, "
            f"{row['test_accuracy_high']:.2%}] at {row['test_synops_mean']:.3g} SynOps<br>"
            f"(95% intervals over the images)<br>MLflow run {row['mlflow_run_id']}"
        )
    return texts


def pareto_html(frame: pd.DataFrame, title: str, path: Path, bases: dict[str, BaseRecord],
                knee: pd.Series, members: pd.DataFrame | None = None) -> None:
    """The Pareto plot as interactive plotly HTML, drawn as `pareto_png`; plotly.js is written
    next to it (no CDN). The finished trials come first, one marker each (dominated within their
    variant, each variant's front, the tutorial recipe), then what is drawn around them."""
    dominated, front, reference = _marker_rows(frame)
    variants = _variants(frame, bases)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=dominated["test_synops_mean"], y=dominated["test_accuracy"] * 100,
                             name="trials dominated within their variant", text=_hover(dominated),
                             hoverinfo="text", mode="markers", marker={"color": "lightgray"}))
    for label, colour, own, _ in variants:
        fig.add_trace(go.Scatter(x=own["test_synops_mean"], y=own["test_accuracy"] * 100,
                                 name=f"{label}: its front", text=_hover(own),
                                 hoverinfo="text", mode="lines+markers", marker={"color": colour}))
    fig.add_trace(go.Scatter(x=reference["test_synops_mean"], y=reference["test_accuracy"] * 100,
                             name="tutorial recipe", text=_hover(reference), hoverinfo="text",
                             mode="markers",
                             marker={"symbol": "star", "size": 16, "color": "crimson"}))
    fig.add_trace(go.Scatter(x=front["test_synops_mean"], y=front["test_accuracy"] * 100,
                             name="overall Pareto front", mode="lines", hoverinfo="skip",
                             line={"color": "rgba(0,0,0,0.2)", "width": 12}))
    for label, colour, _, base in variants:
        if base is not None:
            fig.add_trace(go.Scatter(
                x=[base.test.synops_mean], y=[base.test.accuracy * 100],
                name=f"{label}: base model", mode="markers",
                marker={"symbol": "diamond", "size": 12, "color": colour,
                        "line": {"color": "black", "width": 1}},
                text=[f"base model, {label}, MLflow run {base.run_id}"], hoverinfo="text"))
            fig.add_vline(x=base.test.input_layer_synops, line_dash="dash", line_color=colour,
                          annotation_text=f"floor, {label}")
    fig.add_trace(go.Scatter(
        x=[knee["test_synops_mean"]], y=[knee["test_accuracy"] * 100],
        name=f"knee: trial {int(knee['trial'])}", mode="markers", hoverinfo="skip",
        marker={"size": 22, "color": "rgba(0,0,0,0)", "line": {"color": "orange", "width": 3}}))
    confirmed = _confirmed(members)
    if not confirmed.empty:
        fig.add_trace(go.Scatter(
            x=confirmed["test_synops_mean_mean"], y=confirmed["test_accuracy_mean"] * 100,
            error_x={"array": confirmed["test_synops_mean_sd"].tolist()},
            error_y={"array": (confirmed["test_accuracy_sd"] * 100).tolist()},
            name="front member: seed mean ± sd", mode="markers",
            marker={"symbol": "square", "color": "black", "size": 7},
            text=[f"trial {int(r['trial'])}: {int(r['seeds'])} seeds, test "
                  f"{r['test_accuracy_mean']:.2%} ± {r['test_accuracy_sd'] * 100:.2f}"
                  f"{' (dominated on the means)' if r['dominated_on_means'] else ''}"
                  for _, r in confirmed.iterrows()], hoverinfo="text"))
    fig.update_layout(title=f"{title}: accuracy vs SynOps (front chosen on validation)",
                      xaxis={"type": "log", "title": "mean SynOps per test sample"},
                      yaxis={"title": "test accuracy (%)"}, template="plotly_white")
    fig.write_html(path, include_plotlyjs="directory", config={"displaylogo": False})  # no link out


def hypervolume_png(history: pd.Series, reference: tuple[float, float], path: Path) -> None:
    """Hypervolume of the validation front after each finished trial (`hypervolume_history`: in
    error against log10 SynOps), its reference point (accuracy, SynOps) stated."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(history.index, history.to_numpy(), "o-", markersize=3)
    ax.set(xlabel="trial number", ylabel="hypervolume (error x log10 SynOps)",
           title=f"Hypervolume of the validation front in (error, log10 SynOps)\nreference point: "
                 f"accuracy {reference[0]:.0%} (chance), {reference[1]:.3g} SynOps "
                 f"({REFERENCE_SYNOPS_FACTOR:g} x the largest SynOps the study's config names)")
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def layers_png(front: pd.DataFrame, layers: dict[str, str], path: Path) -> None:
    """Per-layer test SynOps of each front member, stacked, in SynOps (left) and as shares of the
    member's total (right: readable when the members' totals differ by orders of magnitude, as
    across input encodings); `layers` maps each counted layer's name to its label (a layer that
    a member's network lacks counts 0 there)."""
    labels = [f"trial {int(r['trial'])}\n{r['variant']}" for _, r in front.iterrows()]
    table = front[[layer_column(name) for name in layers]].fillna(0.0).set_axis(labels)
    table.columns = list(layers.values())
    width = max(6, 0.6 * len(table) + 2)
    fig, (counts, shares) = plt.subplots(1, 2, figsize=(2 * width + 3, 4.8))
    table.plot.bar(stacked=True, ax=counts, rot=0, legend=False)
    (table.div(table.sum(axis=1), axis=0) * 100).plot.bar(stacked=True, ax=shares, rot=0,
                                                          legend=False)
    counts.set(ylabel="mean SynOps per test sample", xlabel="front member (fewest SynOps first; "
               "its variant)", title="SynOps by weight layer")
    shares.set(ylabel="share of the member's SynOps (%)", xlabel="front member",
               title="Share of each weight layer")
    for ax in (counts, shares):
        ax.tick_params(axis="x", labelsize=7)
    shares.legend(title="layer (its input is counted)", fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def snn_layers_png(check: SpikingEvaluation, layers: dict[str, str], trial: int, path: Path) -> None:
    """Per layer: the ANN's SynOps estimate beside the spiking network's measured SynOps."""
    table = pd.DataFrame({"ANN estimate": [check.ann_synops_per_layer[n] for n in layers],
                          "SNN measured": [check.synops_per_layer[n] for n in layers]},
                         index=list(layers.values()))
    ax = table.plot.bar(figsize=(9, 4.5), rot=0, color=["tab:blue", "tab:orange"])
    settings = check.settings
    ax.set(ylabel="mean SynOps per test sample", xlabel="weight layer (its input is counted)",
           title=f"Knee (trial {trial}) as a spiking network: {settings['encoding']} encoding, "
                 f"{settings['steps']} steps, {settings['spike_fn']}-spike, {check.samples} images; "
                 f"total {check.synops_ratio:.4f} x the estimate")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=130)
    plt.close(ax.figure)
