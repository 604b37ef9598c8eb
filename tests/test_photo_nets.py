"""The photo networks (e4e encoder, ArcFace identity net, face parser) against independent plain-tensor references,
loaded from seeded stand-ins saved in the released layouts, and the one-line refusals of bad files."""

from __future__ import annotations

import argparse

import pytest
import torch

from ffclip.checkpoints import load_encoder, load_face_parser, load_generator, load_identity_net
from ffclip.checkpoints.photo import encoder_from_checkpoint, generator_from_e4e, identity_from_state
from ffclip.errors import CheckpointError
from ffclip.models import Encoder4Editing, FaceParser, IdentityNet
from ffclip.models.encoder import EncoderConfig
from ffclip.models.identity import IdentityConfig
from reference_models import SMALL_CHANNELS, RefGenerator, rosinality_checkpoint
from reference_photo_models import (
    arcface_weights,
    e4e_weights,
    parser_weights,
    ref_arcface,
    ref_e4e,
    ref_parser,
)

N_STYLES = 8  # the fewest style heads that reach the fine features (heads 7 and on)
PHOTO_SIZE = 32  # the heads reduce any power-of-two photo to one pixel; 32 px keeps the float64 runs short


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).abs().max() / ref.abs().max())


def strict_float64(module: type[torch.nn.Module], config: object, state: dict) -> torch.nn.Module:
    """`module(config)` holding the float64 `state` itself, loaded strictly (so every released name must match)."""
    with torch.device("meta"):
        net = module(config)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def photos(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


@pytest.fixture(scope="module")
def e4e64():
    state = e4e_weights(N_STYLES, seed=1, dtype=torch.float64)
    latent_avg = torch.randn(512, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return state, latent_avg


def e4e_checkpoint(state: dict, latent_avg: torch.Tensor, n_styles: int, decoder: dict | None = None) -> dict:
    """A pSp/e4e checkpoint with heads [0, n_styles) of `state`, float32, `latent_avg` repeated per style as e4e
    stores it, e4e's options as a dict and optionally a rosinality decoder."""
    tensors = {k: v.float() for k, v in state.items() if not k.startswith("encoder.styles.")
               or int(k.split(".")[2]) < n_styles}
    tensors.update({f"decoder.{k}": v for k, v in (decoder or {}).items()})
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": 2 ** ((n_styles + 2) // 2), "start_from_latent_avg": True}
    return {"state_dict": tensors, "latent_avg": latent_avg.float().repeat(n_styles, 1), "opts": opts}


def test_encoder_matches_reference(e4e64):
    state, latent_avg = e4e64
    x = photos(2, PHOTO_SIZE)
    ref = ref_e4e(state, latent_avg, x, N_STYLES)
    ours = {k.removeprefix("encoder."): v for k, v in state.items()}
    encoder = strict_float64(Encoder4Editing, EncoderConfig(N_STYLES), {**ours, "latent_avg": latent_avg.expand(N_STYLES, 512)})
    assert ref.shape == (2, N_STYLES, 512) and relative(encoder(x), ref) <= 1e-7
    assert relative(encoder.float()(x.float()), ref) <= 1e-4


def test_e4e_file_gives_encoder_and_generator(tmp_path, e4e64):
    state, latent_avg = e4e64
    torch.manual_seed(4)
    ref_g = RefGenerator(SMALL_CHANNELS, style_dim=512).eval()
    path = tmp_path / "e4e_ffhq_encode.pt"
    ckpt = e4e_checkpoint(state, latent_avg, 1, ref_g.state_dict())
    ckpt["opts"] = argparse.Namespace(**ckpt["opts"])  # pSp's own checkpoints pickle the options object: read inert
    torch.save(ckpt, path)
    encoder = load_encoder(path)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert relative(encoder(photos(1, PHOTO_SIZE).float()), ref_e4e(state, latent_avg, photos(1, PHOTO_SIZE), 1)) <= 1e-4

    generator = load_generator(path)  # the decoder, with a row of e4e's repeated latent_avg as its w_avg
    rosinality = tmp_path / "g.pt"
    torch.save(rosinality_checkpoint(ref_g, latent_avg.float()), rosinality)
    expected = load_generator(rosinality).state_dict()
    assert expected.keys() == generator.state_dict().keys()
    assert all(torch.equal(value, expected[key]) for key, value in generator.state_dict().items())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("latent_avg"), "without the average latent"),
        (lambda c: c.update(latent_avg=torch.zeros(3, 7)), r"latent_avg has shape \[3, 7\]"),
        (lambda c: c["opts"].update(stylegan_size=1024), "with 1 style heads whose opts give stylegan_size 1024"),
        (lambda c: c["opts"].update(encoder_type="GradualStyleEncoder"), "opts name the encoder 'GradualStyleEncoder'"),
        (lambda c: c["state_dict"].pop("encoder.latlayer2.bias"), r"missing \['latlayer2.bias'\]"),
        (lambda c: c["state_dict"].update({"encoder.body.3.res_layer.1.weight": torch.zeros(128, 64, 1, 1)}),
         r"mismatched shapes: body.3.res_layer.1.weight is \[128, 64, 1, 1\]"),
    ],
)
def test_e4e_refusals(e4e64, change, message):
    ckpt = e4e_checkpoint(*e4e64, 1)
    change(ckpt)
    with pytest.raises(CheckpointError, match=message) as info:
        encoder_from_checkpoint(ckpt, "e4e.pt")
    assert str(info.value).startswith("e4e.pt: found a") and "\n" not in str(info.value)
    assert str(info.value).endswith("'latent_avg', 'opts')")


