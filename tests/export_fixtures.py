"""A tiny configuration of the three stages, small enough to export in seconds."""

from __future__ import annotations

from ffclip.config import GeneratorConfig, MapperConfig, Preset, TextConfig

TINY = Preset(
    name="tiny",
    generator=GeneratorConfig(resolution=32, channels={"4": 32, "8": 32, "16": 16, "32": 16}),
    mapper=MapperConfig(num_ws=8),
    text=TextConfig(
        model="tiny-text",
        embed_dim=512,
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
        vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    ),
    seed=7,
)
