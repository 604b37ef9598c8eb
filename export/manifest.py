"""`manifest.json` of an artifact folder: writing it, reading it and checking every file against its sha256."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from ffclip.atomic import atomic_file, recover_dir
from ffclip.errors import FfclipError, summarize

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


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def _reexport(folder: Path) -> str:
    return f"re-export with ffclip-export --out {folder}"


def confined_name(folder: Path, name: object, where: str) -> str:
    """`name` as a POSIX path relative to `folder` that stays inside it (no absolute path, no `..`, no empty part);
    `ArtifactError` naming `where` otherwise."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or parts[0] == "/" or any(p in ("..", ".") for p in parts) or "\\" in name or name != "/".join(parts):
        raise ArtifactError(f"{folder / MANIFEST}: {where} names {name!r}, which is not a plain path inside the folder "
                            f"(outside it, absolute or not a string); {_reexport(folder)}")
    return name


def resolve_inside(folder: Path, name: str) -> Path:
    """The real path of `folder/name` once symlinks are resolved; `ArtifactError` when that leaves the folder."""
    real = (folder / name).resolve()
    if not real.is_relative_to(folder.resolve()):
        raise ArtifactError(f"{folder / name}: resolves to {real}, outside the artifact folder; {_reexport(folder)}")
    return real


def read_listed(folder: Path, name: str, digest: str | None) -> bytes:
    """The bytes of the listed file `name`, read once and checked against `digest` (None: a file this process has just
    written and not yet listed). Load from these bytes, never from the path again."""
    path = folder / name
    try:
        data = resolve_inside(folder, name).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: missing or unreadable ({summarize(exc)}); {_reexport(folder)}") from None
    if digest is not None and sha256_bytes(data) != digest:
        raise ArtifactError(f"{path}: changed since export (sha256 differs from manifest.json); {_reexport(folder)}")
    return data


def read_manifest(folder: str | os.PathLike, verify: bool = True, expected_sha256: str | None = None) -> dict[str, Any]:
    """The folder's manifest, checked in form (every path inside the folder, every stage file listed and hashed).
    With `verify`, every listed file must exist with its recorded sha256; with `expected_sha256`, the manifest's own
    bytes must have that sha256 (a pinned folder)."""
    folder = Path(folder)
    recover_dir(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; {folder} is not an artifact folder (create one with ffclip-export)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: unreadable ({summarize(exc)}); {_reexport(folder)}") from None
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256.strip().lower():
        raise ArtifactError(f"{path}: sha256 {sha256_bytes(data)} is not the pinned {expected_sha256}; the folder is not "
                            "the one that was exported (or the pin is wrong)")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not UTF-8 text; {_reexport(folder)}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not JSON ({summarize(exc)}); {_reexport(folder)}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a JSON object but a {type(manifest).__name__}; {_reexport(folder)}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest; {_reexport(folder)}")
    _check_form(folder, manifest)
    if verify:
        verify_files(folder, manifest)
    return manifest


def _check_form(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose keys the runtime relies on are missing or of the wrong type, or whose paths leave the
    folder or name files that are not hashed."""
    from ffclip.export.stages import STAGES

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ArtifactError(f"{folder / MANIFEST}: {what}; {_reexport(folder)}")

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    files = manifest.get("files")
    need(isinstance(files, dict), "'files' must be an object of path -> sha256")
    for name, digest in files.items():
        confined_name(folder, name, "'files'")
        need(isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
             f"'files' gives {name} no sha256")
    need(isinstance(manifest.get("model"), dict) and all(
        is_int(manifest["model"].get(k)) and manifest["model"][k] > 0
        for k in ("num_ws", "resolution", "embed_dim", "context_length")), "'model' needs positive integers num_ws, "
         "resolution, embed_dim and context_length")
    batch = manifest.get("batch")
    need(isinstance(batch, dict) and all(is_int(batch.get(k)) for k in ("min", "opt", "max"))
         and 1 <= batch["min"] <= batch["opt"] <= batch["max"], "'batch' needs integers 1 <= min <= opt <= max")
    need(isinstance(manifest.get("precision"), str), "'precision' must be a string")
    stages = manifest.get("stages")
    need(isinstance(stages, dict), "'stages' must be an object")
    for stage, entry in stages.items():
        need(isinstance(entry, dict) and isinstance(entry.get("files"), dict), f"stage {stage!r} has no 'files' object")
        for fmt, name in entry["files"].items():
            confined_name(folder, name, f"stage {stage!r} ({fmt})")
            need(name in files, f"stage {stage!r} ({fmt}) names {name}, which is not listed (hashed) in 'files'")
        for key in ("inputs", "outputs"):
            tensors = entry.get(key)
            need(isinstance(tensors, list) and tensors and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
                and isinstance(t.get("shape"), list) and t["shape"][:1] == ["batch"]
                and all(is_int(d) and d > 0 for d in t["shape"][1:]) for t in tensors),
                 f"stage {stage!r} needs {key} with a name, a dtype and a shape ['batch', sizes...]")
    missing = [s for s in STAGES if s not in stages]
    need(not missing, f"'stages' lacks {', '.join(missing)}")


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a folder where a listed file is missing, lies outside the folder or changed since export."""
    for name, digest in manifest["files"].items():
        path = folder / name
        real = resolve_inside(folder, name)
        if not real.is_file():
            raise ArtifactError(f"{path}: missing from the artifact folder; {_reexport(folder)}")
        if sha256(real) != digest:
            raise ArtifactError(
                f"{path}: changed since export (sha256 differs from manifest.json); {_reexport(folder)}"
            )
