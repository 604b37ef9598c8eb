"""The plain-PyTorch maths that the models run and the Triton kernels reproduce (imports torch only).

StyleGAN2 (DESIGN §5): FIR resampling, demodulation and the modulated convolution in two forms that compute the same
thing. The "scaled" form (the one the models run) scales the input channels by the style, convolves with the one
shared weight and scales the output channels by the demodulation coefficients, so it exports with a static weight and
any batch size. The "grouped" form builds a weight per sample and runs a grouped convolution with `groups = batch`,
as the published implementations do; tests hold the two together.

FFCLIP's mapper block (DESIGN §4), in its stable form: steps 2-5 on the block's projections.

Functions named `*_reference` take the same arguments as the Triton kernel of the same name in `ffclip.kernels`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Activation = Literal["lrelu"] | None

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
INJECTION_SLOPE = 0.01
# the largest argument given to exp in the channel attention (exp(64) ~ 6e27, far below float32's limit)
EXP_SAFE = 64.0


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


def modulated_conv2d_scaled(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True, up: bool = False
) -> torch.Tensor:
    """StyleGAN2's modulated convolution of `x [B,Cin,H,W]` with `weight [Cout,Cin,k,k]` and `styles [B,Cin]`, as
    input scaling, one shared convolution and output scaling.

    `styles` already carries every gain (the equalised-lr scale included). With `up`, the convolution is a stride-2
    transposed convolution whose result the caller blurs. Padding keeps the spatial size (`k // 2`).
    """
    w = weight.to(x.dtype)
    x = x * styles.to(x.dtype)[:, :, None, None]
    if up:
        x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)
    else:
        x = F.conv2d(x, w, padding=weight.shape[-1] // 2)
    if demodulate:
        x = x * demodulation(weight, styles).to(x.dtype)[:, :, None, None]
    return x


def modulated_conv2d_grouped(
    x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True, up: bool = False
) -> torch.Tensor:
    """`modulated_conv2d_scaled` as the published implementations write it: a weight per sample, one group each."""
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


def modulated_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    *,
    demodulate: bool = True,
    up: bool = False,
    fir: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    noise_strength: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    activation: Activation = None,
    gain: float = LRELU_GAIN,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """A whole StyleGAN2 layer: `act(demod * conv(x * styles, weight) + noise * noise_strength + bias) + residual`,
    in the input's dtype.

    With `up`, the convolution is transposed (stride 2) and blurred by `fir` (default [1,3,3,1]); `noise` broadcasts
    to `[B,1,H,W]`; `activation="lrelu"` is leaky ReLU 0.2 times `gain`.
    """
    y = modulated_conv2d_scaled(x, weight, styles, demodulate=demodulate, up=up)
    if up:
        y = blur_after_transpose(y, fir_kernel() if fir is None else fir, weight.shape[-1])
    if noise is not None:
        y = y + (noise * (1.0 if noise_strength is None else noise_strength)).to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)[None, :, None, None]
    if activation == "lrelu":
        y = F.leaky_relu(y, LRELU_SLOPE) * gain
    return y if residual is None else y + residual


def _row(t: torch.Tensor) -> torch.Tensor:
    """`[B, 1, D]` view of a `[B, D]` or `[B, 1, D]` tensor."""
    return t.reshape(-1, 1, t.shape[-1])


def layer_selection_reference(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Step 2: `softmax_L(K q^T) * V` for `K, V [B, L, D]` and `q [B, D]` or `[B, 1, D]`.

    The scores are row-wise sums, which give equal layers equal scores (a matrix-vector product may sum the rows in
    different orders): latents equal on every layer then stay equal through every block, as in exact arithmetic.
    """
    return torch.softmax((k * _row(q)).sum(dim=-1, keepdim=True), dim=1) * v


def channel_attention_reference(
    q2: torch.Tensor, k2: torch.Tensor, v2_mean: torch.Tensor, *, e: torch.Tensor | None = None, layer_norm: bool = True
) -> torch.Tensor:
    """Step 3: `LayerNorm(mean_L(V2) A)` with `A = softmax(K2 Q2 / sqrt(D))`, as `[B, 1, D]`, in the centred form.

    `q2 [B, L, D]`, `v2_mean [B, D]` or `[B, 1, D]`; `k2` is `K2 [B, D, L]`, or with `e [B, D]` (or `[B, 1, D]`) the
    `Linear(1 -> L)` weight `[L, 1]` that makes `K2 = e^T w^T`. `layer_norm=False` returns the centred product
    `mean_L(V2) (A - 1/D)` (float32 at least), whose LayerNorm equals that of the released `mean_L(V2) A`: the
    latter's mean over the output channels is exactly `sum(mean_L(V2)) / D`. With scores `r` centred over the softmax
    axis, `D A - 1 = expm1(r - log(mean(exp(r))))`: the nearly uniform attention is formed as its small departure
    from uniform, with nothing to cancel.
    """
    if e is not None:
        k2 = F.linear(_row(e).transpose(1, 2), k2)
    d = q2.shape[-1]
    q2w, k2, m = widen(q2), widen(k2), widen(_row(v2_mean))
    r = k2 @ (q2w - q2w.mean(dim=-1, keepdim=True)) / math.sqrt(d)
    # shifted only where exp would overflow: then the attention is far from uniform and cancellation is no concern
    shift = (r.amax(dim=-1, keepdim=True) - EXP_SAFE).clamp(min=0)
    log_mean_exp = shift + log1p(expm1(r - shift).mean(dim=-1, keepdim=True))
    t = (m @ expm1(r - log_mean_exp)) / d
    return F.layer_norm(t, (d,)).to(q2.dtype) if layer_norm else t


def mapper_block_reference(
    k: torch.Tensor,
    q: torch.Tensor,
    v: torch.Tensor,
    q2: torch.Tensor,
    k2: torch.Tensor,
    v2_mean: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    e: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 2-5 of a mapper block on its projections: `LeakyReLU(LN(sel + LN(att)) (1 + gamma) + beta)`.

    `k, v [B, L, D]` and `q [B, (1,) D]` feed the layer selection, `q2, k2, v2_mean` (and `e`) the channel attention
    as `channel_attention_reference` takes them; `gamma, beta [B, (1,) D]` are the injection MLPs' outputs.
    """
    h = layer_selection_reference(k, q, v)
    h = F.layer_norm(h + channel_attention_reference(q2, k2, v2_mean, e=e), (k.shape[-1],))
    return F.leaky_relu(h * (1 + _row(gamma)) + _row(beta), INJECTION_SLOPE)
