"""Report stage: render what `pipeline.front` chose from a study into figures, a table and a page.

Everything comes from the study's own record (its stored config, base model and trials), never
from the command line's config, so a report always describes the study as it was run; only the
SynOps budgets to quote are the reader's question, and may be asked anew.
"""

from __future__ import annotations

import datetime as dt
import html
import re
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from pipeline.errors import PipelineError
from pipeline.evaluate import ENERGY_PROFILES, SpikingEvaluation, energy_per_sample
from pipeline.figures import hypervolume_png, layers_png, pareto_html, pareto_png, snn_layers_png
from pipeline.front import (
    ATTR_SECONDS,
    MEAN_OVER_CONFIRMATIONS,
    REFERENCE_SYNOPS_FACTOR,
    SEED_COLUMNS,
    SNN_COLUMNS,
    BaseRecord,
    Choice,
    SeedNoise,
    StudyRecord,
    best_within_budgets,
    choose,
    detectable_difference,
    energy_column,
    finished_trials,
    hypervolume_history,
    hypervolume_reference,
    indistinguishable_neighbours,
    infeasible_trials,
    layer_column,
    older_deployments,
    param_columns,
    parent_run_tags,
    seed_noise,
    spiking_checks,
    study_counts,
    trials_frame,
    variant_order,
)
from pipeline.members import member_network
from pipeline.model import describe_model, parameter_count
from pipeline.owned import check_replaceable, replacing
from pipeline.secrets import redact_url
from pipeline.tracking import Tracker

# Written into every report folder: only a folder holding it is ever replaced by a new report.
MARKER = ".synops-report"


class EmptyStudyError(PipelineError, RuntimeError):
    """The study has no finished trial to report on."""


def _with_interval(row: pd.Series, split: str) -> str:
    """A trials-table accuracy with its 95% interval, e.g. `98.46% [98.20, 98.68]`."""
    return (f"{row[f'{split}_accuracy']:.2%} [{row[f'{split}_accuracy_low'] * 100:.2f}, "
            f"{row[f'{split}_accuracy_high'] * 100:.2f}]")


def _mean_sd(mean: float, sd: float) -> str:
    return f"{mean:.2%} ± {sd * 100:.2f}" if pd.notna(sd) else f"{mean:.2%}"


def display_front(front: pd.DataFrame, chips: tuple[str, ...] = ("loihi", "seneca")) -> pd.DataFrame:
    """The front formatted for people: percentages, 3 significant digits, short run ids."""
    shown = pd.DataFrame({"trial": front["trial"], "kind": front["kind"], "variant": front["variant"]})
    for column in param_columns(front):
        if column != "spikes_per_pixel":  # the variant says it
            shown[column] = front[column].map(
                lambda v: "" if pd.isna(v) else (f"{v:.3g}" if isinstance(v, float) else str(v)))
    shown["val acc [95% CI]"] = [_with_interval(r, "val") for _, r in front.iterrows()]
    shown["test acc [95% CI]"] = [_with_interval(r, "test") for _, r in front.iterrows()]
    if "mean_over" in front and (front["mean_over"] == MEAN_OVER_CONFIRMATIONS).any():
        shown["means over"] = [f"{int(r['seeds'])} confirmation{'s' if r['seeds'] > 1 else ''}"
                               if r["mean_over"] == MEAN_OVER_CONFIRMATIONS else r["mean_over"]
                               for _, r in front.iterrows()]
        shown["val acc mean ± sd"] = [_mean_sd(r["val_accuracy_mean"], r["val_accuracy_sd"])
                                      for _, r in front.iterrows()]
        shown["test acc mean ± sd"] = [_mean_sd(r["test_accuracy_mean"], r["test_accuracy_sd"])
                                       for _, r in front.iterrows()]
        shown["on the means"] = front["dominated_on_means"].map({True: "dominated", False: "front"})
    shown["test SynOps"] = front["test_synops_mean"].map("{:.3g}".format)
    shown["p95"] = front["test_synops_p95"].map("{:.3g}".format)
    for chip in chips:
        shown[f"µJ/sample {chip}"] = front[energy_column(chip)].map("{:.3g}".format)
    if "snn_test_accuracy" in front or "snn_failure" in front:
        accuracy = front.get("snn_test_accuracy", pd.Series(float("nan"), index=front.index))
        ratio = front.get("snn_synops_ratio", pd.Series(float("nan"), index=front.index))
        failed = front.get("snn_failure", pd.Series(None, index=front.index)).notna()
        shown["SNN acc"] = accuracy.map("{:.2%}".format).where(accuracy.notna(), "")
        shown["SNN acc"] = shown["SNN acc"].where(~failed, "not simulated (below)")
        shown["SNN/ANN SynOps"] = ratio.map("{:.4f}".format).where(ratio.notna(), "")
    if "chip_fit" in front:
        checked = front["chip_fit"].notna()
        shown["on the chip"] = front["chip_fit"].where(checked, "")
        shown["8-bit test acc"] = front["quantized_test_accuracy"].map("{:.2%}".format).where(checked, "")
        shown["8-bit SynOps"] = front["quantized_test_synops_mean"].map("{:.3g}".format).where(checked, "")
    shown["MLflow run"] = front["mlflow_run_id"].str[:8]
    return shown


