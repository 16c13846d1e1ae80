"""Secrets in URLs: a database or tracking URL may carry a password, which is never logged, tagged
or printed. Hand-written: the standard library parses URLs but has no redaction."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

REDACTED = "***"
# Query parameters libpq (and so psycopg and SQLAlchemy) reads a password from.
PASSWORD_PARAMETERS = frozenset({"password"})


def has_password(url: str) -> bool:
    """Whether `url` carries a password (in its user part or as a `password=` parameter); a URL
    that cannot be parsed counts as carrying one. Never raises."""
    return redact_url(url) != url


def redact_url(url: str) -> str:
    """`url` with the password of its user part and any `password=` query parameter replaced by
    `***` (unchanged without one), e.g. `postgresql+psycopg://synops:***@127.0.0.1:5432/optuna`.
    A URL that cannot be parsed is not shown at all (`***`). Never raises."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. an unclosed IPv6 bracket: its text may still hold a password
        return REDACTED
    changed = password is not None
    if changed:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key.lower() in PASSWORD_PARAMETERS for key, _ in query):
        changed = True
        parts = parts._replace(query=urlencode(
            [(key, REDACTED if key.lower() in PASSWORD_PARAMETERS else value) for key, value in query],
            safe="*"))
    return urlunsplit(parts) if changed else url


def redact_text(text: str, url: str) -> str:
    """`text` (an error message that may quote `url`, as MLflow's and requests' messages do) with
    each password `url` carries (user part or `password=` parameter) replaced by `***` wherever it
    appears, percent-encoded or not; a `url` that cannot be parsed hides all of `text`. Never raises."""
    try:
        parts = urlsplit(url)
        passwords = [parts.password or ""]
    except ValueError:
        return REDACTED
    passwords += [value for key, value in parse_qsl(parts.query, keep_blank_values=True)
                  if key.lower() in PASSWORD_PARAMETERS]
    for password in filter(None, passwords):
        for form in {password, quote(password, safe=""), unquote(password)}:
            text = text.replace(form, REDACTED)
    return text
