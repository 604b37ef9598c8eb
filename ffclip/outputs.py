"""Output paths checked before the work starts, so that a mistake costs one line and not a finished run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import InputError, summarize


def check_output_folder(folder: Path, option: str, shown: Path | None = None) -> None:
    """Create `folder` (and its parents) now and make sure a file can be written in it; `InputError` naming `option`
    and the path otherwise. `shown` is the path the user gave, when `folder` is derived from it."""
    shown = folder if shown is None else shown
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"{option} {shown}: cannot write there ({summarize(exc)}); choose a path in a writable "
                         "folder") from None


def check_output_file(path: Path, option: str) -> None:
    """A file to be written at `path`: not an existing folder, and its folder exists (created now) and is writable."""
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder; give a file name")
    check_output_folder(path.parent, option, path)
