"""The user's network and data through `synops sweep`: what cannot be served is refused with exit 2
before either store is touched, a resumed study notices when its data or network changed, and each
variant trains one base model."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import tomli_w
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from tests.conftest import EXPERIMENTS, prepare, smoke_overrides

ROOT = Path(__file__).resolve().parent.parent
FACTORY_HEAD = ("import numpy as np\nfrom torch import nn\n"
                "from pipeline.layers import NeuromorphicReLU, SumPool2d\n\n")
GOOD_NET = ("def make(input_shape, num_classes, width=4):\n"
            "    return nn.Sequential(nn.Conv2d(input_shape[0], width, 5, bias=False), NeuromorphicReLU(),\n"
            "                         SumPool2d(4), nn.Flatten(),\n"
            "                         nn.Linear(width * 36, num_classes, bias=False))\n")
SOURCE = ("def load(n=300, bad=''):\n"
          "    rng = np.random.default_rng(0)\n"
          "    y = rng.integers(0, 4, n)\n"
          "    x = np.zeros((n, 1, 28, 28), dtype=np.uint8)\n"
          "    for i, k in enumerate(y):\n"
          "        x[i, 0, 4 + 5 * k: 10 + 5 * k, 8:20] = 255\n"
          "    if bad == 'shape': x = x[:, 0]\n"
          "    if bad == 'nan': x = x.astype(float) / 255; x[3, 0, 0, 0] = np.nan\n"
          "    if bad == 'negative': x = x.astype(np.int16) - 1\n"
          "    if bad == 'labels': y = y.copy(); y[:5] = 7\n"
          "    return {'train': (x, y), 'test': (x[:60], y[:60] if bad != 'labels' else y[:60] + 9)}\n")


class Study:
    """A study's config file next to its own network and data modules, and its two stores."""

    def __init__(self, folder: Path, idx_root: Path, **changes: object) -> None:
        self.folder = folder
        self.module = f"user_study_{uuid.uuid4().hex[:8]}"
        (folder / f"{self.module}.py").write_text(FACTORY_HEAD + GOOD_NET + "\n\n" + SOURCE)
        values = load_config(EXPERIMENTS / "smoke.toml", smoke_overrides(idx_root) | {
            "study.n_trials": 2, "study.confirm_seeds": 0, "study.reference_trial": False,
            "study.space.spikes_per_pixel": [], "data.source": f"{self.module}:load",
            "data.args": {"n": 300}, "data.val_size": 60, "model.factory": f"{self.module}:make",
            "model.args": {"width": 4}, **changes}).to_dict()
        self.config = folder / "study.toml"
        self.config.write_text(tomli_w.dumps(values))
        self.storage = folder / "optuna.db"
        self.tracking = folder / "mlflow.db"

    def args(self, *sets: str) -> list[str]:
        return ["sweep", "--config", str(self.config), "--storage", f"sqlite:///{self.storage}",
                "--tracking-uri", f"sqlite:///{self.tracking}", "--quiet",
                *[f"--set={s}" for s in sets]]

    def untouched(self) -> bool:
        return not self.storage.exists() and not self.tracking.exists()


REFUSALS = [
    ({"model.factory": "no_such_module_anywhere:make"}, "model.factory", "cannot resolve"),
    ({"model.args": {"depth": 2}}, "model.args", "does not accept ['depth']"),
    ({"data.args": {"n": 300, "bad": "shape"}}, "data.source", "needs (N, C, H, W)"),
    ({"data.args": {"n": 300, "bad": "nan"}}, "data.source", "NaN"),
    ({"data.args": {"n": 300, "bad": "negative"}, "data.kind": "counts"}, "data.source", "negative"),
    ({"data.args": {"n": 300, "bad": "labels"}}, "data.source", "'test' labels range over"),
    ({"data.args": {"rows": 3}}, "data.args", "does not accept ['rows']"),
    ({"study.space.target_synops": [1.0, 2.0]}, "study.space.target_synops", "empty range"),
]


