"""Plain-PyTorch StyleGAN2 operations: FIR resampling, equalised-learning-rate linear maps, modulated convolution.

`modulated_conv2d` has two forms that compute the same thing. "scaled" (the default, DESIGN §5) scales the input
channels by the style, convolves with the one shared weight and scales the output channels by the demodulation
coefficients, so it exports with a static weight and any batch size. "grouped" builds a weight per sample and runs a
grouped convolution with `groups = batch`, as the reference implementations do; tests hold the two together.
"triton" runs the fused Triton kernel of `ffclip.kernels` (imported on first use); the synthesis layers then also fuse
their noise, bias and activation into it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

ConvForm = Literal["scaled", "grouped", "triton"]

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def fir_kernel(taps: tuple[float, ...] = (1.0, 3.0, 3.0, 1.0)) -> torch.Tensor:
    """The separable 2-D FIR filter made from 1-D `taps`, normalised to sum to one."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (`pad[0]` before, `pad[1]` after, both axes), then filter each channel.

    The kernel is applied as a true convolution (flipped), as StyleGAN2's upfirdn2d does; the filters used here are
    symmetric so the flip changes nothing but is kept for exactness with other filters.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    k = torch.flip(kernel, [0, 1]).to(dtype=x.dtype, device=x.device)
    k = k[None, None].expand(c, 1, *k.shape)
    return F.conv2d(x, k, groups=c)


def upsample2d(x: torch.Tensor, kernel: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """FIR upsampling by `factor` (StyleGAN2's skip-connection upsample); `kernel` sums to one."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * factor**2, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def blur_after_transpose(x: torch.Tensor, kernel: torch.Tensor, conv_kernel_size: int, factor: int = 2) -> torch.Tensor:
    """The FIR blur that follows a stride-`factor` transposed convolution of size `conv_kernel_size`."""
    p = kernel.shape[0] - factor - (conv_kernel_size - 1)
    return upfirdn2d(x, kernel * factor**2, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def equal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lr_mul: float = 1.0) -> torch.Tensor:
    """A linear map with the equalised learning rate: stored weights are scaled by `lr_mul / sqrt(fan_in)`."""
    gain = lr_mul / math.sqrt(weight.shape[1])
    return F.linear(x, weight * gain, None if bias is None else bias * lr_mul)


def widen(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when it is a narrower float (float64 stays), for sums whose epsilon float16 cannot hold."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def expm1(x: torch.Tensor) -> torch.Tensor:
    """`exp(x) - 1`, accurate near 0, from exp and log alone (ONNX has no Expm1): with `u = exp(x)`, the rounding
    of `u` cancels in `(u - 1) x / log(u)` (Kahan). Arguments below -80 give -1."""
    x = x.clamp(min=-80.0)
    u = torch.exp(x)
    one = u == 1
    return torch.where(one, x, (u - 1) * x / torch.where(one, 1.0, torch.log(u)))


def log1p(x: torch.Tensor) -> torch.Tensor:
    """`log(1 + x)`, accurate near 0, from log alone (ONNX has no Log1p): with `u = 1 + x`, `log(u) x / (u - 1)`."""
    u = 1 + x
    one = u == 1
    return torch.where(one, x, torch.log(u) * x / torch.where(one, 1.0, u - 1))


def demodulation(weight: torch.Tensor, styles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample output-channel coefficients `rsqrt(styles^2 @ sum_k(W^2)^T + eps)`, shape `[B, Cout]`."""
    s, w = widen(styles), widen(weight)
    return torch.rsqrt(s.square() @ w.square().sum(dim=(2, 3)).t() + eps).to(styles.dtype)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    *,
    demodulate: bool = True,
    up: bool = False,
    form: ConvForm = "scaled",
) -> torch.Tensor:
    """StyleGAN2's modulated convolution of `x [B,Cin,H,W]` with `weight [Cout,Cin,k,k]` and `styles [B,Cin]`.

    `styles` already carries every gain (the equalised-lr scale included). With `up`, the convolution is a stride-2
    transposed convolution whose result the caller blurs. Padding keeps the spatial size (`k // 2`).
    """
    if form == "scaled":
        return _modulated_conv2d_scaled(x, weight, styles, demodulate=demodulate, up=up)
    if form == "grouped":
        return _modulated_conv2d_grouped(x, weight, styles, demodulate=demodulate, up=up)
    if form == "triton":
        if up:
            # The transposed convolution stays with cuDNN (see ffclip.kernels.modulated_conv).
            return _modulated_conv2d_scaled(x, weight, styles, demodulate=demodulate, up=up)
        from ffclip.kernels import modulated_conv2d as fused

        return fused(x, weight, styles, demodulate=demodulate)
    raise ValueError(f"unknown modulated convolution form {form!r}; use 'scaled', 'grouped' or 'triton'")


def _modulated_conv2d_scaled(x, weight, styles, *, demodulate: bool, up: bool) -> torch.Tensor:
    w = weight.to(x.dtype)
    x = x * styles.to(x.dtype)[:, :, None, None]
    if up:
        x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)
    else:
        x = F.conv2d(x, w, padding=weight.shape[-1] // 2)
    if demodulate:
        x = x * demodulation(weight, styles).to(x.dtype)[:, :, None, None]
    return x


def _modulated_conv2d_grouped(x, weight, styles, *, demodulate: bool, up: bool) -> torch.Tensor:
    b, cin, h, w_ = x.shape
    cout, _, k, _ = weight.shape
    w = weight[None] * styles[:, None, :, None, None]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    w = w.to(x.dtype)
    x = x.reshape(1, b * cin, h, w_)
    if up:
        w = w.transpose(1, 2).reshape(b * cin, cout, k, k)
        out = F.conv_transpose2d(x, w, stride=2, groups=b)
    else:
        out = F.conv2d(x, w.reshape(b * cout, cin, k, k), padding=k // 2, groups=b)
    return out.reshape(b, cout, *out.shape[2:])


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add a per-channel bias, then leaky ReLU (slope 0.2) with gain sqrt(2), as StyleGAN2's fused activation."""
    return F.leaky_relu(x + bias.to(x.dtype)[None, :, None, None], LRELU_SLOPE) * LRELU_GAIN


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each vector to unit second moment over its last axis."""
    xf = widen(x)
    return (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
