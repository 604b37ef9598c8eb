"""FFCLIP's semantic modulation stack (DESIGN §4): text embedding + `w+` -> edited `w+`.

Module names follow the released checkpoint (`q_matrix`, `attention_layer.k_matrix`, `gamma_.{0,1,3}`, ...) so it
loads by stripping a prefix. The channel cross-attention never forms `V2 @ A`: `mean_L(V2 A) = mean_L(V2) A`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MapperConfig
from .ops import expm1, log1p, widen

INJECTION_SLOPE = 0.01
# the largest argument given to exp in the channel attention (exp(64) ~ 6e27, far below float32's limit)
EXP_SAFE = 64.0

# "eager": the modules below; "triton": ffclip.kernels.mapper_block (imported on first use).
MapperForm = Literal["eager", "triton"]


def normalise_layers(x: torch.Tensor) -> torch.Tensor:
    """Step 1: scale each channel of `x [B, L, D]` to unit second moment across the L layers."""
    # in float32 at least: 1e-8 vanishes in float16, and a channel whose moment underflows would give 0 * inf
    xf = widen(x)
    return (xf * torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + 1e-8)).to(x.dtype)


def layer_selection(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Step 2: `softmax_L(K q^T) * V` for `K, V [B, L, D]` and `q [B, 1, D]`.

    The scores are row-wise sums, which give equal layers equal scores (a matrix-vector product may sum the rows in
    different orders): latents equal on every layer then stay equal through every block, as in exact arithmetic.
    """
    return torch.softmax((k * q).sum(dim=-1, keepdim=True), dim=1) * v


def channel_attention(q2: torch.Tensor, k2: torch.Tensor, v2_mean: torch.Tensor) -> torch.Tensor:
    """Step 3 before its LayerNorm, centred: `mean_L(V2) (A - 1/D)` with `A = softmax(K2 Q2 / sqrt(D))`, for
    `Q2 [B, L, D]`, `K2 [B, D, L]` and `mean_L(V2) [B, 1, D]`, giving `[B, 1, D]` in float32 at least.

    Its LayerNorm equals that of the released `mean_L(V2) A`, whose mean over the output channels is exactly
    `sum(mean_L(V2)) / D`. With scores `r` centred over the softmax axis, `D A - 1 = expm1(r - log(mean(exp(r))))`:
    the nearly uniform attention is formed as its small departure from uniform, with nothing to cancel.
    """
    d = q2.shape[-1]
    q2, k2, v2_mean = widen(q2), widen(k2), widen(v2_mean)
    r = k2 @ (q2 - q2.mean(dim=-1, keepdim=True)) / math.sqrt(d)
    # shifted only where exp would overflow: then the attention is far from uniform and cancellation is no concern
    shift = (r.amax(dim=-1, keepdim=True) - EXP_SAFE).clamp(min=0)
    log_mean_exp = shift + log1p(expm1(r - shift).mean(dim=-1, keepdim=True))
    return (v2_mean @ expm1(r - log_mean_exp)) / d


def _injection_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.LeakyReLU(INJECTION_SLOPE), nn.Linear(dim, dim))


class ChannelAttention(nn.Module):
    """Step 3: channel cross-attention between the layers' channels and the text embedding."""

    def __init__(self, num_ws: int, dim: int):
        super().__init__()
        self.q_matrix = nn.Linear(dim, dim, bias=False)
        self.k_matrix = nn.Linear(1, num_ws, bias=False)
        self.v_matrix = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        k2 = self.k_matrix(e.transpose(1, 2))  # [B, D, L]
        v2_mean = self.v_matrix(x).mean(dim=1, keepdim=True)
        return F.layer_norm(channel_attention(self.q_matrix(x), k2, v2_mean), (x.shape[-1],)).to(x.dtype)


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

    def forward(self, x: torch.Tensor, e: torch.Tensor, form: MapperForm = "eager") -> torch.Tensor:
        if form == "triton":
            from ffclip.kernels import mapper_block

            return mapper_block(self, x, e)
        x = normalise_layers(x)
        h = layer_selection(self.k_matrix(x), self.q_matrix(e), self.v_matrix(x))
        h = F.layer_norm(h + self.attention_layer(x, e), (x.shape[-1],))
        return F.leaky_relu(h * (1 + self.gamma_(e)) + self.beta_(e), INJECTION_SLOPE)


class Mapper(nn.Module):
    """`mapper(w_plus [B,L,D], text_embedding [B,D]) -> w_plus + delta [B,L,D]`."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MapperBlock(config.num_ws, config.dim) for _ in range(config.num_blocks))
        self.form: MapperForm = "eager"

    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    def delta(self, w_plus: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """The edit direction `x_4` that the stage adds to `w_plus`."""
        e = text_embedding[:, None, :]
        x = w_plus
        for block in self.blocks:
            x = block(x, e, self.form)
        return x

    def forward(self, w_plus: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        return w_plus + self.delta(w_plus, text_embedding)
