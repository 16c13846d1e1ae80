"""`synops services`: the database password stays out of every command line, output and store, and
`stop` signals only the processes the services started. Real PostgreSQL and `mlflow server`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.services import STATE_FILE, load_services, stop_services
from tests.conftest import EXPERIMENTS, postgres_missing, server_storage, smoke_overrides


def _ps() -> str:
    """Every process's command line, as any user on the machine sees it."""
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout


def test_stop_never_signals_a_process_the_services_did_not_start(tmp_path: Path) -> None:
    """After a reboot the recorded process ids belong to anything: here a `sleep` (a session
    leader, as the MLflow server was) stands in for it, named both by services.json and by a
    postmaster.pid left behind."""
    folder = tmp_path / "services"
    (folder / "postgres").mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        (folder / STATE_FILE).write_text(json.dumps({
            "folder": str(folder), "host": "127.0.0.1", "postgres_port": 1, "mlflow_port": 1,
            "password": "x", "mlflow_pid": stranger.pid}))
        (folder / "postgres" / "postmaster.pid").write_text(
            f"{stranger.pid}\n{folder / 'postgres'}\n1000000000\n1\n")
        result = CliRunner().invoke(main, ["services", "stop", "--dir", str(folder)])
        time.sleep(0.2)
        assert stranger.poll() is None, "a process the services did not start was signalled"
        assert result.exit_code == 0, result.output
        assert f"process {stranger.pid} is not" in result.output and "left alone" in result.output
        assert "no services were running" in result.output
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.slow
@pytest.mark.skipif(postgres_missing() is not None, reason="PostgreSQL is not installed here")
def test_the_password_is_in_no_command_line_output_or_store_and_a_restart_keeps_it_all(
        idx_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Services started in a folder of the user's, named relative to the working directory as
    `make services` names `.services` (PostgreSQL resolves relative paths from its own data
    folder, so the services must hand it none), the folder's mode kept; a sweep on another
    "machine" given only the password-free URL and the pgpass file, then the sweep's and the
    services' traces searched for the password; stopped and started again: the same URLs, the
    study still there, the password in no output."""
    parent = Path(tempfile.mkdtemp(prefix="synops-services-"))  # PostgreSQL (as `postgres`) enters it
    parent.chmod(0o755)
    monkeypatch.chdir(parent)
    folder = parent / "mine"
    folder.mkdir()
    folder.chmod(0o751)  # the user's own choice: enterable by `postgres`, not listable
    try:
        started = CliRunner().invoke(main, ["services", "start", "--dir", "mine"])
        assert started.exit_code == 0, started.output
        first = load_services(folder)
        password = first.password
        assert (folder.stat().st_mode & 0o777) == 0o751  # never chmod a folder we did not create
        pgpass = folder / "services.pgpass"
        assert (pgpass.stat().st_mode & 0o777) == 0o600
        assert f"export PGPASSFILE={pgpass}" in started.output
        assert password not in started.output
        assert password not in _ps()  # nor in the MLflow server's arguments
        (storage,) = re.findall(r"--storage '([^']+)'", started.output)
        tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"

        # psycopg (libpq) finds the password itself: in PGPASSWORD, or the file PGPASSFILE names
        for env in ({"PGPASSWORD": password, "PGPASSFILE": "/nonexistent"}, {"PGPASSFILE": str(pgpass)}):
            with pytest.MonkeyPatch.context() as patch:
                patch.delenv("PGPASSWORD", raising=False)
                for key, value in env.items():
                    patch.setenv(key, value)
                with sqlalchemy.create_engine(storage).connect() as connection:
                    assert connection.execute(sqlalchemy.text("select 1")).scalar() == 1

        sets = smoke_overrides(idx_root) | {"study.n_trials": 1, "study.confirm_seeds": 0,
                                            "study.space.spikes_per_pixel": [255]}
        args = ["--config", str(EXPERIMENTS / "smoke.toml"), "--storage", storage, "--tracking-uri",
                tracking, "--quiet", *[f"--set={k}={json.dumps(v)}" for k, v in sets.items()]]
        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"} | {"PGPASSFILE": str(pgpass)}
        log = tmp_path / "sweep.log"
        with open(log, "w") as out:
            worker = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", *args], env=env,
                                      stdout=out, stderr=subprocess.STDOUT)
            seen = []
            while worker.poll() is None:
                seen.append(_ps())
                time.sleep(1)
        output = log.read_text()
        assert worker.returncode == 0, output[-3000:]
        assert all(password not in table for table in seen)

        # A password given in the URL anyway (in-process here) is not printed back either.
        secret_url = storage.replace("synops@", f"synops:{password}@")
        again = CliRunner().invoke(main, ["sweep", *args[:2], "--storage", secret_url, *args[4:]])
        assert again.exit_code == 0, again.output
        assert "synops:***@" in again.output
        store = [tmp_path / "mlruns" / "mlflow.db", *(tmp_path / "mlruns").rglob("*")]
        logs = [folder / "mlflow.log", *folder.glob("postgres-run/*.log")]
        for path in [p for p in store + logs if p.is_file()]:
            assert password.encode() not in path.read_bytes(), path
        assert password not in output + again.output

        stopped = CliRunner().invoke(main, ["services", "stop", "--dir", "mine"])
        assert stopped.exit_code == 0 and "services stopped" in stopped.output, stopped.output
        assert not (folder / "postgres" / "postmaster.pid").exists()

        restarted = CliRunner().invoke(main, ["services", "start", "--dir", "mine"])
        assert restarted.exit_code == 0, restarted.output
        second = load_services(folder)
        assert (second.storage_url, second.tracking_uri, second.password) == (
            first.storage_url, first.tracking_uri, password)
        assert password not in restarted.output
        with server_storage(secret_url) as kept:  # its data kept
            assert optuna.load_study(study_name="smoke", storage=kept).trials
        assert (folder / STATE_FILE).stat().st_mode & 0o077 == 0
    finally:
        stop_services(folder)
        shutil.rmtree(parent, ignore_errors=True)

