"""The pipeline's error family: every error a user can cause or meet carries its exit code, so the
command line maps one type to a message and a status.

Exit 2: the input is wrong (a config key, a network or data the pipeline cannot serve); nothing was
written. Exit 1: the work could not be done or finished (a missing file, a diverging run, a store
that cannot be read); finished work is kept.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class PipelineError(Exception):
    """Base of every error the `synops` command reports as one line; `exit_code` is its status."""

    exit_code = EXIT_FAILURE


class ConfigError(PipelineError, ValueError):
    """A config value, or what it names (a network, a data source), that cannot be used; `key` is
    its dotted path, e.g. `train.epochs` or `model.factory`. Raised before anything is written."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(PipelineError):
    """The data cannot be made available or failed verification (a missing or corrupt file of a
    built-in dataset); the message says the fix."""
