"""The fused mapper kernels (channel attention, layer selection, whole block) against float64 references, and the
mapper's "triton" implementation against its reference. Without CUDA the kernels run in Triton's interpreter."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from ffclip.config import MapperConfig
from ffclip.factory import build_mapper
from ffclip.kernels import (
    channel_attention,
    channel_attention_reference,
    layer_selection,
    layer_selection_reference,
    mapper_block,
    mapper_block_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
SMALL_TILES = {"BLOCK_I": 16, "BLOCK_J": 16}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,length,dim", [(2, 5, 40), (1, 18, 32), (3, 3, 17)])
@pytest.mark.parametrize("factored", [False, True], ids=["k2", "k2-weight"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "raw"])
def test_channel_attention_matches_float64(dtype, batch, length, dim, factored, layer_norm):
    q2, m, e = randn(batch, length, dim, seed=1), randn(batch, dim, seed=2), randn(batch, dim, seed=3)
    k2 = randn(length, 1, seed=4) if factored else randn(batch, dim, length, seed=4) * 0.5
    extra = {"e": e} if factored else {}
    ref = channel_attention_reference(q2.double(), k2.double(), m.double(), layer_norm=layer_norm,
                                      **{k: v.double() for k, v in extra.items()})
    out = nan_like((batch, 1, dim), dtype)
    y = channel_attention(q2.to(DEVICE, dtype), k2.to(DEVICE, dtype), m.to(DEVICE, dtype), out=out,
                          layer_norm=layer_norm, config=SMALL_TILES, **{k: v.to(DEVICE, dtype) for k, v in extra.items()})
    assert y is out and torch.isfinite(y).all()
    assert relative_error(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,length,dim", [(2, 5, 40), (1, 18, 64)])
def test_layer_selection_matches_float64(dtype, batch, length, dim):
    k, q, v = randn(batch, length, dim, seed=5), randn(batch, 1, dim, seed=6) * 0.3, randn(batch, length, dim, seed=7)
    ref = layer_selection_reference(k.double(), q.double(), v.double())
    out = nan_like((batch, length, dim), dtype)
    y = layer_selection(k.to(DEVICE, dtype), q.to(DEVICE, dtype), v.to(DEVICE, dtype), out=out)
    assert y is out and torch.isfinite(y).all()
    assert relative_error(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("batch,length,dim", [(2, 5, 40), (1, 7, 24)])
def test_mapper_block_matches_float64(batch, length, dim):
    shapes = {"k": (batch, length, dim), "q": (batch, 1, dim), "v": (batch, length, dim), "q2": (batch, length, dim),
              "k2": (length, 1), "v2_mean": (batch, 1, dim), "gamma": (batch, 1, dim), "beta": (batch, 1, dim),
              "e": (batch, 1, dim)}
    args = {name: randn(*shape, seed=8 + i) * (0.3 if name in ("gamma", "beta") else 1.0)
            for i, (name, shape) in enumerate(shapes.items())}
    ref = mapper_block_reference(**{name: t.double() for name, t in args.items()})
    out = nan_like((batch, length, dim), torch.float32)
    y = mapper_block(**{name: t.to(DEVICE) for name, t in args.items()}, out=out, config=SMALL_TILES)
    assert y is out and torch.isfinite(y).all()
    assert relative_error(y, ref) <= 1e-4


def test_tiny_mapper_triton_form_matches_default():
    mapper = build_mapper(MapperConfig(num_ws=6, dim=48, num_blocks=2), seed=4).to(DEVICE)
    w, text = randn(2, 6, 48, seed=10).to(DEVICE), randn(2, 48, seed=11).to(DEVICE)
    with torch.no_grad():
        a = mapper(w, text)
        mapper.impl = "triton"
        b = mapper(w, text)
    assert relative_error(b, a.double().cpu()) <= 1e-4