@pytest.mark.parametrize(("changes", "key", "message"), REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_what_cannot_be_served_exits_2_naming_the_key_and_writes_nothing(
        tmp_path: Path, idx_root: Path, changes: dict, key: str, message: str) -> None:
    study = Study(tmp_path, idx_root, **changes)
    result = CliRunner().invoke(main, study.args())
    assert result.exit_code == 2, result.output
    assert f"{key}:" in result.output and message in result.output
    assert study.untouched()


@pytest.mark.parametrize(("net", "message"), [
    ("    return 42\n", "returned a int"),
    ("    raise RuntimeError('out of ideas')\n", "raised RuntimeError: out of ideas"),
    ("    return nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),\n"
     "                         NeuromorphicReLU(), nn.Flatten(), nn.Linear(1936, num_classes))\n",
     "layer '2' (Conv2d) receives non-integer inputs"),
])
def test_a_network_that_cannot_be_counted_exits_2_naming_the_layer(
        tmp_path: Path, idx_root: Path, net: str, message: str) -> None:
    study = Study(tmp_path, idx_root)
    (tmp_path / f"{study.module}.py").write_text(
        FACTORY_HEAD + "def make(input_shape, num_classes, width=4):\n" + net + "\n\n" + SOURCE)
    result = CliRunner().invoke(main, study.args())
    assert result.exit_code == 2 and "model.factory:" in result.output and message in result.output
    assert study.untouched()


def counts(study: Study) -> tuple[int, int]:
    """Trials in the storage and runs in the tracking store."""
    import optuna

    trials = len(optuna.load_study(study_name="smoke", storage=f"sqlite:///{study.storage}").trials)
    client = MlflowClient(f"sqlite:///{study.tracking}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    return trials, len(runs)


@pytest.mark.slow
def test_a_study_does_not_resume_on_changed_data_or_a_changed_network(tmp_path: Path, idx_root: Path) -> None:
    study = Study(tmp_path, idx_root)
    assert CliRunner().invoke(main, study.args()).exit_code == 0
    before = counts(study)
    for change, named in (("data.args.n=320", "data.args.n"), ("model.args.width=6", "model.args.width")):
        result = CliRunner().invoke(main, study.args(change, "study.n_trials=3"))
        assert result.exit_code == 2 and named in result.output, result.output
    # The same config, but the factory's code changed: its parameter shapes name the change. (A
    # new process: this one has imported the module already.)
    module = tmp_path / f"{study.module}.py"
    module.write_text(module.read_text().replace("SumPool2d(4), nn.Flatten(),\n                         "
                                                 "nn.Linear(width * 36",
                                                 "SumPool2d(2), nn.Flatten(),\n                         "
                                                 "nn.Linear(width * 144"))
    done = subprocess.run([sys.executable, "-m", "pipeline", *study.args("study.n_trials=3")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model.factory:" in done.stderr and "4.weight [4, 144] -> [4, 576]" in done.stderr
    # ... and so does the data's, with the same args.
    module.write_text(module.read_text().replace("255\n", "254\n"))
    done = subprocess.run([sys.executable, "-m", "pipeline", *study.args("study.n_trials=3")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "data.source:" in done.stderr and "arrays hash" in done.stderr
    assert counts(study) == before  # nothing was added to either store


@pytest.mark.slow
def test_two_network_variants_train_two_bases_and_later_trials_train_none(
        tmp_path: Path, idx_root: Path) -> None:
    study = Study(tmp_path, idx_root, **{"study.n_trials": 3, "study.space.model": {"width": [2, 4]}})
    config = load_config(study.config)
    prepared = prepare(config, f"sqlite:///{study.storage}", f"sqlite:///{study.tracking}")
    for width in (2, 2, 4):  # the second trial of width 2 trains no base
        prepared.study.enqueue_trial({"model.width": width})
    result = CliRunner().invoke(main, study.args())
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{study.tracking}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    bases = {r.info.run_id: r.data.params["model.args.width"] for r in runs
             if r.data.tags["synops.role"] == "base"}
    assert sorted(bases.values()) == ["2", "4"]
    trials = [r for r in runs if r.data.tags["synops.role"] == "trial"]
    assert len(trials) == 3
    for run in trials:
        assert bases[run.data.tags["synops.base_run_id"]] == run.data.params["model.args.width"]
        assert run.data.params["search.model.width"] == run.data.params["model.args.width"]
