"""Generators in the rosinality/stylegan2-pytorch layout (`stylegan2-ffhq-config-f.pt`, and the one FFCLIP bundles).

Both layouts store raw weights and apply the equalised-lr gains at run time, so conversion is renaming and
reshaping. The configuration (resolution, widths, mapping depth, style size) is read from the tensor shapes; the
mapping lr multiplier is not stored and is the standard 0.01.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping

import torch

from ffclip.kernels.reference import fir_kernel

from ..config import GeneratorConfig
from ..errors import summarize
from ..models import Generator
from .detect import build_checked, checkpoint_error


def is_rosinality(obj: object) -> bool:
    """True for a dict holding a rosinality `g_ema` state dict."""
    return isinstance(obj, Mapping) and isinstance(obj.get("g_ema"), Mapping)


def check_filter(value: torch.Tensor, gain: float, path: str | os.PathLike, name: str, accepted: str) -> None:
    """Refuse a resampling filter buffer that is not the [1,3,3,1] FIR filter times `gain` (the model hard-codes it)."""
    expected = fir_kernel() * gain
    if value.shape != expected.shape or not torch.allclose(value.float().cpu(), expected, atol=1e-6):
        raise checkpoint_error(
            path, f"a generator whose {name} is not the [1,3,3,1] filter this project implements", accepted
        )


_STYLED_CONV = {
    "conv.modulation.weight": "affine.weight",
    "conv.modulation.bias": "affine.bias",
    "activate.bias": "bias",
}
_TO_RGB = {"conv.modulation.weight": "affine.weight", "conv.modulation.bias": "affine.bias"}


def _layer_entries(prefix: str, rest: str, value: torch.Tensor, to_rgb: bool) -> tuple[str, torch.Tensor] | None:
    """Our name and tensor for the rosinality tensor `rest` of one layer; None for the fixed filter buffers."""
    if rest == "conv.weight":
        return f"{prefix}.weight", value[0]
    if to_rgb and rest == "bias":
        return f"{prefix}.bias", value.view(-1)  # a view: a broadcast tensor is refused, never copied out
    if not to_rgb and rest == "noise.weight":
        return f"{prefix}.noise_strength", value.reshape(())
    renamed = (_TO_RGB if to_rgb else _STYLED_CONV).get(rest)
    return None if renamed is None else (f"{prefix}.{renamed}", value)


_FILTER_BUFFERS = ("conv.blur.kernel", "upsample.kernel")


def convert_state_dict(
    g_ema: Mapping[str, torch.Tensor], path: str | os.PathLike, accepted: str
) -> tuple[GeneratorConfig, dict[str, torch.Tensor]]:
    """The configuration and our state dict for a rosinality `g_ema` (`w_avg` not included)."""
    try:
        config = _infer_config(g_ema)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise checkpoint_error(path, f"a rosinality generator state dict that is incomplete ({exc})", accepted) from None
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in g_ema.items():
        if not isinstance(value, torch.Tensor):
            raise checkpoint_error(path, f"a rosinality generator whose {key} is a {type(value).__name__}", accepted)
        if key.endswith(_FILTER_BUFFERS):
            # Blur and skip-upsample kernels are stored already multiplied by the upsampling factor squared.
            check_filter(value, 4.0, path, key, accepted)
            continue
        try:
            entry = _convert_key(key, value)
        except (IndexError, RuntimeError) as exc:
            raise checkpoint_error(
                path, f"a rosinality generator whose {key} has the wrong shape {list(value.shape)} ({summarize(exc)})", accepted
            ) from None
        if entry is None:
            unknown.append(key)
        else:
            out[entry[0]] = entry[1]
    if unknown:
        raise checkpoint_error(path, f"a rosinality generator with unknown tensors {unknown[:4]}", accepted)
    return config, out


def _convert_key(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    if m := re.fullmatch(r"style\.(\d+)\.(weight|bias)", key):
        return f"mapping_network.layers.{int(m[1]) - 1}.{m[2]}", value
    if key == "input.input":
        return "synthesis_network.const", value
    if key.startswith("conv1."):
        return _layer_entries("synthesis_network.blocks.0.conv1", key[6:], value, to_rgb=False)
    if key.startswith("to_rgb1."):
        return _layer_entries("synthesis_network.blocks.0.torgb", key[8:], value, to_rgb=True)
    if m := re.fullmatch(r"convs\.(\d+)\.(.+)", key):
        i = int(m[1])
        return _layer_entries(f"synthesis_network.blocks.{i // 2 + 1}.conv{i % 2}", m[2], value, to_rgb=False)
    if m := re.fullmatch(r"to_rgbs\.(\d+)\.(.+)", key):
        return _layer_entries(f"synthesis_network.blocks.{int(m[1]) + 1}.torgb", m[2], value, to_rgb=True)
    if m := re.fullmatch(r"noises\.noise_(\d+)", key):
        # Noise j belongs to the j-th styled conv: conv1, then convs.0, convs.1, ...
        j = int(m[1])
        layer = "blocks.0.conv1" if j == 0 else f"blocks.{(j - 1) // 2 + 1}.conv{(j - 1) % 2}"
        return f"synthesis_network.{layer}.noise", value
    return None


def _infer_config(g_ema: Mapping[str, torch.Tensor]) -> GeneratorConfig:
    style = sorted({int(m[1]) for k in g_ema if (m := re.fullmatch(r"style\.(\d+)\.weight", k))})
    if not style:
        raise KeyError("style.1.weight")
    num_rgbs = len({int(m[1]) for k in g_ema if (m := re.fullmatch(r"to_rgbs\.(\d+)\..+", k))})
    channels = {"4": int(g_ema["input.input"].shape[1])}
    for k in range(num_rgbs):
        channels[str(2 ** (k + 3))] = int(g_ema[f"convs.{2 * k}.conv.weight"].shape[1])
    return GeneratorConfig(
        resolution=4 * 2**num_rgbs,
        style_dim=int(g_ema[f"style.{style[0]}.weight"].shape[1]),
        n_mlp=len(style),
        channels=channels,
    )


def build_generator(
    config: GeneratorConfig,
    state: dict[str, torch.Tensor],
    w_avg: torch.Tensor | None,
    path: str | os.PathLike,
    found: str,
    accepted: str,
) -> Generator:
    """A generator from converted tensors; without `w_avg` it is estimated from the mapping network, with a warning."""
    estimate = w_avg is None
    if estimate:
        w_avg = torch.zeros(()).expand(config.style_dim)  # a placeholder, replaced below; allocates nothing
    elif w_avg.numel() != config.style_dim:
        raise checkpoint_error(path, f"{found} whose average latent has shape {list(w_avg.shape)}", accepted)
    state = {**state, "w_avg": w_avg.reshape(config.style_dim)}
    generator = build_checked(config, Generator, state, path, found, accepted)
    if estimate:
        warnings.warn(f"{path}: no average latent stored; w_avg was estimated from the mapping network", stacklevel=3)
        generator.estimate_w_avg()
    return generator


def generator_from_checkpoint(obj: Mapping, path: str | os.PathLike, accepted: str) -> Generator:
    """The generator in a rosinality checkpoint dict (`g_ema` + `latent_avg`)."""
    config, state = convert_state_dict(obj["g_ema"], path, accepted)
    latent_avg = obj.get("latent_avg")
    if latent_avg is not None and not isinstance(latent_avg, torch.Tensor):
        raise checkpoint_error(path, f"a rosinality checkpoint whose latent_avg is a {type(latent_avg).__name__}", accepted)
    return build_generator(config, state, latent_avg, path, "a rosinality generator", accepted)
