"""The ArcFace identity net (`Backbone(112, 50, 'ir_se')`, `model_ir_se50.pth`): a face crop to a unit embedding.

An IR-SE body reduces a 112 px crop to 512 channels at 7 px; the head is batch norm, (dropout), flatten, a linear
layer to 512 and batch norm, and the embedding is divided by its Euclidean norm. Names follow the released state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import irse

CROP_SIZE = 112
EMBED_DIM = 512


@dataclass(frozen=True)
class IdentityConfig:
    """`num_layers`: the IR-SE depth (50 for the released net; 100 and 152 have the same layout)."""

    num_layers: int = 50


class IdentityNet(nn.Module):
    """Face crops `[B, 3, 112, 112]` in [-1, 1] to unit-norm embeddings `[B, 512]`."""

    def __init__(self, config: IdentityConfig):
        super().__init__()
        self.config = config
        self.input_layer = irse.input_layer()
        self.body = irse.body(config.num_layers)
        side = CROP_SIZE // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(), nn.Flatten(), nn.Linear(512 * side * side, EMBED_DIM),
            nn.BatchNorm1d(EMBED_DIM),
        )

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        if faces.dim() != 4 or tuple(faces.shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(f"face crops of shape {list(faces.shape)}; expected [B, 3, {CROP_SIZE}, {CROP_SIZE}]")
        x = self.output_layer(self.body(self.input_layer(faces)))
        return x / x.norm(dim=1, keepdim=True)