def budget_table(candidates: pd.DataFrame, budgets: list[float]) -> pd.DataFrame:
    """`best_within_budgets` of the candidates, formatted for people."""
    rows = []
    for budget, best in best_within_budgets(candidates, budgets):
        if best is None:
            rows.append({"budget": f"{budget:.3g}", "trial": "none fits", "variant": "",
                         "val accuracy": "", "test accuracy": "", "test SynOps": ""})
            continue
        rows.append({"budget": f"{budget:.3g}", "trial": int(best["trial"]),
                     "variant": best["variant"],
                     "val accuracy": f"{best['val_accuracy']:.2%}",
                     "test accuracy": _mean_sd(best["test_accuracy_mean"], best["test_accuracy_sd"]),
                     "test SynOps": f"{best['test_synops_mean_mean']:.3g}"})
    return pd.DataFrame(rows)


def variant_table(frame: pd.DataFrame, bases: dict[str, BaseRecord]) -> pd.DataFrame:
    """One row per variant: its floor and base model, how many trials tried it, and the ends of
    its own front (chosen on validation; test numbers shown)."""
    rows = []
    for key, label in variant_order(frame, bases).items():
        trials = frame[(frame["variant_key"] == key) & (frame["kind"] == "trial")]
        front = trials[trials["on_variant_front"]].sort_values("val_synops_mean")
        base = bases.get(key)
        ends = [front.iloc[0], front.iloc[-1]] if len(front) else []
        rows.append({
            "variant": label,
            "input-layer floor": f"{base.test.input_layer_synops:.3g}" if base else "",
            "base model": (f"{base.test.accuracy:.2%} at {base.test.synops_mean:.3g}" if base
                           else "not trained"),
            "trials": len(trials),
            "front members": len(front),
            "fewest SynOps on its front": (f"{ends[0]['test_accuracy']:.2%} at "
                                           f"{ends[0]['test_synops_mean']:.3g}" if ends else ""),
            "most accurate on its front": (f"{ends[1]['test_accuracy']:.2%} at "
                                           f"{ends[1]['test_synops_mean']:.3g}" if ends else ""),
        })
    return pd.DataFrame(rows)


def _duration(study: optuna.Study) -> tuple[dt.timedelta, float]:
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    wall = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    training = sum(t.user_attrs.get(ATTR_SECONDS, 0.0) for t in finished)
    return wall, training


def _comparison(knee: pd.Series, name: str, accuracy: float, synops: float) -> str:
    ratio = synops / knee["test_synops_mean"]
    return (f"vs the {name} ({accuracy:.2%} at {synops:.3g} SynOps): {ratio:.2f}x "
            f"fewer SynOps ({1 - knee['test_synops_mean'] / synops:.0%} less), accuracy "
            f"{(knee['test_accuracy'] - accuracy) * 100:+.2f} points")


