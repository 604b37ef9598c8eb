"""The input types every editing front end accepts (`Runtime` and `EditPipeline` alike): prompts and arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import InputError


def as_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A list of prompts: a string is one prompt; any other sequence must hold only strings."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, torch.Tensor, np.ndarray)) or not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt {i} is a {type(p).__name__}, not a string")
    return list(prompts)


def as_tensor(x: torch.Tensor | np.ndarray, where: str) -> torch.Tensor:
    """A tensor of the same values that no autograd graph follows: numpy arrays of any strides are copied in, tensors
    that require grad are detached."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise InputError(f"{where}: expected a torch.Tensor or numpy array, found {type(x).__name__}")


def check_embeddings(embeddings: torch.Tensor | np.ndarray, batch: int, dim: int) -> torch.Tensor:
    """float32 `[batch, dim]` text embeddings; one embedding (`[dim]` or `[1, dim]`) is shared by every row."""
    e = as_tensor(embeddings, "embeddings")
    if e.dim() == 1 or (e.dim() == 2 and e.shape[0] == 1):
        e = e.reshape(1, -1).expand(batch, -1)
    if e.dim() != 2 or e.shape[1] != dim or e.shape[0] == 0:
        raise InputError(f"embeddings must have shape [B, {dim}] (or [{dim}] for one), got {list(e.shape)}")
    if not e.is_floating_point():
        raise InputError(f"embeddings must be floating point, got {e.dtype}")
    if e.shape[0] != batch:
        raise InputError(f"embeddings has {e.shape[0]} rows but latents has {batch}; give one per latent or one")
    if not torch.isfinite(e).all():
        raise InputError("embeddings contain NaN or Inf values")
    return e.float()


def shown(text: str, limit: int = 80) -> str:
    """`text` as a message quotes it: its repr, cut after `limit` characters with the length said."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"

