"""The three stage modules: the export-friendly modulated convolution against the grouped form, the `impl` switch,
the mapper against the released maths at any layer count, the text encoder's prompt checks, and exact bundle round
trips."""

import warnings

import pytest
import torch

from export_fixtures import TINY

from ffclip.checkpoints.bundle import load_module, save_module
from ffclip.config import GeneratorConfig, MapperConfig, get_preset
from ffclip.errors import CheckpointError, InputError
from ffclip.factory import build_generator, build_mapper, build_text_encoder
from ffclip.kernels import reference
from ffclip.models import ops
from reference_models import mapper_blocks, ref_mapper

TINY_TEXT = TINY.text


def odd_generator(resolution: int = 32):
    widths = {"4": 24, "8": 20, "16": 12, "32": 10, "64": 6}
    channels = {k: v for k, v in widths.items() if int(k) <= resolution}
    return build_generator(GeneratorConfig(resolution=resolution, style_dim=32, n_mlp=3, channels=channels), seed=3)


@pytest.mark.parametrize("up", [False, True])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_forms_agree(up, demodulate):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 9, 9)
    weight = torch.randn(5, 7, 3, 3)
    styles = torch.randn(3, 7)
    a = reference.modulated_conv2d_scaled(x, weight, styles, demodulate=demodulate, up=up)
    b = reference.modulated_conv2d_grouped(x, weight, styles, demodulate=demodulate, up=up)
    assert a.shape == b.shape == (3, 5, 19 if up else 9, 19 if up else 9)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_implementation_is_refused():
    g = odd_generator()
    g.impl = "cuda"
    with pytest.raises(ValueError, match="unknown implementation 'cuda'; use one of reference, triton"):
        g.synthesis(g.mapping(torch.randn(1, 32)))


def test_truncation_pulls_towards_w_avg():
    g = odd_generator()
    z = torch.randn(4, 32)
    w1 = g.mapping(z, truncation=1.0)
    w0 = g.mapping(z, truncation=0.0)
    torch.testing.assert_close(w0, g.w_avg.expand_as(w0))
    half = g.mapping(z, truncation=0.5)
    torch.testing.assert_close(half, (w0 + w1) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_ws", [6, 18])
def test_mapper_takes_layer_count_from_config(num_ws):
    m = build_mapper(MapperConfig(num_ws=num_ws), seed=0).double()
    g = torch.Generator().manual_seed(num_ws)
    w = torch.randn(3, num_ws, 512, generator=g, dtype=torch.float64)
    e = torch.randn(3, 512, generator=g, dtype=torch.float64)
    out = m(w, e)
    assert out.shape == (3, num_ws, 512)
    assert (out - ref_mapper(mapper_blocks(m), w, e)).abs().max() <= 1e-9


def test_text_encoder_prompt_checks():
    te = build_text_encoder(TINY_TEXT)
    assert te.encode(["a smiling face", "blond hair"]).shape == (2, 512)
    with pytest.raises(InputError, match="no prompt"):
        te.tokenize([])
    with pytest.raises(InputError, match="prompt 1 is empty"):
        te.tokenize(["fine", "   "])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = te.tokenize(["word " * 100])
    assert tokens.shape == (1, 77)
    assert any("truncated" in str(w.message) for w in caught)


def test_text_encoder_drops_vision():
    te = build_text_encoder(TINY_TEXT, vision=True)
    assert te.has_vision
    before = te.encode(["hat"])
    te.drop_vision()
    assert not te.has_vision and not any(k.startswith("clip.visual") for k in te.state_dict())
    torch.testing.assert_close(te.encode(["hat"]), before, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["generator", "mapper", "text"])
def test_bundle_round_trip_is_exact(tmp_path, which):
    module = {
        "generator": lambda: odd_generator(),
        "mapper": lambda: build_mapper(MapperConfig(num_ws=8), seed=5),
        "text": lambda: build_text_encoder(TINY_TEXT, seed=5),
    }[which]()
    path = save_module(tmp_path / "m.safetensors", module)
    loaded = load_module(path)
    a, b = module.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.config == module.config
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_bundle_of_wrong_kind_is_refused(tmp_path):
    path = save_module(tmp_path / "m.safetensors", build_mapper(MapperConfig(num_ws=4)))
    with pytest.raises(CheckpointError, match="m.safetensors.*mapper.*generator"):
        load_module(path, expect_kind="generator")


def test_presets_are_consistent():
    for name in ("random", "ffhq-1024"):
        preset = get_preset(name)
        assert preset.mapper.num_ws == preset.generator.num_ws
        assert preset.text.embed_dim == preset.mapper.dim
    assert get_preset("ffhq-1024").generator.num_ws == 18
    with pytest.raises(ValueError, match="known presets"):
        get_preset("nope")


def test_every_style_layer_reaches_the_image():
    g = odd_generator(32)
    w = g.mapping(torch.randn(1, 32), truncation=0.7).clone()
    with torch.no_grad():
        base = g.synthesis(w)
        for j in range(g.num_ws):
            moved = w.clone()
            moved[:, j] += 1.0
            assert not torch.allclose(g.synthesis(moved), base), f"style layer {j} is never read"


def test_mapper_in_float16_stays_finite():
    mapper = build_mapper(MapperConfig(num_ws=14), seed=3).half()
    g = torch.Generator().manual_seed(0)
    w, e = torch.randn(8, 14, 512, generator=g).half(), torch.randn(8, 512, generator=g).half()
    with torch.no_grad():
        assert torch.isfinite(mapper(w, e)).all()


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from ffclip.atomic import atomic_dir, atomic_file

    mask = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "d") as folder:
            (folder / "a").write_text("a")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_damaged_bundles_get_a_checkpoint_error(tmp_path):
    from ffclip.checkpoints.bundle import save_bundle

    mapper = build_mapper(MapperConfig(num_ws=4))
    state = mapper.state_dict()
    bad_config = save_bundle(tmp_path / "config.safetensors", "mapper", {"num_ws": 4, "bogus": 1}, state)
    with pytest.raises(CheckpointError, match="config.safetensors.*unusable config"):
        load_module(bad_config)
    state["blocks.0.q_matrix.weight"] = torch.zeros(3, 3)
    bad_shape = save_bundle(tmp_path / "shape.safetensors", "mapper", {"num_ws": 4}, state)
    with pytest.raises(CheckpointError, match="shape.safetensors.*mismatched shapes"):
        load_module(bad_shape)
