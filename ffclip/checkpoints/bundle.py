"""The project's own checkpoint format: one safetensors file whose metadata holds the stage kind and its config."""

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


def save_module(path: str | os.PathLike, module: torch.nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Save a `Generator`, `Mapper`, `TextEncoder` or `Encoder4Editing` as a bundle (its config and its state dict)."""
    from ..config import to_dict
    from ..models import Encoder4Editing, Generator, Mapper, TextEncoder

    kinds = {Generator: "generator", Mapper: "mapper", TextEncoder: "text_encoder", Encoder4Editing: "encoder"}
    kind = next((k for cls, k in kinds.items() if isinstance(module, cls)), None)
    if kind is None:
        raise TypeError(f"cannot bundle a {type(module).__name__}; expected Generator, Mapper, TextEncoder or "
                        "Encoder4Editing")
    info = dict(extra or {})
    if kind == "text_encoder":
        info["vision"] = module.has_vision
    return save_bundle(path, kind, to_dict(module.config), module.state_dict(), info)


def module_from_bundle(bundle: Bundle) -> torch.nn.Module:
    """Rebuild the stage a bundle holds, in eval mode, after checking its config against its tensors."""
    from ..config import GeneratorConfig, MapperConfig, TextConfig, from_dict
    from ..models import Generator, Mapper, TextEncoder
    from ..models.encoder import Encoder4Editing, EncoderConfig
    from .clip import clip_module
    from .detect import build_checked
    from .photo import uninitialised

    found = f"an ffclip {bundle.kind} bundle"
    accepted = "an ffclip bundle holds the config and tensors that save_module wrote"
    kinds = {"generator": (GeneratorConfig, Generator), "mapper": (MapperConfig, Mapper), "text_encoder": (TextConfig, None),
             "encoder": (EncoderConfig, uninitialised(Encoder4Editing))}
    config_class, module_class = kinds[bundle.kind]
    try:
        config = from_dict(config_class, bundle.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{bundle.path}: {found} with an unusable config ({exc})") from None
    if module_class is not None:
        return build_checked(config, module_class, bundle.state_dict, bundle.path, found, accepted)
    vision = bool(bundle.extra.get("vision", True))
    state = {k.removeprefix("clip."): v for k, v in bundle.state_dict.items()}
    clip = build_checked(config, lambda c: clip_module(c, vision), state, bundle.path, found, accepted)
    return TextEncoder(clip, config).eval().requires_grad_(False)


def load_module(path: str | os.PathLike, expect_kind: str | None = None) -> torch.nn.Module:
    """Load the stage saved by `save_module`."""
    return module_from_bundle(load_bundle(path, expect_kind))
