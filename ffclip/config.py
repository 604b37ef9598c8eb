"""Plain configuration objects for the three FFCLIP stages, and the named presets built from them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class GeneratorConfig:
    """A StyleGAN2 (config-f family) generator: resolution, widths and mapping network shape."""

    resolution: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    lr_mlp: float = 0.01
    # Feature-map channels per resolution, keyed by the resolution as a string (JSON-friendly).
    channels: dict[str, int] = field(default_factory=lambda: dict(_CONFIG_F_CHANNELS))

    def __post_init__(self) -> None:
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise ValueError(f"generator resolution must be a power of two, got {self.resolution}")
        missing = [r for r in self.resolutions if str(r) not in self.channels]
        if missing:
            raise ValueError(f"generator channels are missing for resolutions {missing}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.resolution))

    @property
    def resolutions(self) -> list[int]:
        return [2**i for i in range(2, self.log_size + 1)]

    @property
    def num_ws(self) -> int:
        return 2 * self.log_size - 2

    def width(self, resolution: int) -> int:
        return self.channels[str(resolution)]


_CONFIG_F_CHANNELS = {"4": 512, "8": 512, "16": 512, "32": 512, "64": 512, "128": 256, "256": 128, "512": 64, "1024": 32}


@dataclass(frozen=True)
class MapperConfig:
    """The semantic modulation stack of DESIGN §4: `num_blocks` blocks over `num_ws` layers of width `dim`."""

    num_ws: int = 18
    dim: int = 512
    num_blocks: int = 4


@dataclass(frozen=True)
class TextConfig:
    """An open_clip text tower: a named open_clip model, or a custom architecture given as open_clip's dicts."""

    model: str = "ViT-B-32"
    embed_dim: int = 512
    text_cfg: dict[str, Any] | None = None
    vision_cfg: dict[str, Any] | None = None
    quick_gelu: bool = False


@dataclass(frozen=True)
class Preset:
    """A named combination of the three stages."""

    name: str
    generator: GeneratorConfig
    mapper: MapperConfig
    text: TextConfig
    seed: int = 0
    description: str = ""
    # package whose `weights/` folder holds this preset's trained bundles; empty: the weights are seeded random
    weights: str = ""
    # the packaged prompt set (`ffclip.training.prompt_set`) a mapper for this preset trains on by default
    prompt_set: str = "faces"

    def weights_file(self, kind: str) -> Path | None:
        """The trained bundle of stage `kind` ("generator", "mapper", "text_encoder"), or None for seeded weights."""
        if not self.weights:
            return None
        return Path(str(resources.files(self.weights).joinpath("weights", f"{kind}.safetensors")))


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dictionary of a configuration object."""
    return dataclasses.asdict(config)


def from_dict(kind: type, data: dict[str, Any]) -> Any:
    """Rebuild a configuration object of class `kind` from `to_dict` output, rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {unknown}")
    return kind(**data)


def _narrow_channels(resolution: int, widest: int, narrowest: int) -> dict[str, int]:
    """Channels that halve from `widest` with every doubling of resolution past 32, never below `narrowest`."""
    out = {}
    for r in (2**i for i in range(2, int(math.log2(resolution)) + 1)):
        out[str(r)] = max(narrowest, widest // max(1, r // 32))
    return out


PRESETS: dict[str, Preset] = {
    "ffhq-1024": Preset(
        name="ffhq-1024",
        generator=GeneratorConfig(),
        mapper=MapperConfig(num_ws=18),
        text=TextConfig(model="ViT-B-32"),
        description="StyleGAN2 config-f FFHQ 1024, CLIP ViT-B/32, the released FFCLIP mapper.",
    ),
    "random": Preset(
        name="random",
        generator=GeneratorConfig(resolution=256, channels=_narrow_channels(256, widest=128, narrowest=32)),
        mapper=MapperConfig(num_ws=14),
        text=TextConfig(
            model="demo-text",
            embed_dim=512,
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
            vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        ),
        seed=2022,
        description="For tests and benchmarks: a 256-pixel narrow generator, a small text tower with CLIP's real "
        "tokenizer, the real mapper dimensions. Weights are seeded random, not trained.",
    ),
    "world": Preset(
        name="world",
        generator=GeneratorConfig(resolution=64, style_dim=128, n_mlp=4, lr_mlp=0.5,
                                  channels={"4": 64, "8": 64, "16": 64, "32": 32, "64": 16}),
        mapper=MapperConfig(num_ws=10, dim=128, num_blocks=4),
        text=TextConfig(
            model="world-clip",
            embed_dim=128,
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
            vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
        ),
        seed=0,
        description="Embedded default, the shapes world (ffclip.world): a 64-pixel generator, a small CLIP with the "
        "real tokenizer and a mapper, all trained here by `make world`.",
        weights="ffclip.world",
        prompt_set="world",
    ),
}


DEFAULT_PRESET = "world"


def get_preset(name: str) -> Preset:
    """The preset called `name`; a clear error lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
