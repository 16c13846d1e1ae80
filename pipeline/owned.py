"""Output folders the program owns, and the one rule by which it writes them (`synops report`,
`synops export`): a folder is created fresh, or replaced whole when it carries the command's marker
file; any other non-empty folder is refused and left alone.

A replacement never leaves a half-written folder and never loses the old one. Everything is written
into a staging folder beside `out`, then swapped in by renames, each atomic on one file system:

1. `out` -> `previous_folder(out)` (`.<name>.synops-old`, beside it),
2. staging -> `out`,
3. the previous folder is removed.

At every instant a complete folder exists under a known name: the old one at `out` (before 1) or
at `previous_folder(out)` (between 1 and 2), the new one at `out` (from 2 on). A crash between 1 and
2 leaves `out` missing and the old folder waiting beside it; the next write of the same `out` puts it
back first (and a crash between 2 and 3 leaves a previous folder that the next write removes). A
crash while writing leaves a hidden staging folder (`.<name>.synops-new-<random>`), which is never
taken for the output. A folder that does not exist or is empty is replaced in one rename.

Hand-written: neither the standard library nor any dependency replaces a folder atomically.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import EXIT_BAD_INPUT, PipelineError


class ForeignFolderError(PipelineError, ValueError):
    """The output folder (or the name a replacement needs beside it) holds something this command
    did not write; it is left alone and nothing is written."""

    exit_code = EXIT_BAD_INPUT


class OutputWriteError(PipelineError):
    """Writing or swapping in the output failed (a full disk, a folder that cannot be written); the
    previous output, if any, is still in place."""


def previous_folder(out: Path) -> Path:
    """Where the old folder waits while `out` is replaced: `.<name>.synops-old` beside it."""
    return out.with_name(f".{out.name}.synops-old")


def _normal(out: Path) -> Path:
    """`out` absolute, `.` and `..` resolved by name (a link at `out` itself is not followed: it is
    refused, not written through)."""
    return Path(os.path.abspath(out))


def _ours(folder: Path, marker: str) -> bool:
    """Whether `folder` is a real folder (not a link) holding `marker`."""
    return folder.is_dir() and not folder.is_symlink() and (folder / marker).is_file()


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """Raise `ForeignFolderError` (exit 2) unless `out` is absent, an empty
    folder, or a folder `what` (e.g. "report") wrote, i.e. one holding `marker`; the same for the
    previous folder an interrupted replacement may have left beside it. Reads only."""
    out = _normal(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ForeignFolderError(f"{out} exists and is a link or not a folder; it is left alone: choose "
                                 "another --out")
    if out.is_dir() and any(out.iterdir()) and not _ours(out, marker):
        raise ForeignFolderError(f"{out} holds files that no {what} wrote; it is left alone: choose an "
                                 "empty or new folder with --out")
    waiting = previous_folder(out)
    if (waiting.exists() or waiting.is_symlink()) and not _ours(waiting, marker):
        raise ForeignFolderError(f"{waiting}, where a {what} keeps the previous folder while replacing "
                                 f"{out}, holds something no {what} wrote; it is left alone: move it, or "
                                 "choose another --out")


def _finish_interrupted(out: Path, marker: str) -> None:
    """Finish what a crash interrupted: put a waiting previous folder back where `out` is missing,
    or remove it where the new folder was already in place."""
    waiting = previous_folder(out)
    if not _ours(waiting, marker):
        return
    if out.exists():
        shutil.rmtree(waiting)
    else:
        os.rename(waiting, out)


def _staging_folder(out: Path) -> Path:
    """A new hidden folder beside `out`, with the mode the user's umask gives (tempfile.mkdtemp
    would make it 0700, hiding the output from a web server or a colleague)."""
    while True:
        staging = out.with_name(f".{out.name}.synops-new-{secrets.token_hex(4)}")
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def _swap_in(staging: Path, out: Path, marker: str, what: str) -> None:
    """Make `staging` the folder `out`, replacing the old one by renames (module docstring)."""
    _finish_interrupted(out, marker)
    check_replaceable(out, marker, what)  # again: the folder may have changed meanwhile
    if not out.exists() or not any(out.iterdir()):
        os.rename(staging, out)  # one atomic step: onto nothing, or onto an empty folder
        return
    waiting = previous_folder(out)
    os.rename(out, waiting)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(waiting, out)  # the old folder goes back; staging is removed by the caller
        raise
    shutil.rmtree(waiting)


@contextlib.contextmanager
def replacing(out: Path, marker: str, what: str, note: str) -> Iterator[Path]:
    """Yield an empty staging folder to write `out`'s new content into; when the block ends
    without an exception, the staging folder (with `marker`, holding `note`, added) replaces `out`
    as the module docstring says. `what` names the command in messages ("report", "export").

    Raises `ForeignFolderError` (exit 2) before the block runs when `out` is not ours to replace, and
    `OutputWriteError` (exit 1) when writing or swapping fails with an OSError (e.g. a full disk);
    on any exception the staging folder is removed and the old `out` is left as it was."""
    out = _normal(out)
    check_replaceable(out, marker, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _staging_folder(out)
    except OSError as err:
        raise OutputWriteError(f"cannot write {out}: {err}") from err
    try:
        (staging / marker).write_text(note)
        yield staging
        _swap_in(staging, out, marker, what)
    except PipelineError:
        raise  # already says what went wrong (some are OSErrors too, e.g. a lease's TimeoutError)
    except OSError as err:
        raise OutputWriteError(f"cannot write {out}: {err} (the previous {what}, if any, is kept)"
                               ) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once swapped in
