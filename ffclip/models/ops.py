"""Operations of the models alone (equalised-lr linear maps, pixel norm) and the `impl` switch that picks, for the
generator and the mapper together, the plain-PyTorch maths of `ffclip.kernels.reference` or the Triton kernels of
`ffclip.kernels` (DESIGN §6).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from ffclip.kernels import reference

Impl = Literal["reference", "triton"]
IMPLS: tuple[Impl, ...] = ("reference", "triton")


def implementation(impl: Impl, name: str) -> Callable[..., Any]:
    """The function `name` of the implementation `impl`: `ffclip.kernels.reference.<name>_reference`, or the Triton
    `ffclip.kernels.<name>` (triton is imported on first use)."""
    if impl == "reference":
        return getattr(reference, f"{name}_reference")
    if impl == "triton":
        import ffclip.kernels

        return getattr(ffclip.kernels, name)
    raise ValueError(f"unknown implementation {impl!r}; use one of {', '.join(IMPLS)}")


def equal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lr_mul: float = 1.0) -> torch.Tensor:
    """A linear map with the equalised learning rate: stored weights are scaled by `lr_mul / sqrt(fan_in)`."""
    gain = lr_mul / math.sqrt(weight.shape[1])
    return F.linear(x, weight * gain, None if bias is None else bias * lr_mul)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each vector to unit second moment over its last axis."""
    xf = reference.widen(x)
    return (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
