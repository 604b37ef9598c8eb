"""Build the stages from configuration objects, with seeded random weights (the embedded default until trained)."""

from __future__ import annotations

import torch

from .config import GeneratorConfig, MapperConfig, Preset, TextConfig
from .models import Generator, Mapper, TextEncoder
from .models.text_encoder import build_clip



def build_generator(config: GeneratorConfig, seed: int = 0) -> Generator:
    """A generator with seeded random weights and `w_avg` estimated from its own mapping network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(config)
    generator.estimate_w_avg(seed=seed)
    return generator.eval().requires_grad_(False)


def build_mapper(config: MapperConfig, seed: int = 0) -> Mapper:
    """A mapper with seeded random weights (PyTorch's default initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mapper = Mapper(config)
    return mapper.eval().requires_grad_(False)


def build_text_encoder(config: TextConfig, seed: int = 0, vision: bool = False) -> TextEncoder:
    """A text encoder with seeded random weights; the image tower is dropped unless `vision`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TextEncoder(build_clip(config), config)
    if not vision:
        encoder.drop_vision()
    return encoder.eval().requires_grad_(False)


def build_preset(preset: Preset) -> tuple[TextEncoder, Mapper, Generator]:
    """All three stages of `preset` with seeded random weights."""
    return (
        build_text_encoder(preset.text, preset.seed),
        build_mapper(preset.mapper, preset.seed + 1),
        build_generator(preset.generator, preset.seed + 2),
    )
