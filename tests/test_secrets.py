"""Passwords in URLs: redacted wherever a URL is shown, and warned about on a command line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.secrets import REDACTED, redact_text, redact_url
from tests.conftest import EXPERIMENTS


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://synops:s3cret@127.0.0.1:5432/optuna",
     "postgresql+psycopg://synops:***@127.0.0.1:5432/optuna"),
    ("postgresql://u:p%40ss@db.example:5432/x?sslmode=require",
     "postgresql://u:***@db.example:5432/x?sslmode=require"),
    ("postgresql://u@db/x?sslmode=require&password=s3cret",
     "postgresql://u@db/x?sslmode=require&password=***"),
    ("http://alice:s3cret@10.0.0.5:5000", "http://alice:***@10.0.0.5:5000"),
    ("postgresql+psycopg://synops@127.0.0.1:5432/optuna",
     "postgresql+psycopg://synops@127.0.0.1:5432/optuna"),
    ("sqlite:///mlruns/optuna.db", "sqlite:///mlruns/optuna.db"),
])
def test_a_password_is_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url) and "p%40ss" not in redact_url(url)


@pytest.mark.parametrize("url", [
    "http://alice:s3cret@10.0.0.5:5000",
    "postgresql://u:s3cret%40x@db/x",
    "postgresql://u@db/x?password=s3cret",
])
def test_a_password_quoted_in_an_error_message_is_not_shown(url: str) -> None:
    # MLflow's and requests' messages quote the URL they called, user part and all
    message = f"API request to {url}/api/2.0/mlflow/experiments/search failed (s3cret@x, s3cret%40x)"
    shown = redact_text(message, url)
    assert "s3cret" not in shown
    assert shown.startswith("API request to ") and "/api/2.0/mlflow/experiments/search failed" in shown
    assert redact_text("connection refused", url) == "connection refused"


def test_a_url_that_cannot_be_read_is_not_shown_at_all() -> None:
    # urlsplit refuses an unclosed IPv6 bracket; showing the text could show its password
    shown = redact_url("postgresql://u:s3cret@[::1/x")
    assert "s3cret" not in shown and REDACTED in shown


def test_a_password_on_the_command_line_is_warned_about_without_showing_it(tmp_path) -> None:
    url = "postgresql+psycopg://synops:s3cret@127.0.0.1:1/optuna"
    result = CliRunner().invoke(main, ["report", "--config", str(EXPERIMENTS / "smoke.toml"),
                                       "--set=name=\"../x\"", "--storage", url])
    assert result.exit_code == 2  # refused for its name, before any store is opened
    assert "visible to every user" in result.output and "PGPASSFILE" in result.output
    assert "s3cret" not in result.output
