"""Secrets in URLs: a database or tracking URL may carry a password, which is never logged, tagged
or printed. Hand-written: the standard library parses URLs but has no redaction."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"


def redact_url(url: str) -> str:
    """`url` with the password of its user part replaced by `***` (unchanged without one), e.g.
    `postgresql+psycopg://synops:***@127.0.0.1:5432/optuna`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}"))