def _spiking_blocks(front: pd.DataFrame, knee: pd.Series) -> list[tuple[str, object]]:
    """What the spiking check found for the front members that have one (`synops snn`), and the
    knee's per-layer figure when the knee is among them."""
    accuracy = front.get("snn_test_accuracy", pd.Series(float("nan"), index=front.index))
    failure = front.get("snn_failure", pd.Series(None, index=front.index))
    if accuracy.isna().all() and failure.isna().all():
        return [("p", "No front member has been checked as a spiking network yet: "
                      "`synops snn --config <config> --front` does it.")]
    rows = [f"trial {int(r['trial'])}: SNN {r['snn_test_accuracy']:.2%} vs ANN "
            f"{r['snn_ann_accuracy']:.2%} on the same {int(r['snn_samples'])} test images "
            f"({r['snn_agreement']:.1%} same predictions), SynOps {r['snn_synops_ratio']:.4f} x the "
            f"ANN estimate; {r['snn_settings']}"
            for _, r in front[accuracy.notna()].iterrows()]
    rows += [f"trial {int(r['trial'])}: not simulated as a spiking network: {r['snn_failure']}"
             for _, r in front[failure.notna()].iterrows()]
    blocks: list[tuple[str, object]] = [
        ("h2", "Checked as a spiking network"),
        ("p", "Each checked member simulated with sinabs integrate-and-fire neurons (subtractive "
              "reset) on the first images of the test set (`SNN acc` in the front table is on "
              "those images); the SNN's SynOps measured over all time steps against the ANN's "
              "estimate on the same images. A member whose network has no spiking equivalent "
              "says which layer and why."),
        ("list", rows)]
    knee_checked = pd.notna(knee.get("snn_test_accuracy"))
    return blocks + ([("img", "snn_layers.png")] if knee_checked else [])


def _budget_rule(noise: SeedNoise) -> str:
    """How the budget table chooses, with the training noise it judged by."""
    rule = ("Chosen on validation among the front members (on their seed means where confirmed): "
            "within each budget, the fewest SynOps among the members that the seeds cannot tell apart "
            "from the most accurate one, whatever its variant")
    if noise.df == 0:
        return rule + " (no member was repeated with other seeds: only exact ties count)."
    return (rule + f": the gap within Student's t (95% two-sided, {noise.df} degrees of freedom: "
            f"t = {noise.t:.2f}) times the standard error of the difference of the two means, "
            f"from the seed-to-seed sd pooled over every member's repeats ({noise.sd * 100:.3f} "
            f"points; the noise is the network's and its recipe's, which one member's 2 or 3 seeds "
            f"estimate too loosely), e.g. {noise.margin(2, 2) * 100:.2f} points between two means "
            "over 2 seeds.")


def _chip_blocks(front: pd.DataFrame, knee: pd.Series, infeasible: dict,
                 older: list[int]) -> list[tuple[str, object]]:
    """Whether the front members run on the study's chip (`[study.constraints] chip` or
    `synops deploy`), what quantisation to its integers costs, which trials did not fit, and which
    members' checks an older version recorded (`older`)."""
    if "chip_fit" not in front and not infeasible and not older:
        return []
    rows = [f"trial {int(r['trial'])}: {r['chip_fit']}; on 8-bit weights test accuracy "
            f"{r['quantized_test_accuracy']:.2%} (float {r['test_accuracy']:.2%}) at "
            f"{r['quantized_test_synops_mean']:.3g} SynOps (float {r['test_synops_mean']:.3g}); "
            f"footprint {int(r['chip_footprint_bytes'])} bytes; NeuroBench: "
            f"{r['effective_macs']:.3g} effective MACs, {r['effective_acs']:.3g} ACs per sample, "
            f"activation sparsity {r['activation_sparsity']:.3f}"
            for _, r in front[front.get("chip_fit", pd.Series(None, index=front.index)).notna()].iterrows()]
    rows += [f"trial {n} ({variant.label}) was not trained: {why}"
             for n, (variant, why) in sorted(infeasible.items())]
    rows += [f"trial {n}: its chip check was recorded by an older version of synops; "
             "`synops deploy --front` (or the next `synops sweep`) checks it again" for n in older]
    return [("h2", "On the chip"),
            ("p", "Each front member mapped onto the chip's cores (its published memory arithmetic "
                  "and layer rules) and evaluated with the chip's 8-bit integer weights and integer "
                  "thresholds; effective MACs/ACs and activation sparsity as NeuroBench defines them, "
                  "the footprint at 8 bits. Simulated on a CPU: timing, power and the chip's own event "
                  "routing are not. Trials whose network does not fit are infeasible: not trained, "
                  "never on the front."),
            ("list", rows)]


