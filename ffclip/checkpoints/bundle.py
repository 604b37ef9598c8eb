"""Stages saved as ffclip bundles and rebuilt from them, checked like every other checkpoint (DESIGN §3).

The file format itself is `bundle_format`'s; its reader and writer are importable from here as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import GeneratorConfig, MapperConfig, TextConfig, from_dict, to_dict
from ..errors import CheckpointError
from ..models import Encoder4Editing, Generator, Mapper, TextEncoder
from ..models.generator import LatentMapping
from ..models.encoder import EncoderConfig
from .bundle_format import Bundle, load_bundle, save_bundle
from .clip import clip_module
from .detect import build_checked
from .photo import uninitialised

__all__ = ["Bundle", "load_bundle", "load_latent_mapping", "load_module", "module_from_bundle", "save_bundle", "save_module"]


def save_module(path: str | os.PathLike, module: torch.nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Save a `Generator`, `Mapper`, `TextEncoder` or `Encoder4Editing` as a bundle (its config and its state dict)."""
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


def load_latent_mapping(path: str | os.PathLike) -> LatentMapping:
    """The mapping network and average latent of a generator bundle, checked like `load_module` checks the whole."""
    bundle = load_bundle(path, "generator")
    found = "an ffclip generator bundle"
    try:
        config = from_dict(GeneratorConfig, bundle.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{bundle.path}: {found} with an unusable config ({exc})") from None
    state = {k: v for k, v in bundle.state_dict.items() if k == "w_avg" or k.startswith("mapping_network.")}
    return build_checked(config, LatentMapping, state, bundle.path, found,
                         "an ffclip bundle holds the config and tensors that save_module wrote")

