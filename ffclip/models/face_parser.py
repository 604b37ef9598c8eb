"""The face-parsing UNet FFCLIP's background loss uses (`unet()`: feature_scale 4, 19 classes).

Four levels of two 3x3 conv + batch norm + ReLU layers, each followed by 2x2 max pooling, a centre level, then four
levels that upsample with a 2x2 stride-2 transposed conv, concatenate the skip features before the upsampled ones
and apply the same double conv; a 1x1 conv gives the class logits. Widths are `width * (1, 2, 4, 8, 16)` (16 for the
released net). Names follow the released state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 4


@dataclass(frozen=True)
class FaceParserConfig:
    """`width`: channels of the first level; `n_classes`: the parsing classes (19, hair is class 13)."""

    width: int = 16
    n_classes: int = 19


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, 1, 1), nn.BatchNorm2d(out_ch), nn.ReLU())


class DoubleConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(in_ch, out_ch)
        self.conv2 = _conv_bn_relu(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class UpLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch)
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, 2)

    def forward(self, skip: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(below)], dim=1))


class FaceParser(nn.Module):
    """Images `[B, 3, H, W]` in [-1, 1] (H and W multiples of 16) to class logits `[B, n_classes, H, W]`."""

    def __init__(self, config: FaceParserConfig):
        super().__init__()
        self.config = config
        widths = [config.width * 2**i for i in range(LEVELS + 1)]
        for i in range(LEVELS):
            self.add_module(f"conv{i + 1}", DoubleConv(3 if i == 0 else widths[i - 1], widths[i]))
        self.center = DoubleConv(widths[LEVELS - 1], widths[LEVELS])
        for i in reversed(range(LEVELS)):
            self.add_module(f"up_concat{i + 1}", UpLevel(widths[i + 1], widths[i]))
        self.final = nn.Conv2d(widths[0], config.n_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        step = 2**LEVELS
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % step or images.shape[3] % step:
            raise ValueError(f"images of shape {list(images.shape)}; expected [B, 3, H, W] with H and W multiples of {step}")
        skips = []
        x = images
        for i in range(LEVELS):
            x = getattr(self, f"conv{i + 1}")(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.center(x)
        for i in reversed(range(LEVELS)):
            x = getattr(self, f"up_concat{i + 1}")(skips[i], x)
        return self.final(x)
