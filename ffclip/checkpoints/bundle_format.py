"""The project's own checkpoint format: one safetensors file whose metadata holds the stage kind and its config.

Only the file is read and written here; `bundle` turns what it holds into a module and back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_file
from ..errors import CheckpointError

FORMAT = "ffclip-bundle"
FORMAT_VERSION = 1
KINDS = ("generator", "mapper", "text_encoder", "encoder")


@dataclass
class Bundle:
    """What a bundle holds: the stage kind, its configuration (a plain dict) and its tensors."""

    kind: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]
    path: str = ""


def save_bundle(
    path: str | os.PathLike,
    kind: str,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle atomically. Tensors are stored contiguous and detached, exactly as given (dtype kept)."""
    if kind not in KINDS:
        raise ValueError(f"bundle kind must be one of {KINDS}, got {kind!r}")
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def is_bundle(path: str | os.PathLike) -> bool:
    """True when `path` is a safetensors file written by `save_bundle`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def load_bundle(path: str | os.PathLike, expect_kind: str | None = None) -> Bundle:
    """Read a bundle; a wrong kind or a damaged file raises `CheckpointError` naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: a safetensors file without ffclip bundle metadata")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable ffclip bundle ({exc.__class__.__name__}: {exc})") from None
    kind = meta.get("kind", "?")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: an ffclip bundle of unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(f"{path}: an ffclip {kind} bundle, but a {expect_kind} was expected")
    try:
        config, extra = json.loads(meta["config"]), json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: an ffclip {kind} bundle with damaged metadata ({exc.__class__.__name__})") from None
    return Bundle(kind=kind, config=config, state_dict=tensors, extra=extra, path=str(path))
