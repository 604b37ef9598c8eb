"""StyleGAN2 (config-f family) generator: the mapping network `z -> w` and the synthesis network `w+ -> image`.

Parameters are stored as the published implementations store them (raw weights, gains applied at run time), so
checkpoints convert by renaming and reshaping only. Noise is the stored constant noise. `Generator.impl` selects the
synthesis layers' implementation (DESIGN §6): the plain-PyTorch "reference" (the export-friendly scaled form of
DESIGN §5) or the fused "triton" kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import GeneratorConfig
from ffclip.kernels import reference

from . import ops


class EqualLinear(nn.Module):
    """A linear layer with the equalised learning rate; optional fused leaky ReLU."""

    def __init__(self, in_dim: int, out_dim: int, *, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate:
            x = ops.equal_linear(x, self.weight, None, self.lr_mul)
            return torch.nn.functional.leaky_relu(x + self.bias * self.lr_mul, reference.LRELU_SLOPE) * reference.LRELU_GAIN
        return ops.equal_linear(x, self.weight, self.bias, self.lr_mul)


class MappingNetwork(nn.Module):
    """`z [B, D] -> w [B, D]`: pixel norm, then `n_mlp` equalised-lr linear layers with leaky ReLU."""

    def __init__(self, style_dim: int, n_mlp: int, lr_mul: float):
        super().__init__()
        self.layers = nn.ModuleList(
            EqualLinear(style_dim, style_dim, lr_mul=lr_mul, activate=True) for _ in range(n_mlp)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = ops.pixel_norm(z)
        for layer in self.layers:
            x = layer(x)
        return x


class StyledConv(nn.Module):
    """One synthesis layer: modulated conv (optionally upsampling), constant noise, bias, leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, resolution: int, *, up: bool = False, kernel_size: int = 3):
        super().__init__()
        self.affine = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("noise", torch.randn(1, 1, resolution, resolution))
        self.register_buffer("fir", reference.fir_kernel(), persistent=False)
        self.up = up
        self.style_gain = 1.0 / math.sqrt(in_ch * kernel_size * kernel_size)

    def forward(self, x: torch.Tensor, w: torch.Tensor, impl: ops.Impl = "reference") -> torch.Tensor:
        layer = ops.implementation(impl, "modulated_conv2d")
        return layer(x, self.weight, self.affine(w) * self.style_gain, up=self.up, fir=self.fir, noise=self.noise,
                     noise_strength=self.noise_strength, bias=self.bias, activation="lrelu")


class ToRGB(nn.Module):
    """A 1x1 modulated conv to RGB without demodulation, plus the upsampled skip from the previous resolution."""

    def __init__(self, in_ch: int, style_dim: int):
        super().__init__()
        self.affine = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(3, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))
        self.register_buffer("fir", reference.fir_kernel(), persistent=False)
        self.style_gain = 1.0 / math.sqrt(in_ch)

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None, impl: ops.Impl = "reference") -> torch.Tensor:
        layer = ops.implementation(impl, "modulated_conv2d")
        residual = None if skip is None else reference.upsample2d(skip, self.fir)
        return layer(x, self.weight, self.affine(w) * self.style_gain, demodulate=False, bias=self.bias,
                     residual=residual)


class SynthesisBlock(nn.Module):
    """All layers at one resolution: `conv0` (upsampling; absent at 4x4), `conv1` and `torgb`."""

    def __init__(self, in_ch: int, out_ch: int, style_dim: int, resolution: int):
        super().__init__()
        self.conv0 = StyledConv(in_ch, out_ch, style_dim, resolution, up=True) if resolution > 4 else None
        self.conv1 = StyledConv(out_ch if resolution > 4 else in_ch, out_ch, style_dim, resolution)
        self.torgb = ToRGB(out_ch, style_dim)


class SynthesisNetwork(nn.Module):
    """`w+ [B, num_ws, D] -> image [B, 3, R, R]`."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.const = nn.Parameter(torch.randn(1, config.width(4), 4, 4))
        blocks = []
        in_ch = config.width(4)
        for res in config.resolutions:
            blocks.append(SynthesisBlock(in_ch, config.width(res), config.style_dim, res))
            in_ch = config.width(res)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, ws: torch.Tensor, impl: ops.Impl = "reference") -> torch.Tensor:
        x = self.const.expand(ws.shape[0], -1, -1, -1).to(ws.dtype)
        img = None
        i = 0
        for block in self.blocks:
            if block.conv0 is not None:
                x = block.conv0(x, ws[:, i], impl)
                i += 1
            x = block.conv1(x, ws[:, i], impl)
            i += 1
            # toRGB shares its style with the next block's first conv
            img = block.torgb(x, ws[:, i], img, impl)
        return img


class Generator(nn.Module):
    """StyleGAN2 generator. `forward(w_plus)` is the synthesis, which is what the exporter traces."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.mapping_network = MappingNetwork(config.style_dim, config.n_mlp, config.lr_mlp)
        self.synthesis_network = SynthesisNetwork(config)
        self.register_buffer("w_avg", torch.zeros(config.style_dim))
        self.impl: ops.Impl = "reference"

    @property
    def num_ws(self) -> int:
        return self.config.num_ws

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def mapping(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """Map `z [B, D]` to `w+ [B, num_ws, D]`, pulled towards `w_avg` by `truncation` (1.0: none)."""
        w = self.mapping_network(z)
        if truncation != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, truncation)
        return w[:, None, :].expand(-1, self.num_ws, -1)

    def synthesis(self, w_plus: torch.Tensor) -> torch.Tensor:
        """Render `w+ [B, num_ws, D]` to images `[B, 3, R, R]`, roughly in [-1, 1]."""
        return self.synthesis_network(w_plus, self.impl)

    def forward(self, w_plus: torch.Tensor) -> torch.Tensor:
        return self.synthesis(w_plus)

    @torch.no_grad()
    def estimate_w_avg(self, num_samples: int = 4096, seed: int = 0) -> torch.Tensor:
        """Set `w_avg` to the mean of the mapping network's output over seeded random `z` (for fresh generators)."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(num_samples, self.config.style_dim, generator=g).to(self.w_avg.device)
        self.w_avg.copy_(self.mapping_network(z).mean(0))
        return self.w_avg


class LatentMapping(nn.Module):
    """The mapping half of a `Generator` (its tensors keep the generator's names): enough to sample latents
    (`ffclip.latents.sample_latents`) without building the synthesis network."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.mapping_network = MappingNetwork(config.style_dim, config.n_mlp, config.lr_mlp)
        self.register_buffer("w_avg", torch.zeros(config.style_dim))

    num_ws = Generator.num_ws
    mapping = Generator.mapping

