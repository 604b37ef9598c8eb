"""The eager editing pipeline: prompts -> CLIP embedding -> mapper -> generator, on PyTorch modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .devices import resolve_device
from .errors import InputError
from .imaging import to_uint8
from .inputs import as_prompts, check_embeddings
from .latents import check_latents, sample_latents
from .models import Generator, Mapper, TextEncoder
from .strength import apply_strength, check_strength


def check_stages_fit(text_encoder: TextEncoder, mapper: Mapper, generator: Generator) -> None:
    """Raise `InputError` when the mapper's layer count or width does not fit the generator or the text encoder."""
    if mapper.num_ws != generator.num_ws:
        raise InputError(
            f"the mapper edits {mapper.num_ws} style layers but the generator has {generator.num_ws} "
            f"({generator.resolution} px); use a mapper trained for this generator"
        )
    if text_encoder.embed_dim != mapper.config.dim:
        raise InputError(
            f"the text encoder gives {text_encoder.embed_dim}-wide embeddings but the mapper expects "
            f"{mapper.config.dim}; use the CLIP model the mapper was trained with"
        )


class EditPipeline:
    """The three stages in a row. Same method names as `ffclip.runtime.Runtime`, so callers can use either."""

    def __init__(self, text_encoder: TextEncoder, mapper: Mapper, generator: Generator, device: str = "cpu"):
        check_stages_fit(text_encoder, mapper, generator)
        self.device = resolve_device(device)
        self.text_encoder = text_encoder.to(self.device).eval()
        self.mapper = mapper.to(self.device).eval()
        self.generator = generator.to(self.device).eval()

    @property
    def num_ws(self) -> int:
        return self.generator.num_ws

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    @property
    def embed_dim(self) -> int:
        return self.mapper.config.dim

    def sample_latents(self, num: int, seed: int = 0, truncation: float = 1.0) -> torch.Tensor:
        """`w+ [num, L, 512]` from seeded `z` through the mapping network, truncated towards `w_avg`."""
        return sample_latents(self.generator, num, seed, truncation)

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Raw CLIP text embeddings, float32 `[P, 512]`, one row per prompt (a string is one prompt)."""
        return self.text_encoder.encode(as_prompts(prompts)).float().cpu()

    @torch.no_grad()
    def modulate(self, latents: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Edited latents `[B, L, 512]` for `latents [B, L, 512]` and `embeddings [B, 512]` (or `[512]` / `[1, 512]`
        for one embedding shared by all)."""
        w = check_latents(latents, self.num_ws, self.generator.config.style_dim).to(self.device)
        return self.mapper(w, check_embeddings(embeddings, w.shape[0], self.mapper.config.dim).to(self.device)).cpu()

    @torch.no_grad()
    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        """Images float32 `[B, 3, R, R]`, roughly in [-1, 1]."""
        w = check_latents(latents, self.num_ws, self.generator.config.style_dim).to(self.device)
        return self.generator.synthesis(w).float().cpu()

    def edit(self, latents: torch.Tensor, prompts: str | Sequence[str],
             strength: float | Sequence[float] | torch.Tensor = 1.0) -> torch.Tensor:
        """uint8 images `[B, R, R, 3]`: one prompt applied to every latent, or one prompt per latent; `strength` (one,
        or one per latent) scales the edit (`ffclip.strength`)."""
        w = check_latents(latents, self.num_ws, self.generator.config.style_dim)
        check_strength(strength, w.shape[0])
        prompts = as_prompts(prompts)
        e = self.encode_text(prompts)
        if e.shape[0] == 1:
            e = e.expand(w.shape[0], -1)
        elif e.shape[0] != w.shape[0]:
            raise InputError(f"{len(prompts)} prompts for {w.shape[0]} latents; give one prompt, or one per latent")
        return to_uint8(self.synthesize(apply_strength(w, self.modulate(w, e), strength)))
