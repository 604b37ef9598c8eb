"""Fused StyleGAN2 modulated convolution: one launch per synthesis layer.

The kernel is an implicit GEMM over `M = output pixels of one sample`, `N = output channels`,
`K = input channels x taps`; each program owns a `BLOCK_M x BLOCK_N` tile of one sample. It reads `x`, the weight and
the output through their strides, so NCHW and channels-last tensors both work. Channels-last is the fast layout on a
GPU: a `BLOCK_M x BLOCK_K` input tile is then contiguous along the input channels, and the output tile along the
output channels; NCHW is accepted so the model runs unchanged. The weight is best passed with its input channels
innermost per output channel (any strided view of the `[Cout, Cin, k, k]` tensor works).

The style multiplies the weight tile in registers rather than the input tile: the tile belongs to one sample, so
`W[:, ci] * s[ci]` is the same product as scaling input channel `ci`, at `BLOCK_K x BLOCK_N` instead of
`BLOCK_M x BLOCK_K` multiplies. Demodulation coefficients `rsqrt(styles^2 @ sum_k(W^2)^T + 1e-8)` are computed
inside the kernel for the program's output channels before the main loop, as one `[BLOCK_N]` vector (a larger
partial sum beside the accumulator made every large tile spill); the epilogue then adds `noise * noise_strength`, the
bias, leaky ReLU 0.2 times `gain`, and an optional residual (the RGB skip), and stores once. Accumulation is fp32.

Upsampling layers: the stride-2 transposed convolution (input scaled by the style) and the [1,3,3,1] blur stay with
cuDNN; the same kernel, without its GEMM, then applies the demodulation (it commutes with the blur, both being
linear per channel), noise, bias and activation in one pass. fp32 layers take the same route through a plain
cuDNN convolution: an IEEE fp32 GEMM runs on the FMA units and spills at every useful tile size, and even TF32 tiles
spill on sm_80, so the kernel multiplies 16-bit operands only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffclip.kernels import _config
from ffclip.kernels.reference import (
    LRELU_GAIN,
    Activation,
    blur_after_transpose,
    fir_kernel,
    modulated_conv2d_scaled,
)


@triton.jit
def _demodulation(w_ptr, s_ptr, b, offs_n, mask_n, C_IN, sw_o, sw_i, sw_h, sw_w, ss_b, ss_c,
                  KSIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`rsqrt(sum_{ci,taps} (s[b,ci] W[n,ci,tap])^2 + 1e-8)` for the output channels `offs_n`.

    Each `BLOCK_K` slice of input channels is reduced to `[BLOCK_N]` at once, so only that vector stays live.
    """
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C_IN, BLOCK_K):
        offs_k = c0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C_IN
        s = tl.load(s_ptr + b * ss_b + offs_k * ss_c, mask=mask_k, other=0.0).to(tl.float32)
        w_sq = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for tap in tl.static_range(KSIZE * KSIZE):
            w = tl.load(w_ptr + offs_n[None, :] * sw_o + offs_k[:, None] * sw_i + (tap // KSIZE) * sw_h + (tap % KSIZE) * sw_w,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            w_sq += w * w
        total += tl.sum(w_sq * (s * s)[:, None], axis=0)
    return tl.rsqrt(total + 1e-8)


@triton.jit
def _modconv_kernel(
    x_ptr, w_ptr, s_ptr, noise_ptr, strength_ptr, bias_ptr, res_ptr, out_ptr,
    C_IN, C_OUT, H, W, H_OUT, W_OUT,
    sx_b, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w, ss_b, ss_c, sn_b, sn_h, sn_w,
    sr_b, sr_c, sr_h, sr_w, so_b, so_c, so_h, so_w,
    gain,
    KSIZE: tl.constexpr, PAD: tl.constexpr, CONV: tl.constexpr, DEMOD: tl.constexpr, HAS_NOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, LRELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < H_OUT * W_OUT
    mask_n = offs_n < C_OUT
    oh = offs_m // W_OUT
    ow = offs_m % W_OUT
    mask = mask_m[:, None] & mask_n[None, :]
    # Before the main loop, so that only a [BLOCK_N] vector lives beside the accumulator.
    if DEMOD:
        demod = _demodulation(w_ptr, s_ptr, b, offs_n, mask_n, C_IN, sw_o, sw_i, sw_h, sw_w, ss_b, ss_c,
                              KSIZE, BLOCK_K, BLOCK_N)

    if CONV:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tap in tl.static_range(KSIZE * KSIZE):
            ih = oh + (tap // KSIZE - PAD)
            iw = ow + (tap % KSIZE - PAD)
            inside = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tap = x_ptr + b * sx_b + (ih * sx_h + iw * sx_w)[:, None]
            w_tap = w_ptr + offs_n[None, :] * sw_o + (tap // KSIZE) * sw_h + (tap % KSIZE) * sw_w
            for c0 in range(0, C_IN, BLOCK_K):
                offs_k = c0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < C_IN
                a = tl.load(x_tap + offs_k[None, :] * sx_c, mask=inside[:, None] & mask_k[None, :], other=0.0)
                # in the operand dtype: a 16-bit product is exact in fp32, so rounding it once gives the same operand
                s = tl.load(s_ptr + b * ss_b + offs_k * ss_c, mask=mask_k, other=0.0).to(a.dtype)
                w = tl.load(w_tap + offs_k[:, None] * sw_i, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(a.dtype)
                acc = tl.dot(a, w * s[:, None], acc)
    else:
        acc = tl.load(x_ptr + b * sx_b + offs_n[None, :] * sx_c + oh[:, None] * sx_h + ow[:, None] * sx_w,
                      mask=mask, other=0.0).to(tl.float32)

    if DEMOD:
        acc = acc * demod[None, :]
    if HAS_NOISE:
        noise = tl.load(noise_ptr + b * sn_b + oh * sn_h + ow * sn_w, mask=mask_m, other=0.0).to(tl.float32)
        acc = acc + (noise * tl.load(strength_ptr).to(tl.float32))[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if LRELU:
        acc = tl.where(acc >= 0.0, acc, acc * 0.2)
    acc = acc * gain
    if HAS_RES:
        acc = acc + tl.load(res_ptr + b * sr_b + offs_n[None, :] * sr_c + oh[:, None] * sr_h + ow[:, None] * sr_w,
                            mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * so_b + offs_n[None, :] * so_c + oh[:, None] * so_h + ow[:, None] * so_w,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


_KEY = ["C_IN", "C_OUT", "H_OUT", "W_OUT", "KSIZE", "CONV"]
_launch_conv = _config.launcher(_modconv_kernel, "modconv", _config.MODCONV_CONFIGS, _KEY)
_launch_epilogue = _config.launcher(_modconv_kernel, "epilogue", _config.EPILOGUE_CONFIGS, _KEY)


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def modulated_conv2d(
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
    tf32: bool = False,
    out: torch.Tensor | None = None,
    config: _config.Config | None = None,
) -> torch.Tensor:
    """A whole StyleGAN2 layer: `act(demod * conv(x * styles, weight) + noise * noise_strength + bias) + residual`.

    `x [B,Cin,H,W]`, `weight [Cout,Cin,k,k]` (odd k, same padding), `styles [B,Cin]` (every gain included).
    `noise` broadcasts to `[B,1,H,W]`; `activation="lrelu"` is leaky ReLU 0.2 times `gain`; `residual [B,Cout,H,W]`
    is added last. With `up`, the stride-2 transposed convolution and the FIR blur `fir` (default [1,3,3,1]) run in
    PyTorch and the kernel does the rest. fp16/bf16 multiply in the kernel and accumulate in fp32. fp32 convolves
    in cuDNN before the kernel's epilogue, exactly unless `tf32` lets cuDNN use TF32 (10-bit mantissas, fp32
    accumulation: a relative error near 1e-3, as fp16 inputs give).
    `out` receives the result when given; `config` fixes the tile sizes instead of autotuning.
    """
    _config.check_device(x, weight, styles)
    batch, c_in, ksize = x.shape[0], weight.shape[1], weight.shape[-1]
    c_out = weight.shape[0]
    if x.shape[1] != c_in or styles.shape != (batch, c_in) or weight.shape[2] != ksize or ksize % 2 == 0:
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles {tuple(styles.shape)}")
    # The kernel multiplies 16-bit blocks; fp32 and the transposed convolution are cuDNN's.
    gemm = not up and x.dtype != torch.float32
    if gemm:
        src = x
    else:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            src = modulated_conv2d_scaled(x, weight, styles, demodulate=False, up=up)
        if up:
            src = blur_after_transpose(src, fir_kernel() if fir is None else fir, ksize)
    h_out, w_out = src.shape[-2:]
    if out is None:
        out = _empty_like_layout(x, (batch, c_out, h_out, w_out))
    elif out.shape != (batch, c_out, h_out, w_out):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(batch, c_out, h_out, w_out)}")
    noise_v = None if noise is None else noise.expand(batch, 1, h_out, w_out)
    strength = None
    if noise is not None:
        strength = torch.as_tensor(1.0 if noise_strength is None else noise_strength, dtype=torch.float32, device=x.device)
    res, dummy = residual, out  # absent operands get a placeholder pointer their flag never reads
    launch = _launch_conv if gemm else _launch_epilogue
    launch(
        lambda meta: (triton.cdiv(h_out * w_out, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]), batch),
        config,
        x_ptr=src, w_ptr=weight, s_ptr=styles,
        noise_ptr=dummy if noise_v is None else noise_v,
        strength_ptr=dummy if strength is None else strength,
        bias_ptr=dummy if bias is None else bias,
        res_ptr=dummy if res is None else res,
        out_ptr=out,
        C_IN=c_in, C_OUT=c_out, H=src.shape[2], W=src.shape[3], H_OUT=h_out, W_OUT=w_out,
        sx_b=src.stride(0), sx_c=src.stride(1), sx_h=src.stride(2), sx_w=src.stride(3),
        sw_o=weight.stride(0), sw_i=weight.stride(1), sw_h=weight.stride(2), sw_w=weight.stride(3),
        ss_b=styles.stride(0), ss_c=styles.stride(1),
        sn_b=0 if noise_v is None else noise_v.stride(0),
        sn_h=0 if noise_v is None else noise_v.stride(2),
        sn_w=0 if noise_v is None else noise_v.stride(3),
        sr_b=0 if res is None else res.stride(0), sr_c=0 if res is None else res.stride(1),
        sr_h=0 if res is None else res.stride(2), sr_w=0 if res is None else res.stride(3),
        so_b=out.stride(0), so_c=out.stride(1), so_h=out.stride(2), so_w=out.stride(3),
        gain=gain if activation == "lrelu" else 1.0,
        KSIZE=ksize, PAD=ksize // 2, CONV=gemm, DEMOD=demodulate, HAS_NOISE=noise is not None,
        HAS_BIAS=bias is not None, HAS_RES=res is not None, LRELU=activation == "lrelu",
    )
    return out

