"""Bounds on the sizes a checkpoint's configuration may ask for, checked before any module is built from it.

The bounds are far above every published model (StyleGAN2 at 1024 px: widths of 512, 18 style layers; CLIP ViT-L:
width 1024, 24 layers) and small enough that building a module's skeleton stays quick; the tensors the file holds
then decide whether the module is built at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..config import GeneratorConfig, MapperConfig, TextConfig
from ..models.encoder import EncoderConfig
from ..models.face_parser import LEVELS, FaceParserConfig
from ..models.identity import IdentityConfig

MAX_WIDTH = 2**14
MAX_DEPTH = 64
MAX_RESOLUTION = 2**13
MAX_COUNT = 2**20  # vocabulary size, context length, image size and the other sizes in CLIP's configuration dicts


def _size(owner: str, name: str, value: Any, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{owner} {name} is {value!r}; expected an integer from 1 to {limit}")


def _clip_dict(owner: str, cfg: Mapping[str, Any] | None) -> None:
    for name, value in (cfg or {}).items():
        if name.startswith("hf_"):
            raise ValueError(f"{owner} names a Hugging Face model ({name}), which would be fetched from the hub")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{owner} {name} is {value!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            limit = {"layers": MAX_DEPTH, "width": MAX_WIDTH, "heads": MAX_WIDTH}.get(name, MAX_COUNT)
            _size(owner, name, value, limit)


def check_config(config: GeneratorConfig | MapperConfig | TextConfig | EncoderConfig | IdentityConfig | FaceParserConfig) -> None:
    """Raise `ValueError` naming the first size of `config` that is not an integer within the bounds above."""
    if isinstance(config, GeneratorConfig):
        _size("generator", "resolution", config.resolution, MAX_RESOLUTION)
        _size("generator", "style_dim", config.style_dim, MAX_WIDTH)
        _size("generator", "n_mlp", config.n_mlp, MAX_DEPTH)
        for resolution in config.resolutions:
            _size("generator", f"channels[{resolution}]", config.width(resolution), MAX_WIDTH)
        if not (isinstance(config.lr_mlp, (int, float)) and 0 < config.lr_mlp < math.inf):
            raise ValueError(f"generator lr_mlp is {config.lr_mlp!r}; expected a positive number")
    elif isinstance(config, MapperConfig):
        _size("mapper", "num_ws", config.num_ws, MAX_DEPTH)
        _size("mapper", "dim", config.dim, MAX_WIDTH)
        _size("mapper", "num_blocks", config.num_blocks, MAX_DEPTH)
    elif isinstance(config, EncoderConfig):
        _size("encoder", "n_styles", config.n_styles, MAX_DEPTH)  # one style head per generator style input
        for i, units in enumerate(config.stage_units):
            _size("encoder", f"stage_units[{i}]", units, MAX_DEPTH)
    elif isinstance(config, FaceParserConfig):
        # the levels double the width, so the centre level is width * 2**LEVELS wide
        _size("face parser", "width", config.width, MAX_WIDTH >> LEVELS)
        _size("face parser", "n_classes", config.n_classes, MAX_WIDTH)
    elif isinstance(config, IdentityConfig):
        _size("identity net", "num_layers", config.num_layers, MAX_WIDTH)
    else:
        _size("text encoder", "embed_dim", config.embed_dim, MAX_WIDTH)
        _clip_dict("text_cfg", config.text_cfg)
        _clip_dict("vision_cfg", config.vision_cfg)
