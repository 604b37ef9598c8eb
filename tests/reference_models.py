"""Independent reference implementations for the checkpoint tests, written without ffclip's modules.

`RefGenerator` follows rosinality/stylegan2-pytorch's parameter names and its per-sample grouped modulated
convolution; FIR resampling is done by explicit zero insertion, padding and a per-channel convolution.
`ref_mapper` is DESIGN §4 in plain tensor operations over a dict of released-layout weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

SMALL_CHANNELS = {4: 24, 8: 20, 16: 12, 32: 10}


def blur_taps() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum()


def fir(x: torch.Tensor, kernel: torch.Tensor, up: int, pad0: int, pad1: int) -> torch.Tensor:
    """Zero-insertion upsampling, padding, then a true (flipped-kernel) convolution on each channel."""
    b, c, h, w = x.shape
    if up > 1:
        z = x.new_zeros(b, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, [pad0, pad1, pad0, pad1])
    weight = kernel.flip(0, 1).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, groups=c)


class EqLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias_init: float = 0.0, lr_mul: float = 1.0, act: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((d_out,), bias_init) + 0.1 * torch.randn(d_out))
        self.scale = lr_mul / math.sqrt(d_in)
        self.lr_mul = lr_mul
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ (self.weight * self.scale).t() + self.bias * self.lr_mul
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.act else out


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(dim=1, keepdim=True) + 1e-8)


class Const(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, ch, 4, 4))


class Blur(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", blur_taps() * 4)


class ModConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, style_dim: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k))
        self.modulation = EqLinear(style_dim, cin, bias_init=1.0)
        self.scale = 1 / math.sqrt(cin * k * k)
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            self.blur = Blur()

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, cin, h, w = x.shape
        cout, k = self.weight.shape[1], self.weight.shape[-1]
        weight = self.scale * self.weight * self.modulation(style).view(b, 1, cin, 1, 1)
        if self.demodulate:
            weight = weight / torch.sqrt((weight * weight).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        x = x.reshape(1, b * cin, h, w)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * cin, cout, k, k)
            out = F.conv_transpose2d(x, weight, stride=2, groups=b)
            out = out.view(b, cout, *out.shape[2:])
            return fir(out, self.blur.kernel, up=1, pad0=1, pad1=1)
        out = F.conv2d(x, weight.reshape(b * cout, cin, k, k), padding=k // 2, groups=b)
        return out.view(b, cout, *out.shape[2:])


class Noise(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(0.5 * torch.randn(1))


class Act(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)


class StyledConvRef(nn.Module):
    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModConv(cin, cout, 3, style_dim, upsample=upsample)
        self.noise = Noise()
        self.activate = Act(cout)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x, style) + self.noise.weight * noise)


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", blur_taps() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fir(x, self.kernel, up=2, pad0=2, pad1=1)


class ToRGBRef(nn.Module):
    def __init__(self, cin: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModConv(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(0.1 * torch.randn(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        return out if skip is None else out + self.upsample(skip)


class RefGenerator(nn.Module):
    """A rosinality-layout StyleGAN2 generator with arbitrary per-resolution widths."""

    def __init__(self, channels: dict[int, int], style_dim: int = 32, n_mlp: int = 3, lr_mlp: float = 0.01):
        super().__init__()
        resolution = max(channels)
        self.log_size = int(math.log2(resolution))
        self.num_ws = 2 * self.log_size - 2
        self.style = nn.Sequential(
            PixelNorm(), *[EqLinear(style_dim, style_dim, lr_mul=lr_mlp, act=True) for _ in range(n_mlp)]
        )
        self.input = Const(channels[4])
        self.conv1 = StyledConvRef(channels[4], channels[4], style_dim)
        self.to_rgb1 = ToRGBRef(channels[4], style_dim, upsample=False)
        self.noises = nn.Module()
        for i in range(2 * self.log_size - 3):
            r = 2 ** ((i + 5) // 2)
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        cin = channels[4]
        for i in range(3, self.log_size + 1):
            cout = channels[2**i]
            self.convs.append(StyledConvRef(cin, cout, style_dim, upsample=True))
            self.convs.append(StyledConvRef(cout, cout, style_dim))
            self.to_rgbs.append(ToRGBRef(cout, style_dim))
            cin = cout

    def mapping(self, z: torch.Tensor, truncation: float = 1.0, latent_avg: torch.Tensor | None = None) -> torch.Tensor:
        w = self.style(z)
        return w if latent_avg is None else latent_avg + truncation * (w - latent_avg)

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        noise = [getattr(self.noises, f"noise_{i}") for i in range(2 * self.log_size - 3)]
        x = self.input.input.repeat(ws.shape[0], 1, 1, 1)
        x = self.conv1(x, ws[:, 0], noise[0])
        skip = self.to_rgb1(x, ws[:, 1], None)
        i = 1
        for k, to_rgb in enumerate(self.to_rgbs):
            x = self.convs[2 * k](x, ws[:, i], noise[2 * k + 1])
            x = self.convs[2 * k + 1](x, ws[:, i + 1], noise[2 * k + 2])
            skip = to_rgb(x, ws[:, i + 2], skip)
            i += 2
        return skip


def make_reference_generator(seed: int = 0) -> RefGenerator:
    torch.manual_seed(seed)
    return RefGenerator(SMALL_CHANNELS).eval().requires_grad_(False)


def rosinality_checkpoint(ref: RefGenerator, latent_avg: torch.Tensor) -> dict:
    return {"g_ema": ref.state_dict(), "latent_avg": latent_avg}


def nvidia_tensors(ref: RefGenerator, w_avg: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """The reference weights in NVIDIA's layout, grouped by module path (`''` for tensors of the root)."""
    sd = ref.state_dict()
    mods: dict[str, dict[str, torch.Tensor]] = OrderedDict()
    n_mlp = len(ref.style) - 1
    for i in range(n_mlp):
        mods[f"mapping.fc{i}"] = {"weight": sd[f"style.{i + 1}.weight"], "bias": sd[f"style.{i + 1}.bias"]}
    mods["mapping"] = {"w_avg": w_avg}
    filt = blur_taps()

    def layer(src: str, noise: str | None) -> dict[str, torch.Tensor]:
        out = {"weight": sd[f"{src}.conv.weight"][0]}
        if noise is not None:
            out.update(
                noise_strength=sd[f"{src}.noise.weight"][0], bias=sd[f"{src}.activate.bias"],
                noise_const=sd[f"noises.{noise}"][0, 0], resample_filter=filt,
            )
        else:
            out["bias"] = sd[f"{src}.bias"].reshape(3)
        return out

    def affine(src: str) -> dict[str, torch.Tensor]:
        return {"weight": sd[f"{src}.conv.modulation.weight"], "bias": sd[f"{src}.conv.modulation.bias"]}

    mods["synthesis.b4"] = {"const": sd["input.input"][0], "resample_filter": filt}
    for name, src, noise in (("conv1", "conv1", "noise_0"), ("torgb", "to_rgb1", None)):
        mods[f"synthesis.b4.{name}"] = layer(src, noise)
        mods[f"synthesis.b4.{name}.affine"] = affine(src)
    for k in range(len(ref.to_rgbs)):
        res = 2 ** (k + 3)
        mods[f"synthesis.b{res}"] = {"resample_filter": filt}
        for name, src, noise in (
            ("conv0", f"convs.{2 * k}", f"noise_{2 * k + 1}"),
            ("conv1", f"convs.{2 * k + 1}", f"noise_{2 * k + 2}"),
            ("torgb", f"to_rgbs.{k}", None),
        ):
            mods[f"synthesis.b{res}.{name}"] = layer(src, noise)
            mods[f"synthesis.b{res}.{name}.affine"] = affine(src)
    return mods


