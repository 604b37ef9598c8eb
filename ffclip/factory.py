"""Build the stages from configuration objects with seeded random weights: the default of a preset that ships no
trained weights, and where training starts."""

from __future__ import annotations

import torch

from .config import GeneratorConfig, MapperConfig, Preset, TextConfig
from .models import Generator, Mapper, TextEncoder
from .models.text_encoder import build_clip


# Random toRGB weights at unit scale put about half of a fresh generator's pixels outside [-1, 1] (at the random
# preset); at this scale about 12% are.
_FRESH_TORGB_SCALE = 0.3


def build_generator(config: GeneratorConfig, seed: int = 0) -> Generator:
    """A generator with seeded random weights (toRGB scaled down so images stay mostly in [-1, 1]) and `w_avg`
    estimated from its own mapping network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(config)
    with torch.no_grad():
        for block in generator.synthesis_network.blocks:
            block.torgb.weight.mul_(_FRESH_TORGB_SCALE)
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


def stage_seed(preset: Preset, stage: str) -> int:
    """The seed of the random weights of `stage` ("text_encoder", "mapper" or "generator") in `preset`."""
    return preset.seed + {"text_encoder": 0, "mapper": 1, "generator": 2}[stage]


def default_source(preset: Preset, stage: str) -> dict[str, str]:
    """How an export's manifest names the source of a stage built from `preset`'s embedded default."""
    bundle = preset.weights_file(stage)
    if bundle is not None:
        return {"embedded_default": f"trained weights of preset {preset.name} ({bundle.name})"}
    return {"embedded_default": f"embedded default of preset {preset.name}, seed {stage_seed(preset, stage)}"}


def build_preset(preset: Preset) -> tuple[TextEncoder, Mapper, Generator]:
    """All three stages of `preset` with seeded random weights."""
    return (
        build_text_encoder(preset.text, stage_seed(preset, "text_encoder")),
        build_mapper(preset.mapper, stage_seed(preset, "mapper")),
        build_generator(preset.generator, stage_seed(preset, "generator")),
    )
