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
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed. Temporaries
    that killed processes left beside `path` are removed first."""
    with atomic_files(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[tuple[Path, ...]]:
    """Yield a temporary path beside each of `paths`; once all are written they are renamed over `paths` one after
    the other, on failure all are removed, so a failure leaves every file as it was."""
    targets = [Path(p) for p in paths]
    temporaries: list[Path] = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            _sweep_files(target)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            temporaries.append(Path(tmp))
        yield tuple(temporaries)
        for tmp in temporaries:
            os.chmod(tmp, _umasked(0o666))
        for tmp, target in zip(temporaries, targets):
            os.replace(tmp, target)
    except BaseException:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
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


def _ours(target: Path, folders: bool = True) -> Iterator[tuple[Path, int, str]]:
    """(path, pid, kind) of every temporary (`.tmp`) or set-aside (`.old`) folder `atomic_dir` made for `target`, or
    with `folders` false, of every temporary file `atomic_files` made for it."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.(?:[^/]*\.(tmp)|(old))$")
    try:
        entries = list(target.parent.iterdir())
    except OSError:  # no parent folder, or one this process may not list: nothing of ours to find
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match and not entry.is_symlink() and (entry.is_dir() if folders else entry.is_file() and match.group(2)):
            yield entry, int(match.group(1)), match.group(2) or match.group(3)


def _sweep_files(target: Path) -> None:
    """Remove the temporary files that processes no longer running left while writing `target` (best effort)."""
    for entry, pid, _ in _ours(target, folders=False):
        if pid != os.getpid() and not _running(pid):  # this process's own may be another thread's, being written
            with contextlib.suppress(OSError):
                entry.unlink()


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
