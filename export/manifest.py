"""`manifest.json` of an artifact folder: writing it, reading it and checking every file against its sha256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ffclip.atomic import atomic_file
from ffclip.errors import FfclipError

MANIFEST = "manifest.json"
FORMAT = "ffclip-artifacts"
FORMAT_VERSION = 1


class ArtifactError(FfclipError):
    """An artifact folder that is missing, incomplete, changed since export or of an unknown format."""


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, keyed by POSIX relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Hash the folder's files into `manifest["files"]` and write `manifest.json` atomically."""
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": hash_folder(folder)}
    path = folder / MANIFEST
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The folder's manifest; with `verify`, every listed file must exist with its recorded sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; {folder} is not an artifact folder (create one with ffclip-export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc}); re-export with ffclip-export --out {folder}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest; re-export with ffclip-export --out {folder}"
        )
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a folder where a listed file is missing or its bytes changed since export."""
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the artifact folder; re-export with ffclip-export --out {folder}")
        if sha256(path) != digest:
            raise ArtifactError(
                f"{path}: changed since export (sha256 differs from manifest.json); "
                f"re-export with ffclip-export --out {folder}"
            )