def _layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5)
    return y if weight is None else y * weight + bias


def _mlp(e: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    h = e @ p[f"{name}.0.weight"].t() + p[f"{name}.0.bias"]
    h = _layer_norm(h, p[f"{name}.1.weight"], p[f"{name}.1.bias"])
    h = torch.where(h > 0, h, 0.01 * h)
    return h @ p[f"{name}.3.weight"].t() + p[f"{name}.3.bias"]


def ref_mapper(blocks: list[dict[str, torch.Tensor]], w: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """DESIGN §4 with plain tensor operations; `blocks` hold each block's released-layout weights."""
    e = text[:, None, :]
    d = w.shape[-1]
    x = w
    for p in blocks:
        x = x / torch.sqrt((x * x).mean(dim=1, keepdim=True) + 1e-8)
        k = x @ p["k_matrix.weight"].t()
        v = x @ p["v_matrix.weight"].t()
        q = e @ p["q_matrix.weight"].t()
        s = torch.softmax(k @ q.transpose(1, 2), dim=1)
        h = s * v
        q2 = x @ p["attention_layer.q_matrix.weight"].t()
        k2 = e.transpose(1, 2) @ p["attention_layer.k_matrix.weight"].t()
        v2 = x @ p["attention_layer.v_matrix.weight"].t()
        a = torch.softmax(k2 @ q2 / math.sqrt(d), dim=-1)
        t = _layer_norm((v2 @ a).mean(dim=1, keepdim=True))
        h = _layer_norm(h + t)
        h = h * (1 + _mlp(e, p, "gamma_")) + _mlp(e, p, "beta_")
        x = torch.where(h > 0, h, 0.01 * h)
    return w + x


def mapper_blocks(mapper: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Each block's weights of an `ffclip` mapper, keyed as `ref_mapper` reads them."""
    return [dict(block.state_dict()) for block in mapper.blocks]


def release_mapper_weights(num_ws: int, dim: int, num_blocks: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random weights for each block in the released layout, the unused `fc` layer included."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    blocks = []
    for _ in range(num_blocks):
        p = {
            "q_matrix.weight": r(dim, dim, scale=dim**-0.5),
            "k_matrix.weight": r(dim, dim, scale=dim**-0.5),
            "v_matrix.weight": r(dim, dim, scale=dim**-0.5),
            "attention_layer.q_matrix.weight": r(dim, dim, scale=dim**-0.5),
            "attention_layer.k_matrix.weight": r(num_ws, 1),
            "attention_layer.v_matrix.weight": r(dim, dim, scale=dim**-0.5),
            "fc.weight": r(dim, dim),
            "fc.bias": r(dim),
        }
        for name in ("gamma_", "beta_"):
            p.update({
                f"{name}.0.weight": r(dim, dim, scale=dim**-0.5), f"{name}.0.bias": r(dim, scale=0.1),
                f"{name}.1.weight": 1 + r(dim, scale=0.1), f"{name}.1.bias": r(dim, scale=0.1),
                f"{name}.3.weight": r(dim, dim, scale=dim**-0.5), f"{name}.3.bias": r(dim, scale=0.1),
            })
        blocks.append(p)
    return blocks
