"""The mapper's stable maths: each rewrite is an identity of the released maths (checked in float64), and float32
stays within the stated fraction of the output's largest value of a float64 evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ffclip.config import MapperConfig
from ffclip.factory import build_mapper
from ffclip.kernels import reference
from reference_models import mapper_blocks, ref_mapper

RELEASED = MapperConfig()  # the released layout: 18 layers of 512, four blocks
DRAWS = 8


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def released_inputs(equal_layers: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`DRAWS` latents (per-layer random, or one random vector repeated on every layer) and text embeddings."""
    w = randn(DRAWS, 1 if equal_layers else RELEASED.num_ws, RELEASED.dim, seed=seed, dtype=torch.float32)
    return w.expand(DRAWS, RELEASED.num_ws, RELEASED.dim).contiguous(), randn(DRAWS, RELEASED.dim, seed=seed + 1,
                                                                             dtype=torch.float32)


def worst_relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst over samples of max|y - ref| / max|ref|."""
    diff = (y.double() - ref).abs().flatten(1).amax(dim=1)
    return (diff / ref.abs().flatten(1).amax(dim=1)).max().item()


@pytest.fixture(scope="module")
def released_mapper():
    mapper = build_mapper(RELEASED, seed=0)
    return mapper, copy.deepcopy(mapper).double()


def test_expm1_and_log1p_keep_their_digits_near_zero():
    x = torch.cat([torch.logspace(-12, 1.5, 400, dtype=torch.float64), -torch.logspace(-12, 2.5, 400, dtype=torch.float64)])
    for dtype, bound in ((torch.float32, 5e-7), (torch.float64, 1e-14)):
        xd = x.to(dtype)
        exact = torch.expm1(xd.double())
        assert ((reference.expm1(xd).double() - exact).abs() / exact.abs()).max() <= bound
        y = xd[xd > -0.9]
        exact = torch.log1p(y.double())
        assert ((reference.log1p(y).double() - exact).abs() / exact.abs()).max() <= bound


@pytest.mark.parametrize("score_scale", [1e-3, 1.0, 300.0], ids=["near-uniform", "moderate", "overflowing"])
def test_centred_channel_attention_is_an_identity(score_scale):
    """LayerNorm(m (A - 1/D)) = LayerNorm(m A), and the centred product is the released one less sum(m) / D."""
    batch, length, dim = 3, 6, 64
    q2 = randn(batch, length, dim, seed=1) * score_scale + 2.0  # an offset over the softmax axis, as trained weights give
    k2, m = randn(batch, dim, length, seed=2), randn(batch, 1, dim, seed=3) + 0.5
    released = m @ torch.softmax(k2 @ q2 / math.sqrt(dim), dim=-1)
    centred = reference.channel_attention_reference(q2, k2, m, layer_norm=False)
    scale = released.abs().max()
    assert ((centred + m.sum(dim=-1, keepdim=True) / dim - released).abs().max() / scale).item() <= 1e-12
    ln_released, ln_centred = F.layer_norm(released, (dim,)), F.layer_norm(centred, (dim,))
    assert ((ln_centred - ln_released).abs().max() / ln_released.abs().max()).item() <= 1e-7


@pytest.fixture(scope="module")
def float64_outputs(released_mapper):
    """{equal_layers: (latents, embeddings, float64 output)} for eight latents of each kind."""
    _, mapper64 = released_mapper
    outputs = {}
    for equal_layers in (False, True):
        w, e = released_inputs(equal_layers, seed=20)
        with torch.no_grad():
            outputs[equal_layers] = w, e, mapper64(w.double(), e.double())
    return outputs


@pytest.fixture(params=[False, True], ids=["per-layer", "equal-layers"])
def evaluation(request, float64_outputs):
    """(equal_layers, latents, embeddings, float64 output)."""
    return request.param, *float64_outputs[request.param]


def test_float64_equals_the_released_maths(released_mapper, evaluation):
    _, mapper64 = released_mapper
    _, w, e, y64 = evaluation
    with torch.no_grad():
        assert worst_relative(y64, ref_mapper(mapper_blocks(mapper64), w.double(), e.double())) <= 1e-7


def test_float32_is_within_its_bound_of_float64(released_mapper, evaluation):
    """PyTorch's default initialisation (as the released training starts), eight latents: the worst element's error
    against float64 is a fraction of that output's largest value, 1e-2 with per-layer latents and 1e-2 with latents
    equal on every layer (the released maths: 3.0e-2 and 3.2e-2 on these inputs; the stable form 2.0e-3 and 8.6e-4 on
    an Intel Xeon, 5.2e-3 with per-layer latents on an AMD EPYC, whose float32 kernels sum in another order).
    The released maths is this ill-conditioned itself: see the next test."""
    mapper, _ = released_mapper
    equal_layers, w, e, y64 = evaluation
    with torch.no_grad():
        assert worst_relative(mapper(w, e), y64) <= 1e-2


def test_float32_error_is_the_conditioning_of_the_released_maths(released_mapper, float64_outputs):
    """Moving the inputs by one float32 rounding (relative 2^-24) moves the float64 output by up to 1e-3 of its
    largest value with per-layer latents: step 1 divides channels that are nearly zero on every layer by about
    sqrt(1e-8), and `1 + gamma` nearly vanishes on some channels, so absolute errors of 1e-7 grow ten-thousandfold
    within two blocks. No rewriting of the float32 computation can do much better than that floor; it stays within
    eight times it (measured: 2.5 times on an Intel Xeon, 6.7 times on an AMD EPYC)."""
    mapper, mapper64 = released_mapper
    w, e, y64 = float64_outputs[False]
    with torch.no_grad():
        floor = max(
            worst_relative(mapper64(w.double() * (1 + 2**-24 * randn(*w.shape, seed=40 + i)),
                                    e.double() * (1 + 2**-24 * randn(*e.shape, seed=50 + i))), y64)
            for i in range(2)
        )
        assert 1e-4 <= floor and worst_relative(mapper(w, e), y64) <= 8 * floor


@pytest.mark.parametrize("batch", [1, 3])
def test_latents_equal_on_every_layer_stay_equal(released_mapper, batch):
    mapper, _ = released_mapper
    w = randn(batch, 1, RELEASED.dim, seed=30, dtype=torch.float32).expand(batch, RELEASED.num_ws, RELEASED.dim)
    with torch.no_grad():
        delta = mapper.delta(w.contiguous(), randn(batch, RELEASED.dim, seed=31, dtype=torch.float32))
    assert torch.equal(delta, delta[:, :1].expand_as(delta))