def _noise_blocks(choice: Choice, detectable: float, val_size: int) -> list[tuple[str, object]]:
    """How far the front can be trusted: one interval's half-width and the detectable difference
    (`detectable_difference`, sqrt(2) times that half-width), members that cannot be told apart,
    and members that the seed means no longer put on the front, with the runs the means are over."""
    members = choice.members
    half = detectable / 2**0.5  # detectable_difference is sqrt(2) x one interval's half-width
    items = [f"one validation accuracy is measured on {val_size} images: near the best accuracy, its "
             f"95% interval reaches about ±{half * 100:.2f} points (normal approximation; the table's "
             "Wilson intervals are close to it), and two accuracies measured on different images "
             f"must differ by at least **{detectable * 100:.2f} points** (√2 × {half * 100:.2f}) to "
             "be told apart at 95%; members compared on the same images differ by training noise "
             "instead, which the seed repeats measure and the budget table uses"]
    pairs = indistinguishable_neighbours(members)
    items.append("neighbours on the front whose validation intervals overlap (cannot be told "
                 "apart): " + (", ".join(f"trials {a} and {b}" for a, b in pairs) or "none"))
    confirmed = members["mean_over"] == MEAN_OVER_CONFIRMATIONS
    if confirmed.any():
        low, high = int(members.loc[confirmed, "seeds"].min()), int(members.loc[confirmed, "seeds"].max())
        dominated = members[members["dominated_on_means"]]["trial"].astype(int).tolist()
        unconfirmed = members.loc[~confirmed, "trial"].astype(int).tolist()
        items.append(f"on the means of the confirmation runs ({low if low == high else f'{low}-{high}'} "
                     "per member, other seeds; the run that put each member on the front is left out, "
                     "since it was picked for scoring well), dominated by another member: "
                     + (", ".join(f"trial {n}" for n in dominated) or "none")
                     + "; the knee and the budget table are chosen among the others"
                     + ("; not confirmed (no choice fell on them, or the stage has not finished; "
                        "their numbers are the selection run's alone, biased up): "
                        + ", ".join(f"trial {n}" for n in unconfirmed) if unconfirmed else ""))
    else:
        items.append("each member was trained once (the confirmation stage has not run): choices "
                     "are made on single runs")
    return [("h2", "How far the front can be trusted"), ("list", items)]


