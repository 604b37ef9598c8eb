"""Edit strength: how far an edit moves a latent along the mapper's direction, `w + s * (mapper(w, e) - w)`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import InputError


def check_strength(strength: float | Sequence[float] | torch.Tensor, batch: int) -> torch.Tensor | None:
    """float32 strengths `[batch]` (one value is shared by every row), or None when every strength is exactly 1.

    Any finite value is accepted: 0 keeps the original, 1 is the mapper's edit, values above 1 exaggerate it and
    negative ones move the other way."""
    if isinstance(strength, (int, float)) and not isinstance(strength, bool):
        if not math.isfinite(strength):
            raise InputError(f"strength must be a finite number, got {strength}")
        return None if strength == 1 else torch.full((batch,), float(strength))
    try:
        s = torch.as_tensor(strength, dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"strength must be a number or one number per latent, got {strength!r}") from None
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise InputError(f"{s.numel()} strengths for {batch} latents; give one, or one per latent")
    if not torch.isfinite(s).all():
        raise InputError("strength must be finite (no NaN or Inf)")
    return None if bool((s == 1).all()) else s


def apply_strength(w: torch.Tensor, w_edit: torch.Tensor, strength: torch.Tensor | None) -> torch.Tensor:
    """`w + s * (w_edit - w)` for latents `[B, L, D]` and strengths `[B]` as `check_strength` gives them; None (every
    strength 1) returns `w_edit` itself, bit for bit."""
    if strength is None:
        return w_edit
    w = w.to(w_edit.device, w_edit.dtype)
    return w + strength.to(w_edit.device, w_edit.dtype).view(-1, 1, 1) * (w_edit - w)
