"""Fused kernels for the FFCLIP mapper block (DESIGN §4 steps 2-5).

Channel cross-attention (step 3) never writes the `[B, D, D]` matrix. A program owns `BLOCK_I` rows `i` of
`A = softmax_j(K2[i,:] . Q2[:,j] / sqrt(D))` in the centred form of DESIGN §4: a first sweep over `j` sums
`expm1` of each row's centred scores (shifted only where `exp` would overflow), a second sweep recomputes the scores
and adds `m_i * (A[i, j] - 1/D)` (`m = mean_L(V2)`) over its rows into one partial sum per `j`. The partial sums of the row blocks (`[B, D/BLOCK_I, D]`, fp32) are added by the next kernel,
which keeps the result deterministic without atomics. `K2` may be given whole (`[B, D, L]`) or, as in the released
mapper, as its `Linear(1 -> L)` weight and the text embedding: `K2[b,i,l] = e[b,i] * w[l]` is then formed on load.

Layer selection (step 2), the sum of partials, both LayerNorms (steps 3-4) and the text-conditioned injection with its
leaky ReLU (step 5) run in one more kernel, one program per `(sample, layer)`. The kernels take the block's
projections (the `Linear` layers and the injection MLPs, which stay with cuBLAS) as tensors; each public function
computes what its `*_reference` twin in `ffclip.kernels.reference` computes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ffclip.kernels import _config
from ffclip.kernels.reference import EXP_SAFE, INJECTION_SLOPE


@triton.jit
def _expm1(x):
    """`exp(x) - 1` as `ffclip.kernels.reference.expm1` computes it (Kahan's form from exp and log)."""
    x = tl.maximum(x, -80.0)
    u = tl.exp(x)
    one = u == 1.0
    return tl.where(one, x, (u - 1.0) * x / tl.log(tl.where(one, 2.0, u)))


@triton.jit
def _log1p(x):
    """`log(1 + x)` as `ffclip.kernels.reference.log1p` computes it."""
    u = 1.0 + x
    one = u == 1.0
    return tl.where(one, x, tl.log(u) * x / tl.where(one, 1.0, u - 1.0))


@triton.jit
def _centred_scores(k, q_rows, qbar, offs_j, mask_r, mask_j, sq_j, LOW_PRECISION_DOT: tl.constexpr):
    """Scores `K2 (Q2 - mean_j Q2) / sqrt(D)` of a tile (`k` already carries the scale)."""
    q = tl.load(q_rows + offs_j[None, :] * sq_j, mask=mask_r[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
    q = tl.where(mask_j[None, :], q - qbar[:, None], 0.0)
    if LOW_PRECISION_DOT:
        # 16-bit inputs carry no more digits than a 16-bit product keeps; accumulation stays float32
        return tl.dot(k.to(q_rows.dtype.element_ty), q.to(q_rows.dtype.element_ty))
    return tl.dot(k, q, input_precision="ieee")


@triton.jit
def _channel_attention_kernel(
    k2_ptr, e_ptr, q2_ptr, qbar_ptr, m_ptr, part_ptr,
    D, R, sk_b, sk_i, sk_r, se_b, se_i, sq_b, sq_r, sq_j, sqb_b, sqb_r, sm_b, sm_d, sp_b, sp_n, sp_d,
    scale, exp_safe,
    FACTORED: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0)
    pid = tl.program_id(1)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < D
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if FACTORED:
        e = tl.load(e_ptr + b * se_b + offs_i * se_i, mask=mask_i, other=0.0).to(tl.float32)
        w = tl.load(k2_ptr + offs_r * sk_r, mask=mask_r, other=0.0).to(tl.float32)
        k = e[:, None] * w[None, :]
    else:
        k = tl.load(k2_ptr + b * sk_b + offs_i[:, None] * sk_i + offs_r[None, :] * sk_r,
                    mask=mask_i[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    k = k * scale
    q_rows = q2_ptr + b * sq_b + offs_r[:, None] * sq_r
    qbar = tl.load(qbar_ptr + b * sqb_b + offs_r * sqb_r, mask=mask_r, other=0.0)

    # First sweep: sum_j expm1(r_ij - shift_i), where the shift is 0 unless exp would overflow.
    shift = tl.zeros([BLOCK_I], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(0, D, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < D
        r = _centred_scores(k, q_rows, qbar, offs_j, mask_r, mask_j, sq_j, LOW_PRECISION_DOT)
        tile_max = tl.max(tl.where(mask_j[None, :], r, float("-inf")), axis=1)
        new_shift = tl.maximum(shift, tile_max - exp_safe)
        seen = j0 * 1.0
        row_sum = tl.where(new_shift > shift, (row_sum + seen) * tl.exp(shift - new_shift) - seen, row_sum)
        shift = new_shift
        row_sum += tl.sum(tl.where(mask_j[None, :], _expm1(r - shift[:, None]), 0.0), axis=1)
    log_mean_exp = shift + _log1p(row_sum / D)

    # Second sweep: the row block's share of mean_L(V2) (A - 1/D) = sum_i m_i expm1(r_ij - log_mean_exp_i) / D.
    m = tl.load(m_ptr + b * sm_b + offs_i * sm_d, mask=mask_i, other=0.0).to(tl.float32)
    row_weight = m / D
    for j0 in range(0, D, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < D
        r = _centred_scores(k, q_rows, qbar, offs_j, mask_r, mask_j, sq_j, LOW_PRECISION_DOT)
        probs = _expm1(r - log_mean_exp[:, None]) * row_weight[:, None]
        tl.store(part_ptr + b * sp_b + pid * sp_n + offs_j * sp_d, tl.sum(probs, axis=0), mask=mask_j)


@triton.jit
def _layer_norm(v, mask, D):
    mean = tl.sum(v, axis=0) / D
    centred = tl.where(mask, v - mean, 0.0)
    return centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / D + 1e-5)


@triton.jit
def _attention_sum(part_ptr, b, offs_d, mask_d, NI, D, sp_b, sp_n, sp_d, LAYER_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """`t = LayerNorm(sum of the row-block partials)` for sample `b` (no LayerNorm without LAYER_NORM)."""
    t = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n in range(0, NI):
        t += tl.load(part_ptr + b * sp_b + n * sp_n + offs_d * sp_d, mask=mask_d, other=0.0)
    if LAYER_NORM:
        t = _layer_norm(t, mask_d, D)
    return t


@triton.jit
def _selection_row(k_ptr, q_ptr, v_ptr, b, l, L, offs_d, mask_d, sk_b, sk_l, sk_d, sq_b, sq_d, sv_b, sv_l, sv_d,
                   BLOCK_L: tl.constexpr):
    """Row `l` of `softmax_L(K q^T) * V` for sample `b`."""
    offs_l = tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    k = tl.load(k_ptr + b * sk_b + offs_l[:, None] * sk_l + offs_d[None, :] * sk_d,
                mask=mask_l[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b * sq_b + offs_d * sq_d, mask=mask_d, other=0.0).to(tl.float32)
    scores = tl.where(mask_l, tl.sum(k * q[None, :], axis=1), float("-inf"))
    weights = tl.exp(scores - tl.max(scores, axis=0))
    s_l = tl.sum(tl.where(offs_l == l, weights, 0.0), axis=0) / tl.sum(weights, axis=0)
    v = tl.load(v_ptr + b * sv_b + l * sv_l + offs_d * sv_d, mask=mask_d, other=0.0).to(tl.float32)
    return s_l * v


@triton.jit
def _layer_selection_kernel(k_ptr, q_ptr, v_ptr, out_ptr, L, D, sk_b, sk_l, sk_d, sq_b, sq_d, sv_b, sv_l, sv_d,
                            so_b, so_l, so_d, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    l = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    h = _selection_row(k_ptr, q_ptr, v_ptr, b, l, L, offs_d, mask_d, sk_b, sk_l, sk_d, sq_b, sq_d, sv_b, sv_l, sv_d, BLOCK_L)
    tl.store(out_ptr + b * so_b + l * so_l + offs_d * so_d, h.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _attention_finish_kernel(part_ptr, out_ptr, NI, D, sp_b, sp_n, sp_d, so_b, so_d,
                             LAYER_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    t = _attention_sum(part_ptr, b, offs_d, mask_d, NI, D, sp_b, sp_n, sp_d, LAYER_NORM, BLOCK_D)
    tl.store(out_ptr + b * so_b + offs_d * so_d, t.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _block_output_kernel(
    k_ptr, q_ptr, v_ptr, part_ptr, gamma_ptr, beta_ptr, out_ptr,
    L, D, NI, sk_b, sk_l, sk_d, sq_b, sq_d, sv_b, sv_l, sv_d, sp_b, sp_n, sp_d, sg_b, sg_d, sb_b, sb_d,
    so_b, so_l, so_d, slope,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    l = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    h = _selection_row(k_ptr, q_ptr, v_ptr, b, l, L, offs_d, mask_d, sk_b, sk_l, sk_d, sq_b, sq_d, sv_b, sv_l, sv_d, BLOCK_L)
    h = _layer_norm(h + _attention_sum(part_ptr, b, offs_d, mask_d, NI, D, sp_b, sp_n, sp_d, True, BLOCK_D), mask_d, D)
    gamma = tl.load(gamma_ptr + b * sg_b + offs_d * sg_d, mask=mask_d, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + b * sb_b + offs_d * sb_d, mask=mask_d, other=0.0).to(tl.float32)
    y = h * (1.0 + gamma) + beta
    y = tl.where(y >= 0.0, y, y * slope)
    tl.store(out_ptr + b * so_b + l * so_l + offs_d * so_d, y.to(out_ptr.dtype.element_ty), mask=mask_d)


# the partial-sum buffer is sized for the smallest row block: trials with small blocks must not leave rows behind
_ATTENTION = {  # 16-bit inputs, then float32 ones
    low: (configs, _config.launcher(_channel_attention_kernel, "attention", configs, ["D", "R", "FACTORED"],
                                    reset_to_zero=("part_ptr",)))
    for low, configs in ((True, _config.ATTENTION_CONFIGS), (False, _config.ATTENTION_FP32_CONFIGS))
}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`[B, D]` view of a `[B, D]` or `[B, 1, D]` tensor."""
    return t.reshape(t.shape[0], t.shape[-1]) if t.dim() == 3 else t


def _row_warps(block: int) -> int:
    return 1 if _config.interpreting() else max(1, min(8, block // 256))


def _attention_partials(q2: torch.Tensor, k2: torch.Tensor, v2_mean: torch.Tensor, e: torch.Tensor | None,
                        config: _config.Config | None) -> torch.Tensor:
    batch, r, d = q2.shape
    m = _rows(v2_mean)
    factored = e is not None
    if factored:
        e = _rows(e)
        if k2.shape != (r, 1):
            raise ValueError(f"a factored K2 takes the Linear(1 -> L) weight [{r}, 1], got {tuple(k2.shape)}")
        sk = (0, 0, k2.stride(0))
    else:
        if k2.shape != (batch, d, r):
            raise ValueError(f"K2 must be [B, D, L] = {(batch, d, r)}, got {tuple(k2.shape)}")
        sk = k2.stride()
    low_precision = q2.dtype in (torch.float16, torch.bfloat16)
    configs, launch = _ATTENTION[low_precision]
    if config is not None:
        block_i = config["BLOCK_I"]
    elif _config.interpreting():
        block_i = _config.INTERPRET_CONFIGS["attention"]["BLOCK_I"]
    else:
        block_i = min(c["BLOCK_I"] for c in configs)
    # Sized for the smallest row block; rows that a larger block leaves unwritten stay zero and add nothing.
    n_i = triton.cdiv(d, block_i)
    partials = torch.zeros(batch, n_i, d, dtype=torch.float32, device=q2.device)
    qbar = q2.float().mean(dim=-1)
    launch(
        lambda meta: (batch, triton.cdiv(d, meta["BLOCK_I"])),
        config,
        k2_ptr=k2, e_ptr=e if factored else k2, q2_ptr=q2, qbar_ptr=qbar, m_ptr=m, part_ptr=partials,
        D=d, R=r, sk_b=sk[0], sk_i=sk[1], sk_r=sk[2],
        se_b=e.stride(0) if factored else 0, se_i=e.stride(1) if factored else 0,
        sq_b=q2.stride(0), sq_r=q2.stride(1), sq_j=q2.stride(2), sqb_b=qbar.stride(0), sqb_r=qbar.stride(1),
        sm_b=m.stride(0), sm_d=m.stride(1), sp_b=partials.stride(0), sp_n=partials.stride(1), sp_d=partials.stride(2),
        scale=1.0 / math.sqrt(d), exp_safe=EXP_SAFE, FACTORED=factored,
        LOW_PRECISION_DOT=low_precision, BLOCK_R=max(16, triton.next_power_of_2(r)),
    )
    return partials


def channel_attention(
    q2: torch.Tensor,
    k2: torch.Tensor,
    v2_mean: torch.Tensor,
    *,
    e: torch.Tensor | None = None,
    layer_norm: bool = True,
    out: torch.Tensor | None = None,
    config: _config.Config | None = None,
) -> torch.Tensor:
    """`channel_attention_reference` without forming the attention matrix; `out` receives the result when given,
    `config` fixes the tile sizes instead of autotuning."""
    _config.check_device(q2, k2, v2_mean)
    batch, _, d = q2.shape
    partials = _attention_partials(q2, k2, v2_mean, e, config)
    if out is None:
        out = torch.empty(batch, 1, d, dtype=q2.dtype, device=q2.device)
    rows = _rows(out)
    block_d = triton.next_power_of_2(d)
    _attention_finish_kernel[(batch,)](
        partials, rows, partials.shape[1], d, *partials.stride(), *rows.stride(),
        LAYER_NORM=layer_norm, BLOCK_D=block_d, num_warps=_row_warps(block_d),
    )
    return out


def layer_selection(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`softmax_L(K q^T) * V`: `k, v [B, L, D]`, `q [B, D]` or `[B, 1, D]`, one program per `(sample, layer)`."""
    _config.check_device(k, q, v)
    batch, length, d = k.shape
    q = _rows(q)
    if out is None:
        out = torch.empty_like(v)
    block_d = triton.next_power_of_2(d)
    _layer_selection_kernel[(batch, length)](
        k, q, v, out, length, d, *k.stride(), *q.stride(), *v.stride(), *out.stride(),
        BLOCK_L=triton.next_power_of_2(length), BLOCK_D=block_d, num_warps=_row_warps(block_d * 4),
    )
    return out


def mapper_block(
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
    out: torch.Tensor | None = None,
    config: _config.Config | None = None,
) -> torch.Tensor:
    """Steps 2-5 of a mapper block in two kernels, with the arguments of `mapper_block_reference`."""
    _config.check_device(k, q, v, q2)
    batch, length, d = k.shape
    q, gamma, beta = _rows(q), _rows(gamma), _rows(beta)
    partials = _attention_partials(q2, k2, v2_mean, e, config)
    if out is None:
        out = torch.empty_like(v)
    block_d = triton.next_power_of_2(d)
    _block_output_kernel[(batch, length)](
        k, q, v, partials, gamma, beta, out, length, d, partials.shape[1],
        *k.stride(), *q.stride(), *v.stride(), *partials.stride(), *gamma.stride(), *beta.stride(), *out.stride(),
        INJECTION_SLOPE, BLOCK_L=triton.next_power_of_2(length), BLOCK_D=block_d, num_warps=_row_warps(block_d * 4),
    )
    return out
