"""Generators in NVIDIA's stylegan2-ada-pytorch layout (`stylegan2-ffhq-1024x1024.pkl`).

These pickles are written by NVIDIA's `torch_utils.persistence`: every network is reduced to
`_reconstruct_persistent_obj(meta)`, where `meta` carries the Python source of its module, which a plain
`pickle.load` would execute. Here that name resolves to a function that keeps only the module's tensors, submodules
and scalar attributes (`meta['state']`) and never looks at the source; every other global goes through
`RestrictedUnpickler`'s allowlist.

Weight orientation: NVIDIA's synthesis layer calls `conv2d_resample` with `flip_weight = (up == 1)`, and for
`up > 1` that function runs `conv_transpose2d` through a wrapper given `flip_weight = not flip_weight` (True), which
leaves the weight unflipped. rosinality's upsampling conv, and this project's, also call `conv_transpose2d` on the
unflipped weight, and the plain convs are unflipped cross-correlations in all three. So no spatial flip is needed
(the flip belongs only to conversions from the original TensorFlow weights).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..config import GeneratorConfig
from ..errors import summarize
from ..models import Generator
from .detect import checkpoint_error
from .rosinality import build_generator, check_filter
from .safe_pickle import ModuleRecord, RestrictedUnpickler


def _reconstruct_persistent_obj(meta: Any) -> ModuleRecord:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`: the state only, never `module_src`."""
    if not isinstance(meta, Mapping) or not isinstance(meta.get("state"), Mapping):
        raise pickle.UnpicklingError("a persistent object without a state dictionary")
    record = ModuleRecord()
    record.class_name = str(meta.get("class_name", ""))
    record.__setstate__(meta["state"])
    return record


_PERSISTENCE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): dict,
}


def read_pickle(path: str | os.PathLike, accepted: str) -> Any:
    """The object in an NVIDIA network pickle, rebuilt without running any code from it."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, extra=_PERSISTENCE_GLOBALS, module_prefixes=("torch.nn.modules.",)).load()
    except Exception as exc:  # unpickling a damaged or hostile file can raise almost anything
        raise checkpoint_error(path, f"a pickle that cannot be read safely ({summarize(exc)})", accepted) from None


def is_nvidia(obj: object) -> bool:
    """True for a dict holding an NVIDIA `G_ema` network."""
    return isinstance(obj, Mapping) and isinstance(obj.get("G_ema"), ModuleRecord)


_LAYER_TENSORS = {"affine.weight", "affine.bias", "weight", "bias", "noise_strength"}


def generator_from_pickle(obj: Mapping, path: str | os.PathLike, accepted: str) -> Generator:
    """Our generator from the `G_ema` of an NVIDIA pickle (StyleGAN2, unconditional, 'skip' architecture)."""
    g_ema: ModuleRecord = obj["G_ema"]
    found = "an NVIDIA generator"
    tensors = g_ema.flat_tensors()
    if "synthesis.b4.const" not in tensors or "mapping.fc0.weight" not in tensors:
        raise checkpoint_error(path, "an NVIDIA network that is not a StyleGAN2 generator", accepted)
    if any(k.startswith("mapping.embed.") for k in tensors):
        raise checkpoint_error(path, "a class-conditional NVIDIA generator", accepted)
    _check_attributes(g_ema, path, accepted)

    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        if key.endswith("resample_filter"):
            check_filter(value, 1.0, path, key, accepted)
        elif m := re.fullmatch(r"mapping\.fc(\d+)\.(weight|bias)", key):
            state[f"mapping_network.layers.{m[1]}.{m[2]}"] = value
        elif key == "mapping.w_avg":
            state["w_avg"] = value
        elif key == "synthesis.b4.const":
            state["synthesis_network.const"] = value[None]
        elif m := re.fullmatch(r"synthesis\.b(\d+)\.(conv0|conv1|torgb)\.(.+)", key):
            prefix = f"synthesis_network.blocks.{int(math.log2(int(m[1]))) - 2}.{m[2]}"
            if m[3] == "noise_const":
                state[f"{prefix}.noise"] = value[None, None]
            elif m[3] in _LAYER_TENSORS:
                state[f"{prefix}.{m[3]}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise checkpoint_error(path, f"an NVIDIA generator with unknown tensors {unknown[:4]}", accepted)

    try:
        config = _infer_config(tensors, g_ema)
    except (KeyError, ValueError, IndexError) as exc:
        raise checkpoint_error(path, f"an NVIDIA generator whose shape cannot be read ({summarize(exc)})", accepted) from None
    w_avg = state.pop("w_avg", None)
    return build_generator(config, state, w_avg, path, found, accepted)


def _check_attributes(g_ema: ModuleRecord, path: str | os.PathLike, accepted: str) -> None:
    clamped = False
    for name, record in g_ema.walk():
        architecture = record.attributes.get("architecture")
        if architecture not in (None, "skip"):
            raise checkpoint_error(path, f"an NVIDIA generator whose {name} uses the {architecture!r} architecture", accepted)
        clamped = clamped or record.attributes.get("conv_clamp") is not None
    if clamped:
        warnings.warn(
            f"{path}: the generator was trained with conv_clamp; activations are not clamped here, which matters only "
            "where they exceed the clamp",
            stacklevel=4,
        )


def _infer_config(tensors: Mapping[str, torch.Tensor], g_ema: ModuleRecord) -> GeneratorConfig:
    fc0 = tensors["mapping.fc0.weight"]
    n_mlp = len([k for k in tensors if re.fullmatch(r"mapping\.fc\d+\.weight", k)])
    resolutions = sorted({int(m[1]) for k in tensors if (m := re.fullmatch(r"synthesis\.b(\d+)\..+", k))})
    channels = {str(r): int(tensors[f"synthesis.b{r}.conv1.weight"].shape[0]) for r in resolutions}
    mapping = g_ema.children.get("mapping")
    fc0_record = mapping.children.get("fc0") if mapping is not None else None
    lr_mlp = float(fc0_record.attributes.get("lr_multiplier", 0.01)) if fc0_record is not None else 0.01
    if fc0.shape[0] != fc0.shape[1]:
        raise ValueError(f"z and w sizes differ ({fc0.shape[1]} vs {fc0.shape[0]})")
    return GeneratorConfig(
        resolution=resolutions[-1], style_dim=int(fc0.shape[0]), n_mlp=n_mlp, lr_mlp=lr_mlp, channels=channels
    )
