"""The e4e encoder (`Encoder4Editing(50, 'ir_se')`): a photo to StyleGAN2 W+ latents.

An IR-SE-50 body gives features at three scales (the last unit of stages 2, 3 and 4: 64, 32 and 16 px for a 256 px
photo), joined top-down as a feature pyramid by 1x1 lateral convs and bilinear upsampling. Style head 0 reads the
coarsest features and gives the base code `w0`, used at every style input; head `i` adds its delta to input `i`,
heads 1-2 reading the coarse, 3-6 the middle and 7 on the fine features. The stored average latent is then added,
as e4e does with `start_from_latent_avg`. Names follow the released `encoder.*` tensors; `latent_avg` is ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import irse
from .generator import EqualLinear

STYLE_DIM = 512
COARSE_END = 3  # heads [0, 3) read the coarse features
MIDDLE_END = 7  # heads [3, 7) the middle ones, the rest the fine ones
_HEAD_SPATIAL = (16, 32, 64)  # the feature size each group of heads reduces to 1 px (for a 256 px photo)


@dataclass(frozen=True)
class EncoderConfig:
    """`n_styles`: the generator's style inputs (18 at 1024 px). `stage_units`: the IR-SE body's units per stage,
    (3, 4, 14, 3) for the released IR-SE-50 body (the only one e4e checkpoints hold); fewer units give a quicker
    stand-in of the same kinds of layers."""

    n_styles: int = 18
    stage_units: tuple[int, int, int, int] = irse.STAGE_UNITS[50]

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_units", irse.units_per_stage(self.stage_units))  # a JSON list as a tuple


class StyleHead(nn.Module):
    """Stride-2 3x3 convs with leaky ReLU until the map is one pixel, then an equalised-lr linear layer."""

    def __init__(self, spatial: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(STYLE_DIM, STYLE_DIM, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(STYLE_DIM, STYLE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).flatten(1))


def _upsample_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


class Encoder4Editing(nn.Module):
    """Photos `[B, 3, 256, 256]` in [-1, 1] to W+ `[B, n_styles, 512]`, the average latent added (DESIGN §1)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.input_layer = irse.input_layer()
        self.body = irse.body(config.stage_units)
        self.styles = nn.ModuleList(
            StyleHead(_HEAD_SPATIAL[(i >= COARSE_END) + (i >= MIDDLE_END)]) for i in range(config.n_styles)
        )
        self.latlayer1 = nn.Conv2d(256, STYLE_DIM, 1)
        self.latlayer2 = nn.Conv2d(128, STYLE_DIM, 1)
        self.register_buffer("latent_avg", torch.zeros(config.n_styles, STYLE_DIM))
        _, fine, middle, coarse = irse.stage_ends(config.stage_units)
        self._taps = {fine: "fine", middle: "middle", coarse: "coarse"}

    @property
    def num_ws(self) -> int:
        return self.config.n_styles

    def forward(self, photos: torch.Tensor) -> torch.Tensor:
        size = photos.shape[-1]
        if photos.dim() != 4 or photos.shape[1] != 3 or photos.shape[-2] != size or size < 16 or size & (size - 1):
            raise ValueError(f"photos of shape {list(photos.shape)}; expected [B, 3, S, S] with S a power of two, "
                             "at least 16 (256 for the released encoder)")
        x = self.input_layer(photos)
        taps = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self._taps:
                taps[self._taps[i]] = x
        features = taps["coarse"]
        codes = [self.styles[0](features)]
        for i in range(1, self.config.n_styles):
            if i == COARSE_END:
                features = _upsample_add(taps["coarse"], self.latlayer1(taps["middle"]))
            elif i == MIDDLE_END:
                features = _upsample_add(features, self.latlayer2(taps["fine"]))
            codes.append(codes[0] + self.styles[i](features))
        return torch.stack(codes, dim=1) + self.latent_avg
