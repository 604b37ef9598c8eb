"""The fused modulated-convolution kernel against a float64 reference, and the generator's "triton" implementation
against its reference. Without CUDA the kernels run in Triton's interpreter at small sizes."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from ffclip.config import GeneratorConfig
from ffclip.factory import build_generator
from ffclip.kernels import modulated_conv2d, modulated_conv2d_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# TF32 operands keep 10 mantissa bits, as fp16 ones do (products accumulate in fp32)
TF32_TOLERANCE = 2e-3
# Tiles smaller than every test shape, so each shape spans several tiles with ragged edges.
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def layer_inputs(batch, c_in, c_out, size, ksize, up, seed=0):
    g = torch.Generator().manual_seed(seed)
    out_size = 2 * size if up else size
    return {
        "x": torch.randn(batch, c_in, size, size, generator=g),
        "weight": torch.randn(c_out, c_in, ksize, ksize, generator=g),
        "styles": torch.randn(batch, c_in, generator=g) + 1.0,
        "noise": torch.randn(1, 1, out_size, out_size, generator=g),
        "bias": torch.randn(c_out, generator=g),
        "residual": torch.randn(batch, c_out, out_size, out_size, generator=g),
    }


def check_layer(dtype, batch, c_in, c_out, size, ksize, up, *, channels_last=False, seed=0, tf32=False):
    t = layer_inputs(batch, c_in, c_out, size, ksize, up, seed)
    rgb = ksize == 1
    options = {"demodulate": not rgb, "up": up, "bias": t["bias"]}
    if rgb:
        options["residual"] = t["residual"]
    else:
        options.update(noise=t["noise"], noise_strength=torch.tensor(0.7), activation="lrelu")
    ref = modulated_conv2d_reference(
        t["x"].double(), t["weight"].double(), t["styles"].double(),
        **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()},
    )
    x = t["x"].to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=DEVICE)
    dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    if rgb:
        dev["residual"] = dev["residual"].to(dtype)
    y = modulated_conv2d(x, t["weight"].to(DEVICE), t["styles"].to(DEVICE), out=out, config=SMALL_TILES, tf32=tf32, **dev)
    assert y is out and y.dtype == dtype
    assert torch.isfinite(y).all(), "some output elements were not written"
    assert relative_error(y.cpu(), ref) <= (TF32_TOLERANCE if tf32 else TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch,c_in,c_out,size,ksize",
    [(2, 20, 18, 5, 3), (1, 16, 32, 4, 3), (2, 17, 3, 6, 1)],
    ids=["conv3-ragged", "conv3-even", "torgb"],
)
def test_fused_layer_matches_float64(dtype, batch, c_in, c_out, size, ksize):
    check_layer(dtype, batch, c_in, c_out, size, ksize, up=False)


@pytest.mark.parametrize("ksize", [3, 1])
def test_fp32_convolves_in_cudnn_and_runs_only_the_epilogue(ksize, monkeypatch):
    from ffclip.kernels import modulated_conv

    def refuse(*args, **kwargs):
        raise AssertionError("fp32 must convolve in cuDNN and run only the kernel's epilogue")

    monkeypatch.setattr(modulated_conv, "_launch_conv", refuse)
    check_layer(torch.float32, 2, 20, 18 if ksize == 3 else 3, 5, ksize, up=False, seed=3, tf32=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_upsampling_layer_epilogue_matches_float64(dtype):
    check_layer(dtype, 2, 9, 18, 4, 3, up=True, seed=1)


def test_channels_last_input_gives_channels_last_output():
    check_layer(torch.float32, 1, 18, 20, 5, 3, up=False, channels_last=True, seed=2)
    x = torch.randn(1, 4, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)
    y = modulated_conv2d(x, torch.randn(4, 4, 3, 3, device=DEVICE), torch.randn(1, 4, device=DEVICE))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter does not multiply bf16 blocks; checked on CUDA")
def test_bf16_conv_matches_float64():
    check_layer(torch.bfloat16, 2, 20, 18, 5, 3, up=False)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes do not fit"):
        modulated_conv2d(torch.randn(1, 4, 3, 3, device=DEVICE), torch.randn(4, 5, 3, 3, device=DEVICE),
                         torch.randn(1, 4, device=DEVICE))


def test_tiny_generator_triton_form_matches_default():
    config = GeneratorConfig(resolution=16, style_dim=32, n_mlp=2, channels={"4": 20, "8": 12, "16": 8})
    g = build_generator(config, seed=5).to(DEVICE)
    for module in g.modules():
        if hasattr(module, "noise_strength"):
            module.noise_strength.data.fill_(0.3)
    w = g.mapping(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE), truncation=0.8)
    with torch.no_grad():
        a = g.synthesis(w)
        g.impl = "triton"
        b = g.synthesis(w)
    assert b.shape == (2, 3, 16, 16)
    assert relative_error(b, a.double()) <= 1e-4
