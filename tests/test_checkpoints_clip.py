"""Text encoder checkpoints: open_clip state dicts (.bin, .safetensors) and OpenAI-style TorchScript archives."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ffclip.checkpoints import load_text_encoder, save_module
from ffclip.config import get_preset
from ffclip.models.text_encoder import build_clip

TOKENS = torch.randint(0, 49408, (3, 77), generator=torch.Generator().manual_seed(0))


def _tiny_openai_style_clip() -> torch.nn.Module:
    torch.manual_seed(7)
    return open_clip.model.CLIP(
        embed_dim=48,
        vision_cfg=open_clip.model.CLIPVisionCfg(image_size=32, layers=1, width=64, patch_size=16),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
        quick_gelu=True,
    ).eval()


@pytest.fixture(scope="module")
def open_clip_model():
    config = get_preset("random").text
    with torch.random.fork_rng():
        torch.manual_seed(11)
        return config, build_clip(config).eval()


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_open_clip_state_dict(tmp_path, open_clip_model, suffix):
    config, model = open_clip_model
    path = tmp_path / f"open_clip_pytorch_model{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".bin":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file(state, str(path))
    encoder = load_text_encoder(path, model=config)
    assert not encoder.has_vision and not encoder.training
    with torch.no_grad():
        assert (encoder(TOKENS) - model.encode_text(TOKENS)).abs().max() <= 1e-5
        kept = load_text_encoder(path, config, vision=True)
        images = torch.randn(2, 3, 32, 32)
        assert kept.has_vision
        assert (kept.clip.encode_image(images) - model.encode_image(images)).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def torchscript_archive(tmp_path_factory):
    model = _tiny_openai_style_clip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"encode_text": TOKENS})
    path = tmp_path_factory.mktemp("openai") / "ViT-B-32.pt"
    traced.save(str(path))
    return path, model


def test_openai_torchscript_archive(torchscript_archive):
    path, model = torchscript_archive
    encoder = load_text_encoder(path)
    config = encoder.config
    assert config.quick_gelu and config.embed_dim == 48
    assert config.text_cfg == {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}
    assert not encoder.has_vision
    with torch.no_grad():
        assert (encoder(TOKENS) - model.encode_text(TOKENS)).abs().max() <= 1e-5
        kept = load_text_encoder(path, vision=True)
        images = torch.randn(2, 3, 32, 32)
        assert (kept.clip.encode_image(images) - model.encode_image(images)).abs().max() <= 1e-5


def test_text_encoder_bundle_and_preset_default(tmp_path, torchscript_archive):
    path, model = torchscript_archive
    bundle = tmp_path / "text.safetensors"
    save_module(bundle, load_text_encoder(path, vision=True))
    encoder = load_text_encoder(bundle)
    assert not encoder.has_vision
    with torch.no_grad():
        assert (encoder(TOKENS) - model.encode_text(TOKENS)).abs().max() <= 1e-5

    # the seeded default: text only, the preset's embedding width, distinct prompts apart, the same on every load
    default = load_text_encoder(preset="random")
    assert not default.has_vision
    with torch.no_grad():
        embeddings = default.encode(["a smiling face", "blond hair"])
        assert embeddings.shape == (2, get_preset("random").text.embed_dim)
        assert not torch.allclose(embeddings[0], embeddings[1])
        assert torch.equal(embeddings, load_text_encoder(preset="random").encode(["a smiling face", "blond hair"]))
