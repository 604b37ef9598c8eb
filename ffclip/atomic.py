"""Atomic writes: a file or folder appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umasked(mode: int) -> int:
    """`mode` less the process umask: what a plain `open` or `mkdir` would have given (mkstemp/mkdtemp give 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umasked(0o666))
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _running(pid: int) -> bool:
    """Whether another process `pid` runs (this process is never inside an `atomic_dir` swap when it asks)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(target: Path) -> Iterator[tuple[Path, int, str]]:
    """(path, pid, kind) of every temporary (`.tmp`) or set-aside (`.old`) folder `atomic_dir` made for `target`."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.(?:[^/]*\.(tmp)|(old))$")
    try:
        entries = list(target.parent.iterdir())
    except OSError:  # no parent folder, or one this process may not list: nothing of ours to find
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            yield entry, int(match.group(1)), match.group(2) or match.group(3)


def recover_dir(path: str | os.PathLike) -> None:
    """Undo what an interrupted `atomic_dir` left beside `path`: a set-aside older folder comes back when `path` is
    missing, and the temporaries and set-aside folders of processes that no longer run are removed. Best effort: a
    folder this process may not change is left as it is."""
    target = Path(path)
    stale = [(entry, kind) for entry, pid, kind in _ours(target) if not _running(pid)]
    if not target.exists():
        for entry, kind in stale:
            if kind == "old":
                with contextlib.suppress(OSError):
                    os.replace(entry, target)
                break
    for entry, _ in stale:
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path`, on failure it is deleted and
    `path` is left as it was. The older folder is moved aside, the new one moved in, then the older one removed, so a
    crash at any point leaves one of them; `recover_dir` (run first) restores or removes what a crash left."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{pid}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _umasked(0o777))
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{pid}.old"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
