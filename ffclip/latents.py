"""Latent codes from users: loading `.npy`/`.pt` files and checking shape, dtype and values."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_file
from .errors import InputError, summarize
from .inputs import as_tensor


def check_latents(latents: torch.Tensor | np.ndarray, num_ws: int, dim: int = 512, where: str = "latents") -> torch.Tensor:
    """Return float32 `w+ [B, num_ws, dim]`; `[B, dim]` is broadcast to every layer. Bad input raises `InputError`."""
    latents = as_tensor(latents, where)
    if not latents.is_floating_point():
        raise InputError(f"{where}: latents must be floating point, found {latents.dtype}")
    if latents.ndim == 2 and latents.shape[1] == dim:
        latents = latents[:, None, :].expand(-1, num_ws, -1)
    if latents.ndim != 3 or tuple(latents.shape[1:]) != (num_ws, dim):
        raise InputError(
            f"{where}: latents of shape {list(latents.shape)}; expected [B, {num_ws}, {dim}] or [B, {dim}]"
        )
    if latents.shape[0] == 0:
        raise InputError(f"{where}: no latents (batch size 0)")
    if not torch.isfinite(latents).all():
        raise InputError(f"{where}: latents contain NaN or Inf values")
    return latents.float().contiguous()


def load_latents(path: str | os.PathLike, num_ws: int, dim: int = 512) -> torch.Tensor:
    """Read latents from a `.npy` file or a `.pt` file holding one tensor, then `check_latents`."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif path.suffix in (".pt", ".pth"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise InputError(f"{path}: unknown latents file type {path.suffix!r}; use .npy or .pt")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{path}: cannot read latents ({summarize(exc)}); use a .npy or .pt file holding one "
            "float tensor"
        ) from None
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))
    return check_latents(data, num_ws, dim, where=str(path))


@torch.no_grad()
def sample_latents(generator: torch.nn.Module, num: int, seed: int = 0, truncation: float = 1.0) -> torch.Tensor:
    """float32 `w+ [num, L, D]` on the CPU: seeded `z` through `generator.mapping`, truncated towards `w_avg`."""
    if num < 1:
        raise InputError(f"the number of latents must be at least 1, got {num}")
    z = torch.randn(num, generator.config.style_dim, generator=torch.Generator().manual_seed(seed))
    return generator.mapping(z.to(generator.w_avg.device), truncation).float().cpu()


def save_latents(path: str | os.PathLike, latents: torch.Tensor) -> Path:
    """Write latents as float32 `.npy`, atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, latents.detach().float().cpu().numpy())
    return Path(path)
