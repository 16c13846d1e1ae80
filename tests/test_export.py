"""`synops export` writes only into a folder of its own, replaced whole: refused elsewhere, and a
re-export leaves nothing of the previous one behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.sweep.workers import run_sweep
from tests.conftest import EXPERIMENTS, smoke_overrides

# Its tests share a module-scoped fixture: under `make test` (pytest-xdist, --dist loadgroup) they run
# in one process, so the fixture is made once.
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope="module")
def exportable(idx_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A one-trial study (one encoding, no confirmations) and the CLI args that reach it."""
    folder = tmp_path_factory.mktemp("export-study")
    storage, tracking = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    overrides = smoke_overrides(idx_root) | {"study.n_trials": 1, "study.confirm_seeds": 0,
                                             "study.space.spikes_per_pixel": [255]}
    run_sweep(load_config(EXPERIMENTS / "smoke.toml", overrides), storage, tracking,
              progress=False, echo=lambda line: None)
    return ["--config", str(EXPERIMENTS / "smoke.toml"), "--storage", storage,
            "--tracking-uri", tracking, *[f"--set={k}={json.dumps(v)}" for k, v in overrides.items()]]


def export(args: list[str], out: Path, *extra: str):
    return CliRunner().invoke(main, ["export", *args, "--trial", "0", "--out", str(out), *extra])


def test_a_folder_with_files_export_did_not_write_is_refused_and_left_alone(
    exportable: list[str], tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.pt").write_text("my own model, not a checkpoint of this study")
    result = export(exportable, mine)
    assert result.exit_code == 2, result.output
    assert "left alone" in result.output
    assert [p.name for p in mine.iterdir()] == ["model.pt"]
    assert (mine / "model.pt").read_text().startswith("my own model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left either

    report = tmp_path / "report"  # another command's folder is not an export's either
    report.mkdir()
    (report / ".synops-report").write_text("")
    assert export(exportable, report).exit_code == 2


def test_a_re_export_replaces_the_folder_whole(exportable: list[str], tmp_path: Path) -> None:
    out = tmp_path / "exports" / "trial-0"
    first = export(exportable, out, "--format", "nir")
    assert first.exit_code == 0, first.output
    assert {"model.pt", "config.toml", "card.json", "model.nir"} <= {p.name for p in out.iterdir()}

    again = export(exportable, out)  # without NIR this time: the old model.nir must not stay
    assert again.exit_code == 0, again.output
    assert not (out / "model.nir").exists()
    assert "nir" not in json.loads((out / "card.json").read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == ["trial-0"]  # no staging or old folder

    empty = tmp_path / "empty"  # an empty folder is taken, as a new one would be
    empty.mkdir()
    assert export(exportable, empty).exit_code == 0
    assert (empty / "card.json").is_file()
