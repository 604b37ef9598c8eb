"""The CLIP text tower over open_clip, with CLIP's own BPE tokenizer (shipped with open_clip, so offline)."""

from __future__ import annotations

import warnings

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from ..config import TextConfig
from ..errors import InputError

CONTEXT_LENGTH = 77


def build_clip(config: TextConfig) -> nn.Module:
    """An open_clip `CLIP` with fresh weights: a registered open_clip architecture, or the custom one in `config`."""
    if config.text_cfg is not None:
        cfg = {"embed_dim": config.embed_dim, "text_cfg": config.text_cfg, "vision_cfg": config.vision_cfg or {}}
    else:
        cfg = open_clip.get_model_config(config.model)
        if cfg is None:
            raise InputError(
                f"unknown CLIP architecture {config.model!r}; use an open_clip model name such as ViT-B-32"
            )
    return open_clip.model.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=open_clip.model.CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=open_clip.model.CLIPTextCfg(**cfg["text_cfg"]),
        quick_gelu=config.quick_gelu or cfg.get("quick_gelu", False),
    )


def tokenize(tokenizer: SimpleTokenizer, prompts: list[str] | tuple[str, ...] | str) -> torch.Tensor:
    """CLIP tokens `[B, 77]` (int64). Empty input is refused; prompts over 77 tokens are truncated with a warning."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise InputError("no prompt given; pass at least one non-empty prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt {i} is empty; every prompt needs some text")
        n = len(tokenizer.encode(prompt)) + 2
        if n > CONTEXT_LENGTH:
            warnings.warn(f"prompt {i} has {n} tokens, more than CLIP's {CONTEXT_LENGTH}; it was truncated", stacklevel=3)
    return tokenizer(list(prompts))


class TextEncoder(nn.Module):
    """Prompts -> raw (not normalised) CLIP text embeddings `[B, embed_dim]`. `forward` takes tokens `[B, 77]`."""

    def __init__(self, clip: nn.Module, config: TextConfig):
        super().__init__()
        self.clip = clip
        self.config = config
        self.tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def has_vision(self) -> bool:
        return getattr(self.clip, "visual", None) is not None

    def drop_vision(self) -> "TextEncoder":
        """Free the image tower; only `encode_text` is needed to steer the mapper."""
        self.clip.visual = None
        return self

    def tokenize(self, prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
        """CLIP tokens `[B, 77]` (int64); see `tokenize`."""
        return tokenize(self.tokenizer, prompts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens)

    @torch.no_grad()
    def encode(self, prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
        """Raw text embeddings `[B, embed_dim]` for `prompts`, on this module's device."""
        device = next(self.parameters()).device
        return self(self.tokenize(prompts).to(device))
