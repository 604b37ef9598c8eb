"""The checkpoint FFCLIP's training script writes: `{'state_dict': ..., 'opts': ...}`.

The state dict is the whole edit model under DistributedDataParallel's `module.` prefix: the mapper blocks under
`module.att_mapper.att_mapper.{i}.` (each with an `fc` layer the forward pass never uses) and the frozen
rosinality generator under `module.generator.`. The generator's average latent was an attribute, not a buffer, so
it is not in the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from ..config import MapperConfig
from ..models import Generator, Mapper
from .detect import build_checked, checkpoint_error
from .rosinality import build_generator, convert_state_dict

MAPPER_PREFIX = "att_mapper.att_mapper."
GENERATOR_PREFIX = "generator."


def _unwrapped(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without DistributedDataParallel's `module.` prefix."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def is_release(obj: object) -> bool:
    """True for a dict whose `state_dict` holds FFCLIP mapper blocks."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return False
    return any(k.startswith(MAPPER_PREFIX) for k in _unwrapped(obj["state_dict"]))


def mapper_from_release(obj: Mapping, path: str | os.PathLike, accepted: str) -> Mapper:
    """The mapper in a release checkpoint; L and the width come from the tensors, the unused `fc` layers are dropped."""
    state: dict[str, torch.Tensor] = {}
    for key, value in _unwrapped(obj["state_dict"]).items():
        m = re.fullmatch(re.escape(MAPPER_PREFIX) + r"(\d+)\.(.+)", key)
        if m and not m[2].startswith("fc."):
            state[f"blocks.{m[1]}.{m[2]}"] = value
    found = "an FFCLIP release mapper"
    sizes = []
    for key in ("blocks.0.attention_layer.k_matrix.weight", "blocks.0.q_matrix.weight"):
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise checkpoint_error(path, f"{found} without the tensor {key}", accepted)
        if value.dim() != 2:
            raise checkpoint_error(path, f"{found} whose {key} has shape {list(value.shape)}, not 2-D", accepted)
        sizes.append(int(value.shape[0]))
    config = MapperConfig(num_ws=sizes[0], dim=sizes[1], num_blocks=len({k.split(".")[1] for k in state}))
    return build_checked(config, Mapper, state, path, found, accepted)


def generator_from_release(obj: Mapping, path: str | os.PathLike, accepted: str) -> Generator:
    """The rosinality generator bundled in a release checkpoint; `w_avg` is estimated (with a warning) if absent."""
    g_ema = {
        k[len(GENERATOR_PREFIX):]: v for k, v in _unwrapped(obj["state_dict"]).items() if k.startswith(GENERATOR_PREFIX)
    }
    if not g_ema:
        raise checkpoint_error(path, "an FFCLIP release checkpoint without generator tensors", accepted)
    latent_avg = g_ema.pop("latent_avg", obj.get("latent_avg"))
    config, state = convert_state_dict(g_ema, path, accepted)
    if not isinstance(latent_avg, torch.Tensor):
        latent_avg = None
    return build_generator(config, state, latent_avg, path, "an FFCLIP release generator", accepted)
