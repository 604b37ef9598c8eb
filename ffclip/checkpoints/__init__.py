"""Load each stage from the checkpoint files people hold (DESIGN §3), or from the preset's seeded default.

Every loader sniffs the file, reads it without executing anything from it, infers the configuration from the
tensors, loads strictly and returns the module in eval mode with gradients off. A file that cannot be used raises
`CheckpointError` naming the file, what was found in it and the formats that stage accepts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import DEFAULT_PRESET, Preset, TextConfig, get_preset
from ..factory import build_generator, build_mapper, build_text_encoder, stage_seed
from ..errors import CheckpointError, summarize
from ..models import Encoder4Editing, FaceParser, Generator, IdentityNet, Mapper, TextEncoder
from . import clip, nvidia, photo, release, rosinality
from .bundle import load_module, module_from_bundle, save_module
from .bundle_format import load_bundle
from .detect import FileKind, checkpoint_error, describe, read_torch_file, sniff

__all__ = [
    "extract_generator", "load_encoder", "load_face_parser", "load_generator", "load_identity_net", "load_mapper",
    "load_module", "load_text_encoder", "save_module",
]

GENERATOR_FORMATS = (
    "a generator is read from an ffclip generator bundle (.safetensors), a rosinality .pt ('g_ema' + 'latent_avg'), "
    "an NVIDIA .pkl ('G_ema'), an FFCLIP release checkpoint or an e4e checkpoint (its decoder)"
)
RELEASE_FORMATS = "the generator is extracted from an FFCLIP release checkpoint ('state_dict' + 'opts')"
MAPPER_FORMATS = "a mapper is read from an ffclip mapper bundle (.safetensors) or an FFCLIP release checkpoint"
TEXT_FORMATS = (
    "a text encoder is read from an ffclip text_encoder bundle (.safetensors), an open_clip checkpoint "
    "(.bin/.pt/.safetensors) or OpenAI's TorchScript CLIP archive (ViT-B-32.pt)"
)


def _bundle(path: str | os.PathLike, kind: str, accepted: str) -> torch.nn.Module:
    found = load_bundle(path)
    if found.kind != kind:
        raise checkpoint_error(path, f"an ffclip {found.kind} bundle", accepted)
    return module_from_bundle(found)


def _embedded(preset: Preset, kind: str) -> Path:
    """The trained bundle that ships with `preset`; a missing one says how to make it."""
    path = preset.weights_file(kind)
    if not path.is_file():
        raise CheckpointError(f"{path}: the '{preset.name}' preset's trained {kind} weights are missing; run "
                              "`make world` to train them, or pass the weights' path")
    return path


def _wrong_kind(path: str | os.PathLike, kind: FileKind, obj: object, accepted: str) -> CheckpointError:
    return checkpoint_error(path, f"{kind.description} {describe(obj)}", accepted)


def load_generator(
    path: str | os.PathLike | None = None, *, preset: str = DEFAULT_PRESET, device: str = "cpu"
) -> Generator:
    """The generator in `path` (bundle, rosinality, NVIDIA, FFCLIP release or e4e file), or the preset's default."""
    if path is None:
        p = get_preset(preset)
        if p.weights:
            return _bundle(_embedded(p, "generator"), "generator", GENERATOR_FORMATS).to(device)
        return build_generator(p.generator, stage_seed(p, "generator")).to(device)
    kind = sniff(path, GENERATOR_FORMATS)
    if kind.kind == "bundle":
        return _bundle(path, "generator", GENERATOR_FORMATS).to(device)
    if kind.kind == "pickle":
        obj = nvidia.read_pickle(path, GENERATOR_FORMATS)
        if nvidia.is_nvidia(obj):
            return nvidia.generator_from_pickle(obj, path, GENERATOR_FORMATS).to(device)
    elif kind.kind in ("torch-zip", "torch-legacy"):
        obj = read_torch_file(path, kind, GENERATOR_FORMATS)
        if rosinality.is_rosinality(obj):
            return rosinality.generator_from_checkpoint(obj, path, GENERATOR_FORMATS).to(device)
        if release.is_release(obj):
            return release.generator_from_release(obj, path, GENERATOR_FORMATS).to(device)
        if photo.is_e4e(obj):
            return photo.generator_from_e4e(obj, path, GENERATOR_FORMATS).to(device)
    else:
        raise checkpoint_error(path, kind.description, GENERATOR_FORMATS)
    raise _wrong_kind(path, kind, obj, GENERATOR_FORMATS)


