"""Report and export, rendered from a small real study (a smoke sweep on generated data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image
import mlflow
import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.front import KNEE_SINGLE, Choice, Knee, choose, detectable_difference
from pipeline.model import build_model
from pipeline.owned import previous_folder
from pipeline.report import _noise_blocks
from pipeline.sweep.workers import run_sweep
from tests.conftest import EXPERIMENTS, smoke_overrides

# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = pytest.mark.xdist_group(__name__)


def test_report_files_hold_the_front(study_stores: tuple[str, str, list[str]], tmp_path: Path) -> None:
    storage, tracking, args = study_stores
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", *args, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="smoke", storage=storage)
    assert len(study.get_trials(states=(optuna.trial.TrialState.FAIL,))) == 1

    front = pd.read_csv(out / "front.csv")
    assert sorted(front["trial"]) == sorted(t.number for t in study.best_trials)
    assert {"test_synops_p95", "test_synops_0", "test_energy_uj_loihi", "mlflow_run_id"} <= set(front)
    for name in ("pareto.png", "hypervolume.png", "layers.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 200
    page = (out / "pareto.html").read_text()
    assert (out / "plotly.min.js").is_file() and "cdn.plot.ly" not in page
    for _, row in front.iterrows():
        assert f"trial {row['trial']} " in page and row["mlflow_run_id"] in page
    summary = (out / "report.md").read_text()
    knee = choose(study).knee_member  # chosen on the seed means: smoke.toml confirms its front
    assert knee["on_front"]
    assert f"Knee: trial {int(knee['trial'])}" in summary
    assert f"variant **{int(knee['spikes_per_pixel'])} spikes/pixel**" in summary
    assert set(front["spikes_per_pixel"]) <= {255, 15} and "on_variant_front" in front
    assert "## Variants" in summary and "| 15 spikes/pixel " in summary and "| 255 spikes/pixel " in summary
    assert "tutorial recipe" in summary and "unpenalised base model" in summary
    assert "1 failed, 1 running" in summary
    assert "Rule (on the validation seed means): " in summary  # smoke.toml confirms its front
    assert f"trial {int(knee['trial'])}" in (out / "index.html").read_text()
    parent = study.user_attrs["mlflow_parent_run_id"]
    logged = {a.path for a in mlflow.MlflowClient(tracking).list_artifacts(parent, "report")}
    assert "report/front.csv" in logged and "report/index.html" in logged


def test_export_writes_a_loadable_checkpoint_and_card(
    study_stores: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    _, _, args = study_stores
    out = tmp_path / "knee"
    result = CliRunner().invoke(main, ["export", *args, "--knee", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert card["on_front"] and card["metrics"]["test_synops_mean"] > 0
    config = load_config(out / "config.toml")
    model = build_model(config.model, tuple(card["input_shape"]), card["num_classes"])
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    missing = CliRunner().invoke(main, ["export", *args, "--trial", "999", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "not a finished trial" in missing.output


def test_a_study_without_finished_trials_gets_a_message_and_no_files(
    idx_root: Path, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="smoke", storage=storage, directions=["maximize", "minimize"])
    out = tmp_path / "report"
    result = CliRunner().invoke(main, [
        "report", "--config", str(EXPERIMENTS / "smoke.toml"), "--storage", storage,
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(out)])
    assert result.exit_code == 1
    assert "no finished trial" in result.output
    assert not out.exists()
    absent = CliRunner().invoke(main, ["report", "--config", str(EXPERIMENTS / "seed.toml"),
                                       "--storage", storage])
    assert absent.exit_code == 1 and "no study named 'seed'" in absent.output


def test_report_never_deletes_a_folder_it_did_not_write(
    study_stores: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    _, _, args = study_stores
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(main, ["report", *args, "--out", str(mine)])
    assert refused.exit_code == 2, refused.output
    assert "left alone" in refused.output
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1

    out = tmp_path / "reports" / "smoke"
    for _ in range(2):  # a report's own folder is replaced whole
        result = CliRunner().invoke(main, ["report", *args, "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["smoke"]


def test_report_describes_the_study_as_it_was_run_and_quotes_the_budgets_asked_for(
    study_stores: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    _, _, args = study_stores
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", *args, "--out", str(out),
                                       "--set=report.budgets=[123456.0]", "--set=data.val_size=150"])
    assert result.exit_code == 0, result.output
    summary = (out / "report.md").read_text()
    assert "validation: 100 samples held out" in summary  # as the study was run
    assert "1.23e+05" in summary  # the budgets are the reader's question


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ".."])
def test_a_study_name_that_is_a_path_is_refused(name: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", "--config", str(EXPERIMENTS / "smoke.toml"),
                                       f"--set=name={json.dumps(name)}",
                                       "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"])
    assert result.exit_code == 2 and "name" in result.output


def test_a_knee_at_an_encoding_the_study_does_not_search_is_reported(
    idx_root: Path, tmp_path: Path
) -> None:
    """The tutorial's reference trial runs at 255 spikes per pixel, which a study may not search
    (so has no base model of it): as the knee, it is still compared and its floor stated."""
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = smoke_overrides(idx_root) | {"study.space.spikes_per_pixel": [15],
                                             "study.n_trials": 1, "study.confirm_seeds": 0}
    run_sweep(load_config(EXPERIMENTS / "smoke.toml", overrides), storage, tracking,
              progress=False, echo=lambda line: None)
    args = ["--config", str(EXPERIMENTS / "smoke.toml"), "--storage", storage, "--tracking-uri",
            tracking, *[f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]]
    result = CliRunner().invoke(main, ["report", *args, "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "report" / "report.md").read_text()
    assert "variant **255 spikes/pixel**" in summary  # the reference trial is the knee
    assert "vs the unpenalised base model" not in summary  # no trial needed one: none was trained
    assert "input-layer floor of its variant: " in summary


def noise_items(members: pd.DataFrame) -> list[str]:
    choice = Choice(members, members, Knee(0, KNEE_SINGLE))
    ((_, title), (kind, items)) = _noise_blocks(choice, detectable_difference(0.987, 5000), 5000)
    assert title == "How far the front can be trusted" and kind == "list"
    return items


def test_the_noise_paragraph_states_one_intervals_half_width_and_the_detectable_difference() -> None:
    # 98.7% on 5,000 images: one 95% interval reaches 1.96 sqrt(0.987 * 0.013 / 5000) = 0.314
    # points either side; two accuracies measured on different images must differ by sqrt(2)
    # times that, 0.444 points (the report said each interval was that wide).
    members = pd.DataFrame([{"trial": 1, "seeds": 1, "mean_over": "selection run", "val_accuracy": 0.987,
                             "val_mean_low": 0.98, "val_mean_high": 0.99, "val_synops_mean_mean": 1e6,
                             "dominated_on_means": False}])
    items = noise_items(members)
    assert "on 5000 images" in items[0] and "about ±0.31 points" in items[0]
    assert "**0.44 points** (√2 × 0.31)" in items[0] and "that wide" not in items[0]
    assert "trained once" in items[2]
    confirmed = pd.concat([members, members.assign(trial=2, val_synops_mean_mean=2e6)])
    confirmed = confirmed.assign(seeds=2, mean_over="confirmations").reset_index(drop=True)
    items = noise_items(confirmed)
    assert "means of the confirmation runs (2 per member" in items[2] and "left out" in items[2]


_watchers: list = []  # an audit hook cannot be removed: this one acts only while a test lists a watcher


def _on_audit(event: str, args: tuple) -> None:
    if _watchers and event in ("os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"):
        _watchers[-1](event, args)


sys.addaudithook(_on_audit)


def test_a_report_replaced_is_never_missing_at_any_step(
    study_stores: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    """Before every rename and removal the replacement makes (watched through Python's audit
    hooks, nothing patched), a complete report exists: the old one at `--out` or at the known name
    it waits under, or the new one at `--out`. Before, the old one was removed before the new one
    was moved in."""
    _, _, args = study_stores
    out = tmp_path / "reports" / "smoke"
    assert CliRunner().invoke(main, ["report", *args, "--out", str(out)]).exit_code == 0
    waiting = previous_folder(out)

    def complete(folder: Path) -> bool:
        return (folder / ".synops-report").is_file() and (folder / "index.html").is_file()

    steps: list[tuple[str, bool]] = []
    _watchers.append(lambda event, _: steps.append((event, complete(out) or complete(waiting))))
    try:
        result = CliRunner().invoke(main, ["report", *args, "--out", str(out)])
    finally:
        _watchers.clear()
    assert result.exit_code == 0, result.output
    assert steps and all(ok for _, ok in steps), steps
    assert complete(out) and sorted(p.name for p in out.parent.iterdir()) == ["smoke"]


def test_a_replacement_a_crash_interrupted_is_finished_by_the_next_report(
    study_stores: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    _, _, args = study_stores
    out = tmp_path / "reports" / "smoke"
    assert CliRunner().invoke(main, ["report", *args, "--out", str(out)]).exit_code == 0
    out.rename(previous_folder(out))  # what a crash between the two renames leaves
    result = CliRunner().invoke(main, ["report", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "index.html").is_file() and sorted(p.name for p in out.parent.iterdir()) == ["smoke"]

    previous_folder(out).mkdir()  # a folder of the user's under that name is not ours to remove
    (previous_folder(out) / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(main, ["report", *args, "--out", str(out)])
    assert refused.exit_code == 2 and "left alone" in refused.output
    assert (previous_folder(out) / "notes.txt").read_text() == "keep me"
