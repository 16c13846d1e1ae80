"""Will it run on the chip? A study with a chip constraint (infeasible trials never trained nor on
the front), the front checked on the chip's integers, and `synops deploy` on a study or a run."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.chip_profiles import SPECK
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.front import (
    DEPLOY_ATTR_PREFIX,
    StudyRecord,
    choose,
    deployments,
    finished_trials,
    infeasible_trials,
)
from pipeline.members import member_network
from pipeline.quantize import quantize_for_chip
from pipeline.tracking import Tracker
from tests.conftest import EXPERIMENTS, prepare, smoke_overrides

TOO_LARGE = [128, 8, 16]  # 128 channels of 24x24 neurons: 128 x 32 x 32 entries > 64 Ki on any core


def overrides(idx_root: Path, **changes: object) -> dict[str, object]:
    return smoke_overrides(idx_root) | {
        "study.constraints.chip": "speck", "study.n_trials": 4, "study.confirm_seeds": 0,
        "study.reference_trial": False, "study.space.spikes_per_pixel": [15],
        "pretrain.max_batches": 0, "pretrain.epochs": 6, "train.max_batches": 0} | changes


def sets(idx_root: Path, **changes: object) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in overrides(idx_root, **changes).items()]


def stores(tmp_path: Path) -> list[str]:
    return ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.mark.slow
def test_a_constrained_study_never_trains_what_does_not_fit_and_checks_its_front(
        tmp_path: Path, idx_root: Path) -> None:
    space = {"study.space.model.channels": [[4, 8, 16], TOO_LARGE]}
    args = ["--config", str(EXPERIMENTS / "smoke.toml"), *stores(tmp_path), *sets(idx_root, **space)]
    config = load_config(EXPERIMENTS / "smoke.toml", overrides(idx_root, **space))
    prepared = prepare(config, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for channels in ([4, 8, 16], TOO_LARGE, [4, 8, 16]):  # each variant tried, at least once
        prepared.study.enqueue_trial({"model.channels": json.dumps(channels)})
    result = CliRunner().invoke(main, ["sweep", "--quiet", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "infeasible, not trained" in result.output and "deploy trial" in result.output
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    infeasible = infeasible_trials(study)
    assert infeasible and all(v.model_args["channels"] == TOO_LARGE for v, _ in infeasible.values())
    assert all("neuron entries" in why and "layer '0'" in why for _, why in infeasible.values())
    assert all(study.trials[n].constraints["speck"] > 0 for n in infeasible)
    front = {t.number for t in study.best_trials}
    assert front and not front & set(infeasible)  # a front of fitting nets only
    record = StudyRecord.load(study)
    assert all(b.variant.model_args["channels"] != TOO_LARGE for b in record.bases.values())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert all(r.data.params.get("model.args.channels") != str(TOO_LARGE) for r in runs)
    checked = deployments(study)
    assert set(checked) == {int(n) for n in choose(study).members["trial"]}
    assert all(d.fits and d.summary == "fits speck: 4 of 9 cores" for d in checked.values())

    # The front's knee on the chip's integers: within half a point of the float network, every
    # layer using the 8-bit range and none all zero.
    knee = next(r for r in finished_trials(study) if r.number == int(choose(study).knee_member["trial"]))
    assert knee.test.accuracy > 0.8  # a trained network
    assert abs(checked[knee.number].quantized.accuracy - knee.test.accuracy) <= 0.005
    model = member_network(record.config, knee)
    model.load_state_dict(Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}").load_checkpoint(knee.run_id))
    quantized = quantize_for_chip(model, SPECK)
    assert all(layer.levels_used == SPECK.weight_max or layer.weights_over_threshold
               for layer in quantized.layers)
    assert not [p for p in quantized.problems if p.rule == "all-zero"]
    run = client.get_run(knee.run_id)
    assert run.data.tags["synops.speck"] == "fits speck: 4 of 9 cores"
    assert run.data.metrics["speck_quantized_test_accuracy"] == checked[knee.number].quantized.accuracy

    report = CliRunner().invoke(main, ["report", *args, "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## On the chip" in text and "fits speck: 4 of 9 cores" in text and "8-bit test acc" in text
    assert "was not trained: does not fit speck" in text and "after quantisation" in text

    # A chip check recorded by an older version (without a field this one records): the report
    # says so instead of failing, and the next sweep checks that member again.
    older = dict(study.user_attrs[f"{DEPLOY_ATTR_PREFIX}{knee.number}"])
    del older["membrane_bits"]
    study.set_user_attr(f"{DEPLOY_ATTR_PREFIX}{knee.number}", older)
    report = CliRunner().invoke(main, ["report", *args, "--out", str(tmp_path / "report-older")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report-older" / "report.md").read_text()
    assert f"trial {knee.number}: its chip check was recorded by an older version" in text
    assert knee.number not in deployments(study)
    again = CliRunner().invoke(main, ["sweep", "--quiet", *args], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert f"deploy trial {knee.number:3d}" in again.output
    assert deployments(study)[knee.number].membrane_bits == checked[knee.number].membrane_bits


def test_a_study_where_nothing_fits_is_refused_before_anything_is_written(
        tmp_path: Path, idx_root: Path) -> None:
    args = ["--config", str(EXPERIMENTS / "smoke.toml"), *stores(tmp_path),
            *sets(idx_root, **{"model.args.channels": TOO_LARGE})]
    result = CliRunner().invoke(main, ["sweep", "--quiet", *args])
    assert result.exit_code == 2
    assert "study.constraints.chip: no variant of the study fits speck" in result.output
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_deploy_checks_a_run_and_a_studys_members_and_logs_to_their_runs(
        tmp_path: Path, idx_root: Path) -> None:
    config = ["--config", str(EXPERIMENTS / "smoke.toml"), *stores(tmp_path),
              *sets(idx_root, **{"study.constraints.chip": "", "study.n_trials": 2})]
    assert CliRunner().invoke(main, ["sweep", "--quiet", *config]).exit_code == 0
    result = CliRunner().invoke(main, ["deploy", "--knee", "--max-samples", "50", *config],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "fits speck: 4 of 9 cores" in result.output and "core 0, kernel memory" in result.output
    assert "as a spiking network" in result.output and "effective MACs" in result.output
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (knee,) = deployments(study).values()
    assert knee.spiking is not None and knee.spiking.samples == 50
    other = next(r for r in finished_trials(study) if r.number not in deployments(study))
    by_run = CliRunner().invoke(main, ["deploy", other.run_id, "--max-samples", "20", "--data-root",
                                       str(idx_root), *stores(tmp_path)[2:]], catch_exceptions=False)
    assert by_run.exit_code == 0, by_run.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "speck_quantized_snn_test_accuracy" in client.get_run(other.run_id).data.metrics
    artifacts = [a.path for a in client.list_artifacts(other.run_id, "deploy")]
    assert artifacts == ["deploy/speck.json"]
    usage = CliRunner().invoke(main, ["deploy", "--knee", *stores(tmp_path)])
    assert usage.exit_code == 2 and "give a RUN_ID, or --config" in usage.output