def summary_blocks(study: optuna.Study, record: StudyRecord, frame: pd.DataFrame, choice: Choice,
                   reference_point: tuple[float, float], budgets: list[float], tracker: Tracker
                   ) -> list[tuple[str, object]]:
    """The report's content as (kind, value) blocks, rendered to Markdown and HTML alike."""
    config = record.config
    counts = study_counts(study)
    wall, training = _duration(study)
    front, knee, member = choice.members, choice.knee, choice.knee_member
    chosen = next(r for r in finished_trials(study) if r.number == int(member["trial"]))
    designed = chosen.variant.apply(config)
    weights = parameter_count(member_network(config, chosen))
    # Its variant's base model, and the first variant's (the largest encoding: the tutorial's, in
    # the default study), where trained; the reference trial's variant may have none.
    first = record.bases.get(record.bounds.variants[0].key)
    bases = {b.variant.label: b for b in (record.bases.get(chosen.variant.key), first) if b}
    run_id = member["mlflow_run_id"]
    infeasible_note = "".join([
        f"; {counts.infeasible} of them infeasible (their network does not fit the chip)"
        if counts.infeasible else "",
        f"; {counts.pruned} of them stopped after an epoch, dominated by far" if counts.pruned else ""])
    quantized = pd.notna(member.get("quantized_test_synops_mean"))
    synops = member["quantized_test_synops_mean"] if quantized else member["test_synops_mean"]
    beyond = int((frame["val_synops_mean"] >= reference_point[1]).sum())
    best = choice.candidates["val_accuracy"].max()
    detectable = detectable_difference(best, int(member["val_samples"]))
    confirmed, runs = member["mean_over"] == MEAN_OVER_CONFIRMATIONS, int(member["seeds"])
    on_seeds = (f" On its {runs} confirmation run{'s' if runs > 1 else ''} (other seeds; the run "
                f"that put it on the front is left out): validation "
                f"{_mean_sd(member['val_accuracy_mean'], member['val_accuracy_sd'])}, test "
                f"{_mean_sd(member['test_accuracy_mean'], member['test_accuracy_sd'])}"
                f"{' (mean ± sd)' if runs > 1 else ''}." if confirmed else "")
    return [
        ("h1", f"Accuracy vs SynOps: study `{study.study_name}`"),
        ("p", f"Data: source **{config.data.source}** ({record.kind}; validation: "
              f"{int(member['val_samples'])} samples held out of the training samples unless the "
              f"source gives them; the test set is only reported). Network of the knee: "
              f"`{describe_model(designed.model)}`, {weights:,} weights. "
              f"Trials: {counts.finished} finished{infeasible_note}, {counts.failed} failed, "
              f"{counts.running} running; {wall.total_seconds() / 60:.1f} min wall clock, "
              f"{training / 60:.1f} min of training runs."),
        ("img", "pareto.png"),
        ("p", "Interactive version with every trial's params and MLflow run on hover: "
              "[pareto.html](pareto.html)."),
        ("h2", "The front"),
        ("p", "Non-dominated trials on (validation accuracy up, validation SynOps down), fewest "
              "SynOps first; test numbers and energy per sample on two chip profiles. "
              "All chip profiles and per-layer SynOps are in [front.csv](front.csv)."),
        ("table", display_front(front)),
        ("h2", "Variants"),
        ("p", "Each variant is one design the study compares: an input encoding (how many spikes "
              "a pixel becomes: pixel value 0..255 becomes 0..k spikes, k = spikes/px, equal-width "
              "bins; spike-count data is used as it is) and one value of each searched argument "
              "of the network and the data source. Fewer input spikes lower the input-layer "
              "floor, the SynOps no training can remove. Each variant has its own unpenalised "
              "base model, which its trials fine-tune; the figure draws each variant's own front "
              "in its colour and its floor as a dashed line."),
        ("table", variant_table(frame, record.bases)),
        ("h2", f"Knee: trial {int(member['trial'])}"),
        ("p", f"Test accuracy **{_with_interval(member, 'test')}** "
              f"(95% interval) at **{member['test_synops_mean']:.3g}** SynOps per sample (p95 "
              f"{member['test_synops_p95']:.3g}), variant **{chosen.variant.label}**."
              f"{on_seeds} Rule"
              f"{' (on the validation seed means)' if confirmed else ''}: {knee.explanation()}."),
        ("list", [_comparison(member, f"unpenalised base model ({label})",
                              b.test.accuracy, b.test.synops_mean) for label, b in bases.items()]
         + [_comparison(member, f"tutorial recipe ({r['variant']})", r["test_accuracy"],
                        r["test_synops_mean"])
            for _, r in frame[frame["kind"] == "reference"].iterrows()]
         + [f"input-layer floor of its variant: {chosen.test.input_layer_synops:.3g} SynOps per "
            "sample (its first layer's) are set by the data and its encoding and cannot be "
            "trained away"]),
        *_noise_blocks(choice, detectable, int(member["val_samples"])),
        *_spiking_blocks(front, member),
        ("h2", "Best accuracy within a SynOps budget"),
        ("p", _budget_rule(seed_noise(choice.candidates))),
        ("table", budget_table(choice.candidates, budgets)),
        *_chip_blocks(front, member, infeasible_trials(study), older_deployments(study)),
        ("h2", "Energy per sample of the knee"),
        ("p", "From its SynOps on the chip's integer weights (8-bit, after quantisation: "
              f"{synops:.3g} per sample)." if quantized else f"From its SynOps ({synops:.3g} per sample)."),
        ("table", pd.DataFrame([
            {"chip": chip, "pJ/SynOp": p.picojoules_per_synop,
             "µJ/sample": f"{energy:.3g}", "source": p.source}
            for (chip, p), energy in zip(ENERGY_PROFILES.items(), energy_per_sample(synops).values(),
                                         strict=True)])),
        ("h2", "Progress of the search"),
        ("p", "Hypervolume of the validation front after each trial: the area it dominates in error "
              "(1 - accuracy) against log10 SynOps, where the front and its knee are read, so "
              "halving a member's SynOps counts the same at any scale. Reference point: accuracy "
              f"{reference_point[0]:.0%} (chance level for {record.num_classes} classes) and "
              f"{reference_point[1]:.3g} SynOps ({REFERENCE_SYNOPS_FACTOR:g} x the largest SynOps "
              "the study's config names: its fine-tuning target, the tutorial recipe's when that "
              "trial runs, an explicit upper bound of the searched targets; fixed when the study "
              "was created)."
              + (f" {beyond} finished trial{'s lie' if beyond > 1 else ' lies'} beyond its SynOps "
                 "and add nothing." if beyond else "")),
        ("img", "hypervolume.png"),
        ("img", "layers.png"),
        ("h2", "Open the chosen run"),
        ("list", [f"`make ui`, then {tracker.run_url(tracker.experiment_of(run_id), run_id)} "
                  f"(tracking store: `{redact_url(tracker.uri)}`)",
                  f"`synops export --config <config> --trial {int(member['trial'])}` writes its "
                  "checkpoint and a JSON card for a converter or chip toolchain"]),
    ]