def test_e4e_without_decoder_has_no_generator(e4e64):
    with pytest.raises(CheckpointError, match="without its decoder"):
        generator_from_e4e(e4e_checkpoint(*e4e64, 1), "e4e.pt", "the formats")


@pytest.fixture(scope="module")
def arcface64():
    return arcface_weights(seed=3, dtype=torch.float64)


def test_identity_net_matches_reference(tmp_path, arcface64):
    faces = photos(2, 112, seed=1)
    ref = ref_arcface(arcface64, faces)
    assert relative(strict_float64(IdentityNet, IdentityConfig(), arcface64)(faces), ref) <= 1e-7
    path = tmp_path / "model_ir_se50.pth"
    torch.save({k: v.float() for k, v in arcface64.items()}, path)
    net = load_identity_net(path)
    out = net(faces.float())
    assert out.shape == (2, 512) and relative(out, ref) <= 1e-4
    assert torch.allclose(out.norm(dim=1), torch.ones(2))


def test_identity_net_refusals(tmp_path, arcface64):
    with pytest.raises(CheckpointError, match="23 residual units"):
        identity_from_state({k: v for k, v in arcface64.items() if not k.startswith("body.23.")}, "ir.pth")
    path = tmp_path / "ir.pth"
    torch.save({"state_dict": {"output_layer.3.bias": torch.zeros(512)}}, path)
    with pytest.raises(CheckpointError, match=r"ArcFace IR-SE state dict model_ir_se50.pth") as info:
        load_identity_net(path)
    assert "keys ['state_dict']" in str(info.value)


@pytest.fixture(scope="module")
def parser64():
    return parser_weights(seed=5, dtype=torch.float64)


def test_face_parser_matches_reference(tmp_path, parser64):
    images = photos(2, 48, seed=2)[:, :, :, :32]
    ref = ref_parser(parser64, images)
    path = tmp_path / "parsenet.pth"
    torch.save(parser64, path)
    parser = load_face_parser(path)
    assert parser.config.width == 16 and parser.config.n_classes == 19
    assert relative(parser(images.float()), ref) <= 1e-4
    assert relative(strict_float64(FaceParser, parser.config, parser64)(images), ref) <= 1e-7
    with pytest.raises(ValueError, match="multiples of 16"):
        parser(images[:, :, :40])


def test_legacy_file_without_batch_counters(tmp_path, parser64):
    path = tmp_path / "old.pth"
    state = {k: v.float() for k, v in parser64.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    images = photos(1, 32, seed=3)
    assert relative(load_face_parser(path)(images.float()), ref_parser(parser64, images)) <= 1e-4


def test_bad_files_give_one_line(tmp_path, parser64, arcface64):
    parser_file = tmp_path / "parsenet.pth"
    torch.save({k: v.float() for k, v in parser64.items()}, parser_file)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(parser_file.read_bytes()[: parser_file.stat().st_size // 2])
    wrong_shape = tmp_path / "shape.pth"
    torch.save({**parser64, "final.weight": torch.zeros(19, 8, 1, 1)}, wrong_shape)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    cases = [
        (load_face_parser, truncated, "damaged or truncated"),
        (load_face_parser, wrong_shape, "mismatched shapes: final.weight is [19, 8, 1, 1]"),
        (load_face_parser, text, "a text file"),
        (load_encoder, parser_file, "an encoder is read from an e4e checkpoint"),
        (load_identity_net, parser_file, "an identity net is read from"),
        (load_face_parser, tmp_path / "missing.pth", "no such file"),
    ]
    for load, path, message in cases:
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
