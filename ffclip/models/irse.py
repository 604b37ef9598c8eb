"""The IR-SE residual network shared by the e4e encoder and the ArcFace identity net.

Module names and their order follow the released state dicts (`input_layer.{0,1,2}`, `body.{i}.shortcut_layer`,
`body.{i}.res_layer.{0..5}`), so both checkpoints load strictly. A unit is pre-activation: batch norm, 3x3 conv,
PReLU, 3x3 conv (carrying the unit's stride), batch norm, then squeeze-and-excitation; its shortcut is a strided
1x1 conv with batch norm where the width changes and plain subsampling where it does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Units per stage for each depth; the stages widen 64 -> 64 -> 128 -> 256 -> 512 and each halves the resolution.
STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
SE_REDUCTION = 16


class SqueezeExcite(nn.Module):
    """Channel gates from the global average: 1x1 conv down by `SE_REDUCTION`, ReLU, 1x1 conv up, sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // SE_REDUCTION, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // SE_REDUCTION, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class Subsample(nn.Module):
    """Every `stride`-th pixel: the identity shortcut of a unit that keeps its width."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride]


class BottleneckIRSE(nn.Module):
    """One IR-SE unit from `in_ch` to `out_ch` channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        if in_ch == out_ch:
            self.shortcut_layer: nn.Module = Subsample(stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            SqueezeExcite(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def input_layer() -> nn.Sequential:
    """The stem: 3x3 conv from RGB to 64 channels, batch norm, PReLU."""
    return nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))


def units_per_stage(depth: int | Sequence[int]) -> tuple[int, int, int, int]:
    """The units of each stage: `STAGE_UNITS[depth]` for a named depth, or four counts (at least one each) as given."""
    if isinstance(depth, int):
        if depth not in STAGE_UNITS:
            raise ValueError(f"IR-SE depth {depth} is not one of {sorted(STAGE_UNITS)}")
        return STAGE_UNITS[depth]
    counts = tuple(depth)
    if len(counts) != len(STAGE_WIDTHS) or not all(type(n) is int and n >= 1 for n in counts):
        raise ValueError(f"IR-SE units per stage {list(counts)}: give {len(STAGE_WIDTHS)} integers of at least 1")
    return counts


def body(depth: int | Sequence[int]) -> nn.Sequential:
    """The units of IR-SE-`depth` (or of the units per stage given) in order; each stage's first has stride 2."""
    units = []
    in_ch = 64
    for count, width in zip(units_per_stage(depth), STAGE_WIDTHS):
        units += [BottleneckIRSE(in_ch if i == 0 else width, width, 2 if i == 0 else 1) for i in range(count)]
        in_ch = width
    return nn.Sequential(*units)


def stage_ends(depth: int | Sequence[int]) -> list[int]:
    """Index in `body(depth)` of the last unit of each stage (where the encoder taps its features)."""
    ends, total = [], 0
    for count in units_per_stage(depth):
        total += count
        ends.append(total - 1)
    return ends
