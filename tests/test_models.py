"""The three stage modules: the export-friendly generator form against the grouped form, the mapper's shapes,
the text encoder's prompt checks, and exact bundle round trips."""

import warnings

import pytest
import torch

from export_fixtures import TINY

from ffclip.checkpoints.bundle import load_module, save_module
from ffclip.config import GeneratorConfig, MapperConfig, get_preset
from ffclip.errors import CheckpointError, InputError
from ffclip.factory import build_generator, build_mapper, build_text_encoder
from ffclip.models import ops

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
    a = ops.modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, form="scaled")
    b = ops.modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, form="grouped")
    assert a.shape == b.shape == (3, 5, 19 if up else 9, 19 if up else 9)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("resolution", [32, 64])
def test_generator_scaled_form_matches_grouped_form(resolution):
    g = odd_generator(resolution)
    # make the constant noise matter, as trained weights do
    for module in g.modules():
        if hasattr(module, "noise_strength"):
            module.noise_strength.fill_(0.3)
    w = g.mapping(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), truncation=0.8)
    assert w.shape == (2, g.num_ws, 32) and g.num_ws == 2 * (resolution.bit_length() - 1) - 2
    with torch.no_grad():
        g.conv_form = "scaled"
        a = g.synthesis(w)
        g.conv_form = "grouped"
        b = g.synthesis(w)
    assert a.shape == (2, 3, resolution, resolution)
    assert (a - b).abs().max().item() <= 1e-5


def test_truncation_pulls_towards_w_avg():
    g = odd_generator()
    z = torch.randn(4, 32)
    w1 = g.mapping(z, truncation=1.0)
    w0 = g.mapping(z, truncation=0.0)
    torch.testing.assert_close(w0, g.w_avg.expand_as(w0))
    half = g.mapping(z, truncation=0.5)
    torch.testing.assert_close(half, (w0 + w1) / 2, rtol=1e-5, atol=1e-6)


def test_mapper_takes_layer_count_from_config():
    for num_ws in (6, 18):
        m = build_mapper(MapperConfig(num_ws=num_ws), seed=0)
        w, e = torch.randn(3, num_ws, 512), torch.randn(3, 512)
        out = m(w, e)
        assert out.shape == (3, num_ws, 512)
        torch.testing.assert_close(out - w, m.delta(w, e))


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
