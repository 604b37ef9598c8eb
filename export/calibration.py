"""Calibration inputs for post-training quantization: what each stage is fed in an edit, drawn from the stage's own
module on a fixed seed."""

from __future__ import annotations

import random
from importlib import resources

import numpy as np
import torch
from torch import nn

from ffclip.config import get_preset
from ffclip.export.stages import StageSpec


def prompt_set(text_encoder: nn.Module) -> list[str]:
    """The prompts of the text encoder's preset: the shapes world's seen edit prompts for the world's text encoder,
    the released face prompts for any other."""
    if text_encoder.config == get_preset("world").text:
        from ffclip.world.captions import all_edit_prompts

        return [prompt for prompt, _, _ in all_edit_prompts("seen")]
    text = resources.files("ffclip.prompt_sets").joinpath("released.txt").read_text(encoding="utf-8")
    return list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))


def calibration_inputs(spec: StageSpec, module: nn.Module, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` single-row inputs of the stage, by input name: the preset's prompts tokenized for the text encoder
    (cycled in a seeded order), latents through the generator's mapping network for the generator (truncation drawn
    in [0.5, 1]), and the spec's seeded random inputs for the other stages."""
    if count < 1:
        raise ValueError(f"calibration needs at least one sample, not {count}")
    g = torch.Generator().manual_seed(seed)
    if spec.name == "text_encoder":
        prompts = prompt_set(module)
        random.Random(seed).shuffle(prompts)
        tokens = module.tokenize([prompts[i % len(prompts)] for i in range(count)])
        rows = [{"tokens": tokens[i : i + 1]} for i in range(count)]
    elif spec.name == "generator":
        with torch.no_grad():
            z = torch.randn(count, module.config.style_dim, generator=g)
            psi = 0.5 + 0.5 * torch.rand(count, generator=g)
            rows = [{"w": module.mapping(z[i : i + 1], float(psi[i]))} for i in range(count)]
    else:
        rows = [spec.make_inputs(1, g) for _ in range(count)]
    return [{name: x.contiguous().numpy() for name, x in row.items()} for row in rows]
