"""One batch of latents edited by several prompts: the originals' pictures, then one column of edits per prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .inputs import shown

if TYPE_CHECKING:
    from .runtime import Runtime


def edit_columns(stages: Runtime, latents: torch.Tensor, prompts: Sequence[str], strength: float = 1.0,
                 on_progress: Callable[[str], None] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The columns (the originals of `latents` `[B, L, D]`, then their edit by each prompt at `strength`, each
    uint8 `[B, R, R, 3]`) and the edited latents `[P, B, L, D]`, prompt by prompt; `on_progress` hears each step."""
    say = on_progress or (lambda message: None)
    stages.encode_text(list(prompts))  # every prompt is checked, by its own number, before any picture is drawn
    say(f"rendering {latents.shape[0]} original(s) at {stages.resolution} px")
    columns = [stages.synthesize(latents)]
    edited = []
    for i, prompt in enumerate(prompts):
        say(f"editing [{i + 1}/{len(prompts)}] {shown(prompt)}")
        images, w_edit = stages.edit_with_latents(latents, prompt, strength)
        columns.append(images)
        edited.append(w_edit)
    return columns, torch.stack(edited)
