"""The smallest configuration of the three stages (32-wide styles, 8-pixel images): exported and run in a second,
even by Triton's CPU interpreter."""

from __future__ import annotations

from pathlib import Path

from ffclip.config import GeneratorConfig, MapperConfig, Preset, TextConfig
from ffclip.export.exporter import ExportOptions, export_artifacts
from ffclip.factory import build_preset

MICRO = Preset(
    name="micro",
    generator=GeneratorConfig(resolution=8, style_dim=32, n_mlp=2, channels={"4": 16, "8": 8}),
    mapper=MapperConfig(num_ws=4, dim=32, num_blocks=1),
    text=TextConfig(
        model="micro-text",
        embed_dim=32,
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
        vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    ),
    seed=3,
)


def export_micro(out: Path, formats: tuple[str, ...] = ("torchscript",)) -> Path:
    """Export the micro configuration to `out` (its eager bundles and `formats`); returns `out`."""
    options = ExportOptions(formats=formats, min_batch=1, opt_batch=1, max_batch=4)
    export_artifacts(build_preset(MICRO), out, options, preset="micro", sources={})
    return out