def extract_generator(path: str | os.PathLike) -> Generator:
    """The rosinality generator bundled in an FFCLIP release checkpoint (w_avg estimated, with a warning, if absent)."""
    kind = sniff(path, RELEASE_FORMATS)
    if kind.kind not in ("torch-zip", "torch-legacy"):
        raise checkpoint_error(path, kind.description, RELEASE_FORMATS)
    obj = read_torch_file(path, kind, RELEASE_FORMATS)
    if not release.is_release(obj):
        raise _wrong_kind(path, kind, obj, RELEASE_FORMATS)
    return release.generator_from_release(obj, path, RELEASE_FORMATS)


def load_mapper(path: str | os.PathLike | None = None, *, preset: str = DEFAULT_PRESET, device: str = "cpu") -> Mapper:
    """The mapper in `path` (bundle or FFCLIP release checkpoint), or the preset's default."""
    if path is None:
        p = get_preset(preset)
        if p.weights:
            return _bundle(_embedded(p, "mapper"), "mapper", MAPPER_FORMATS).to(device)
        return build_mapper(p.mapper, stage_seed(p, "mapper")).to(device)
    kind = sniff(path, MAPPER_FORMATS)
    if kind.kind == "bundle":
        return _bundle(path, "mapper", MAPPER_FORMATS).to(device)
    if kind.kind not in ("torch-zip", "torch-legacy"):
        raise checkpoint_error(path, kind.description, MAPPER_FORMATS)
    obj = read_torch_file(path, kind, MAPPER_FORMATS)
    if not release.is_release(obj):
        raise _wrong_kind(path, kind, obj, MAPPER_FORMATS)
    return release.mapper_from_release(obj, path, MAPPER_FORMATS).to(device)


def load_text_encoder(
    path: str | os.PathLike | None = None,
    model: str | TextConfig | None = None,
    *,
    preset: str = DEFAULT_PRESET,
    vision: bool = False,
    device: str = "cpu",
) -> TextEncoder:
    """The CLIP text encoder in `path`, or the preset's default. `model` is the architecture of an open_clip
    checkpoint: an open_clip model name (default ViT-B-32) or a `TextConfig`; OpenAI archives and bundles carry their
    own. `vision` keeps the image tower."""
    if path is None:
        p = get_preset(preset)
        if not p.weights:
            return build_text_encoder(p.text, stage_seed(p, "text_encoder"), vision=vision).to(device)
        path = _embedded(p, "text_encoder")
    kind = sniff(path, TEXT_FORMATS)
    if kind.kind == "bundle":
        encoder = _bundle(path, "text_encoder", TEXT_FORMATS)
        if vision and not encoder.has_vision:
            raise checkpoint_error(path, "a text_encoder bundle without the image tower", TEXT_FORMATS)
        if not vision:
            encoder.drop_vision()
        return encoder.to(device)
    if kind.kind == "torchscript":
        state = clip.read_torchscript_state(path, TEXT_FORMATS)
        found = "an OpenAI CLIP TorchScript archive"
        try:
            config = clip.openai_config(state, vision)
        except (KeyError, ValueError, IndexError) as exc:
            found = f"a TorchScript archive that is not an OpenAI CLIP ({summarize(exc)})"
            raise checkpoint_error(path, found, TEXT_FORMATS) from None
    elif kind.kind in ("torch-zip", "torch-legacy", "safetensors"):
        state = clip.read_open_clip_state(path, kind, TEXT_FORMATS)
        config = model if isinstance(model, TextConfig) else clip.named_config(model or "ViT-B-32")
        found = f"an open_clip checkpoint that does not fit the {config.model} architecture (pass model=)"
    else:
        raise checkpoint_error(path, kind.description, TEXT_FORMATS)
    return clip.text_encoder_from_state(state, config, vision, path, found, TEXT_FORMATS).to(device)


def load_encoder(path: str | os.PathLike, *, device: str = "cpu") -> Encoder4Editing:
    """The e4e encoder in a pSp/e4e checkpoint (`e4e_ffhq_encode.pt`): photos `[B, 3, 256, 256]` in [-1, 1] to W+
    `[B, n_styles, 512]`, the average latent added."""
    return photo.encoder_from_checkpoint(photo.read_state_file(path, photo.ENCODER_FORMATS), path).to(device)


def load_identity_net(path: str | os.PathLike, *, device: str = "cpu") -> IdentityNet:
    """ArcFace IR-SE from `model_ir_se50.pth`: face crops `[B, 3, 112, 112]` in [-1, 1] to unit-norm `[B, 512]`."""
    return photo.identity_from_state(photo.read_state_file(path, photo.IDENTITY_FORMATS), path).to(device)


def load_face_parser(path: str | os.PathLike, *, device: str = "cpu") -> FaceParser:
    """The face-parsing UNet of FFCLIP's background loss: images `[B, 3, H, W]` in [-1, 1] to logits `[B, 19, H, W]`."""
    return photo.parser_from_state(photo.read_state_file(path, photo.PARSER_FORMATS), path).to(device)
