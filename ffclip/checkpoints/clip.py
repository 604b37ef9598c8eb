"""CLIP text towers from open_clip checkpoints and from OpenAI's TorchScript archives (`ViT-B-32.pt`).

The TorchScript archive is read as data: its `data.pkl` goes through `RestrictedUnpickler` (module classes become
`ModuleRecord`s, tensor bytes come from the archive's `data/` entries, sizes checked) and the code in it is never
compiled or run.
The architecture is inferred from tensor shapes as OpenAI's own loader does (heads = width / 64, QuickGELU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file

from ..config import TextConfig
from ..errors import summarize
from ..models import TextEncoder
from ..models.text_encoder import build_clip
from .detect import FileKind, build_checked, checkpoint_error, describe, read_torch_file
from .safe_pickle import ModuleRecord, load_torch_file

# Tensors OpenAI's models keep beside their weights: the causal mask and sizes stored as attributes.
_NON_WEIGHTS = ("attn_mask", "input_resolution", "context_length", "vocab_size")
# Image tower settings for a text-only model whose image tower is not a ViT; it is built and dropped at once.
_DROPPED_VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16}


def read_open_clip_state(path: str | os.PathLike, kind: FileKind, accepted: str) -> dict[str, torch.Tensor]:
    """The CLIP state dict in a `.bin`/`.pt`/`.safetensors` file (also under 'state_dict', 'module.' prefixes)."""
    if kind.kind == "safetensors":
        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise checkpoint_error(path, f"a safetensors file that cannot be read ({exc})", accepted) from None
    else:
        obj = read_torch_file(path, kind, accepted)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    state = {k.removeprefix("module."): v for k, v in obj.items()} if isinstance(obj, Mapping) else {}
    if "token_embedding.weight" not in state:
        raise checkpoint_error(path, f"{kind.description} {describe(obj)}, without CLIP text weights", accepted)
    return state


def read_torchscript_state(path: str | os.PathLike, accepted: str) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive, by dotted path, read without loading the archive's code."""
    try:
        obj = load_torch_file(path, module_prefixes=("__torch__.",))
    except Exception as exc:  # a damaged archive or a refused global
        raise checkpoint_error(path, f"a TorchScript archive that cannot be read safely ({summarize(exc)})", accepted) from None
    if not isinstance(obj, ModuleRecord):
        raise checkpoint_error(path, f"a TorchScript archive holding a {type(obj).__name__}", accepted)
    return obj.flat_tensors()


def openai_config(state: Mapping[str, torch.Tensor], vision: bool) -> TextConfig:
    """The open_clip configuration of an OpenAI CLIP state dict (QuickGELU, 64-wide attention heads)."""
    width = int(state["ln_final.weight"].shape[0])
    text_cfg = {
        "context_length": int(state["positional_embedding"].shape[0]),
        "vocab_size": int(state["token_embedding.weight"].shape[0]),
        "width": width,
        "heads": width // 64,
        "layers": _count_blocks(state, "transformer.resblocks."),
    }
    if "visual.conv1.weight" in state:
        conv = state["visual.conv1.weight"]
        grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
        vision_cfg = {
            "image_size": int(conv.shape[-1]) * grid,
            "layers": _count_blocks(state, "visual.transformer.resblocks."),
            "width": int(conv.shape[0]),
            "patch_size": int(conv.shape[-1]),
        }
    elif vision:
        raise ValueError("its image tower is not a ViT (only ViT image towers are supported)")
    else:
        vision_cfg = _DROPPED_VISION
    return TextConfig(
        model="openai", embed_dim=int(state["text_projection"].shape[1]), text_cfg=text_cfg, vision_cfg=vision_cfg,
        quick_gelu=True,
    )


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def named_config(model: str) -> TextConfig:
    """The configuration of the registered open_clip architecture `model`."""
    cfg = open_clip.get_model_config(model) or {}
    return TextConfig(model=model, embed_dim=int(cfg.get("embed_dim", TextConfig.embed_dim)))


def clip_module(config: TextConfig, vision: bool) -> torch.nn.Module:
    """A fresh open_clip model of `config`, without its image tower unless `vision` (as `TextEncoder.clip` holds it)."""
    clip = build_clip(config)
    if not vision:
        clip.visual = None
    return clip


def text_encoder_from_state(
    state: Mapping[str, torch.Tensor],
    config: TextConfig,
    vision: bool,
    path: str | os.PathLike,
    found: str,
    accepted: str,
) -> TextEncoder:
    """A text encoder holding `state` (converted to float32 as it is loaded, once its shapes are checked), strictly
    loaded; the image tower is dropped unless `vision`."""
    kept = {
        k: v
        for k, v in state.items()
        if k.rsplit(".", 1)[-1] not in _NON_WEIGHTS and (vision or not k.startswith("visual."))
    }
    clip = build_checked(config, lambda c: clip_module(c, vision), kept, path, found, accepted)
    return TextEncoder(clip, config).eval().requires_grad_(False)
