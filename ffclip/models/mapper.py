"""FFCLIP's semantic modulation stack (DESIGN §4): text embedding + `w+` -> edited `w+`.

Module names follow the released checkpoint (`q_matrix`, `attention_layer.k_matrix`, `gamma_.{0,1,3}`, ...) so it
loads by stripping a prefix. The modules hold the parameters and form the projections; steps 2-5 run in
`ffclip.kernels.reference.mapper_block_reference` or its Triton twin, chosen by `Mapper.impl` (DESIGN §6). The
channel cross-attention never forms `V2 @ A`: `mean_L(V2 A) = mean_L(V2) A`.
"""

from __future__ import annotations

import torch
from torch import nn

from ffclip.kernels.reference import INJECTION_SLOPE, widen

from ..config import MapperConfig
from . import ops


def normalise_layers(x: torch.Tensor) -> torch.Tensor:
    """Step 1: scale each channel of `x [B, L, D]` to unit second moment across the L layers."""
    # in float32 at least: 1e-8 vanishes in float16, and a channel whose moment underflows would give 0 * inf
    xf = widen(x)
    return (xf * torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + 1e-8)).to(x.dtype)


def _injection_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.LeakyReLU(INJECTION_SLOPE), nn.Linear(dim, dim))


class ChannelAttention(nn.Module):
    """Step 3's projections: `Q2 = x Wq^T`, `K2 = e^T w^T` (a `Linear(1 -> L)`), `V2 = x Wv^T`."""

    def __init__(self, num_ws: int, dim: int):
        super().__init__()
        self.q_matrix = nn.Linear(dim, dim, bias=False)
        self.k_matrix = nn.Linear(1, num_ws, bias=False)
        self.v_matrix = nn.Linear(dim, dim, bias=False)


class MapperBlock(nn.Module):
    """One block: normalise across layers, layer selection, channel attention, text-conditioned injection."""

    def __init__(self, num_ws: int, dim: int):
        super().__init__()
        self.q_matrix = nn.Linear(dim, dim, bias=False)
        self.k_matrix = nn.Linear(dim, dim, bias=False)
        self.v_matrix = nn.Linear(dim, dim, bias=False)
        self.attention_layer = ChannelAttention(num_ws, dim)
        self.gamma_ = _injection_mlp(dim)
        self.beta_ = _injection_mlp(dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor, impl: ops.Impl = "reference") -> torch.Tensor:
        """`x [B, L, D]`, `e [B, 1, D]` -> `[B, L, D]`."""
        x = normalise_layers(x)
        attn = self.attention_layer
        block = ops.implementation(impl, "mapper_block")
        return block(self.k_matrix(x), self.q_matrix(e), self.v_matrix(x), attn.q_matrix(x), attn.k_matrix.weight,
                     attn.v_matrix(x).mean(dim=1, keepdim=True), self.gamma_(e), self.beta_(e), e=e)


class Mapper(nn.Module):
    """`mapper(w_plus [B,L,D], text_embedding [B,D]) -> w_plus + delta [B,L,D]`."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MapperBlock(config.num_ws, config.dim) for _ in range(config.num_blocks))
        self.impl: ops.Impl = "reference"

    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    def delta(self, w_plus: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """The edit direction `x_4` that the stage adds to `w_plus`."""
        e = text_embedding[:, None, :]
        x = w_plus
        for block in self.blocks:
            x = block(x, e, self.impl)
        return x

    def forward(self, w_plus: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        return w_plus + self.delta(w_plus, text_embedding)
