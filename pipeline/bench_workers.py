"""`synops bench-workers`: trials per minute with 1, 2 and 3 workers, on the local SQLite stores
and on PostgreSQL with an MLflow server (`synops services`): the measurement behind the README's
"Outgrowing one machine".

Each cell is a fresh study of `--trials` short trials (experiments/smoke.toml on real MNIST, no
confirmation stage) run by `synops sweep --workers N`; trials per minute count from the first
trial's start to the last trial's end, so process start-up and the base model are left out.

    synops bench-workers [--trials 12] [--workers 1 --workers 2 ...] [--set key=value ...]

The smoke study's trials train ~0.5 s each (1,200 images, 3 batches), so it measures what the
stores cost per trial; `--set data.max_train_samples=0 --set train.max_batches=0` makes each
trial a full epoch over the 55,000 training images instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline.errors import PipelineError
from pipeline.services import start_services, stop_services

ROOT = Path(__file__).resolve().parent.parent  # experiments/ lives beside the package


class BenchWorkersError(PipelineError, RuntimeError):
    """A measured sweep failed; its output's end is in the message."""


def run_cell(storage: str, tracking: str, name: str, workers: int, trials: int,
             overrides: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """One fresh study of the smoke config run by `synops sweep --workers N`, timed; `env` adds
    to its environment (the password file of a server's database)."""
    command = [sys.executable, "-m", "pipeline", "sweep", "--config",
               str(ROOT / "experiments" / "smoke.toml"), "--storage", storage,
               "--tracking-uri", tracking, "--workers", str(workers), "--quiet",
               f"--set=name=\"{name}\"", f"--set=study.n_trials={trials}",
               "--set=study.confirm_seeds=0", *[f"--set={o}" for o in overrides]]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | (env or {}))
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchWorkersError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    study = optuna.load_study(study_name=name, storage=storage)
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    span = (max(t.datetime_complete for t in finished)
            - min(t.datetime_start for t in finished)).total_seconds()
    return {"workers": workers, "trials": len(finished), "trial_span_s": round(span, 1),
            "trials_per_min": round(len(finished) / span * 60, 1), "command_wall_s": round(wall, 1)}


def run_bench_workers(trials: int, workers: list[int], overrides: list[str], data_root: Path,
                      echo: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Every cell (SQLite files, then PostgreSQL + MLflow server; each worker count), as rows."""
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="synops-bench-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # PostgreSQL, run as `postgres` under root, must enter it
        local = (f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}")
        services = start_services(folder / "services", echo=echo)
        try:
            password = {"PGPASSFILE": str(services.pgpass_file)}
            for label, (storage, tracking), env in (
                    ("sqlite", local, {}),
                    ("postgresql", (services.worker_storage_url, services.tracking_uri), password)):
                for count in workers:
                    cell = run_cell(storage, tracking, f"bench-{label}-{count}", count, trials,
                                    [f"data.root=\"{data_root.resolve()}\"", *overrides], env)
                    results.append({"stores": label, **cell})
                    echo(json.dumps(results[-1]))
        finally:
            stop_services(folder / "services")
    return results


def markdown_table(results: list[dict[str, float]]) -> str:
    rows = [f"| {r['stores']} | {r['workers']} | {r['trials_per_min']} | {r['trials']} | "
            f"{r['trial_span_s']} s | {r['command_wall_s']} s |" for r in results]
    return "\n".join(["| stores | workers | trials/min | trials | first start to last end | command |",
                      "|---|---:|---:|---:|---:|---:|", *rows])