def render_markdown(blocks: list[tuple[str, object]]) -> str:
    parts = []
    for kind, value in blocks:
        if kind == "h1":
            parts.append(f"# {value}")
        elif kind == "h2":
            parts.append(f"## {value}")
        elif kind == "table":
            parts.append(value.to_markdown(index=False, disable_numparse=True))  # keep our formatting
        elif kind == "img":
            parts.append(f"![{value}]({value})")
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in value))
        else:
            parts.append(str(value))
    return "\n\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then render the little Markdown the report uses: **bold**, `code`, [a](b)."""
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


def _check_output(out: Path) -> None:
    """Only an absent or empty folder, or one a report wrote (it holds `MARKER`), may be written
    (`pipeline.owned`); raises `ForeignFolderError` otherwise, before anything is computed."""
    check_replaceable(out, MARKER, "report")


def write_report(study: optuna.Study, out: Path, tracker: Tracker,
                 budgets: list[float] | None = None) -> Path:
    """Write every report file into `out` (replacing a previous report whole, never half-written,
    and refusing any other non-empty folder) and log the folder to the study's parent MLflow run.
    `budgets` are the SynOps budgets to quote (default: the study's own `report.budgets`).
    Raises `EmptyStudyError` if nothing finished, `ForeignFolderError` for a foreign folder,
    `pipeline.owned.OutputWriteError` when the files cannot be written (the old report is kept)."""
    _check_output(out)
    frame = trials_frame(study)
    if frame.empty:
        raise EmptyStudyError(f"study '{study.study_name}' has no finished trial yet: "
                              "run `synops sweep` first (or wait for its first trial)")
    record = StudyRecord.load(study)
    choice = choose(study, frame)
    front, member = choice.members, choice.knee_member
    reference_point = hypervolume_reference(record)
    records = {r.number: r for r in finished_trials(study)}
    members = [records[int(n)] for n in front["trial"]]
    knee_modules = dict(member_network(record.config, records[int(member["trial"])]).named_modules())
    layers = {name: f"{name}: {type(knee_modules[name]).__name__}" if name in knee_modules else name
              for name in dict.fromkeys(n for r in members for n in r.test.synops_per_layer)}
    note = "written by `synops report`; the folder is replaced whole by the next report\n"
    with replacing(out, MARKER, "report", note) as staging:
        pareto_png(frame, study.study_name, staging / "pareto.png", record.bases, member, front)
        pareto_html(frame, study.study_name, staging / "pareto.html", record.bases, member, front)
        hypervolume_png(hypervolume_history(frame, reference_point), reference_point,
                        staging / "hypervolume.png")
        layers_png(front, layers, staging / "layers.png")
        check = spiking_checks(study).get(int(member["trial"]))
        if isinstance(check, SpikingEvaluation):
            snn_layers_png(check, {n: label for n, label in layers.items() if n in check.synops_per_layer},
                           int(member["trial"]), staging / "snn_layers.png")
        columns = ["trial", "kind", "variant", *param_columns(front), "on_variant_front",
                   "val_accuracy", "val_accuracy_low", "val_accuracy_high", "val_synops_mean",
                   "test_accuracy", "test_accuracy_low", "test_accuracy_high", "test_synops_mean",
                   "test_synops_p50", "test_synops_p95", "test_synops_max", *SEED_COLUMNS,
                   *[layer_column(name) for name in layers],
                   *[energy_column(chip) for chip in ENERGY_PROFILES],
                   *[c for c in SNN_COLUMNS if c in front], "mlflow_run_id"]
        front[columns].to_csv(staging / "front.csv", index=False)
        blocks = summary_blocks(study, record, frame, choice, reference_point,
                                budgets or record.config.report.budgets, tracker)
        (staging / "report.md").write_text(render_markdown(blocks))
        (staging / "index.html").write_text(render_html(blocks, f"{study.study_name} report"))
    parent = tracker.run(record.parent_run_id)
    parent.log_folder(out, artifact_path="report")
    parent.set_tags(parent_run_tags(study, frame, with_report=True))
    return out
