"""The networks that bring real photos in (DESIGN §3): the e4e encoder, the ArcFace identity net and the face parser.

Each is read from the file people hold, through the restricted unpickler, with its configuration inferred from the
tensors and checked before anything is allocated:

- e4e (`e4e_ffhq_encode.pt`): pSp's `{'state_dict': {'encoder.*', 'decoder.*'}, 'latent_avg', 'opts'}`; `opts` is
  e4e's options as a dict (its `encoder_type` and `stylegan_size` are checked when present), `latent_avg` the
  generator's average latent, `[512]` or repeated to `[n_styles, 512]`. The decoder is a rosinality generator and
  may be absent.
- ArcFace IR-SE50 (`model_ir_se50.pth`): a plain state dict of `Backbone(112, 50, 'ir_se')`.
- The face-parsing UNet of FFCLIP's background loss: a plain state dict of its `unet()`.

Files written before PyTorch counted batch-norm updates lack `num_batches_tracked`; PyTorch fills those counters
in when it loads such a file, and so do these readers (they are not used at inference).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import CheckpointError
from ..models import Generator
from ..models.encoder import STYLE_DIM, Encoder4Editing, EncoderConfig
from ..models.face_parser import FaceParser, FaceParserConfig
from ..models.identity import IdentityConfig, IdentityNet
from ..models.irse import STAGE_UNITS
from .detect import build_checked, checkpoint_error, describe, read_torch_file, sniff
from .rosinality import build_generator, convert_state_dict

ENCODER_FORMATS = (
    "an encoder is read from an e4e checkpoint such as e4e_ffhq_encode.pt ('state_dict' with 'encoder.*' tensors, "
    "'latent_avg', 'opts')"
)
IDENTITY_FORMATS = "an identity net is read from the ArcFace IR-SE state dict model_ir_se50.pth"
PARSER_FORMATS = "a face parser is read from the state dict of the face-parsing UNet FFCLIP's background loss loads"

ENCODER_PREFIX = "encoder."
DECODER_PREFIX = "decoder."


def read_state_file(path: str | os.PathLike, accepted: str) -> Any:
    """The object in a `torch.save` file at `path`; any other kind of file raises `CheckpointError`."""
    kind = sniff(path, accepted)
    if kind.kind not in ("torch-zip", "torch-legacy"):
        raise checkpoint_error(path, kind.description, accepted)
    return read_torch_file(path, kind, accepted)


def with_batch_counts(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` with a zero `num_batches_tracked` beside every batch norm's `running_mean` that lacks one."""
    out = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.zeros((), dtype=torch.long))
    return out


def uninitialised(module: Callable[[Any], torch.nn.Module]) -> Callable[[Any], torch.nn.Module]:
    """`module` built with its tensors allocated but not initialised (the loaders fill every one of them strictly):
    random initialisation of the e4e encoder's 270 M parameters would take longer than reading them. Built where
    the meta device is the default (as a loader learns the names and shapes it needs), it stays there."""

    def make(config: Any) -> torch.nn.Module:
        with torch.device("meta"):
            net = module(config)
        return net if torch.get_default_device().type == "meta" else net.to_empty(device="cpu")

    return make


def _indices(state: Mapping[str, Any], pattern: str) -> set[int]:
    return {int(m[1]) for k in state if (m := re.match(pattern, k))}


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj)


def is_e4e(obj: object) -> bool:
    """True for a pSp/e4e checkpoint: a dict whose `state_dict` holds `encoder.*` style heads."""
    if not isinstance(obj, Mapping) or not _is_state_dict(obj.get("state_dict")):
        return False
    return any(k.startswith(ENCODER_PREFIX + "styles.") for k in obj["state_dict"])


def _wrong(path: str | os.PathLike, obj: object, accepted: str) -> CheckpointError:
    return checkpoint_error(path, f"a torch.save file {describe(obj)}", accepted)


def encoder_from_checkpoint(obj: object, path: str | os.PathLike) -> Encoder4Editing:
    """The e4e encoder in a loaded pSp/e4e checkpoint, its average latent included."""
    if not is_e4e(obj):
        raise _wrong(path, obj, ENCODER_FORMATS)
    found = "an e4e checkpoint"
    state = {k[len(ENCODER_PREFIX):]: v for k, v in obj["state_dict"].items() if k.startswith(ENCODER_PREFIX)}
    n_styles = max(_indices(state, r"styles\.(\d+)\."), default=-1) + 1
    opts = obj.get("opts")
    opts = opts if isinstance(opts, Mapping) else {}
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing":
        # pSp's GradualStyleEncoder stores the same tensors but computes each style input on its own.
        raise checkpoint_error(path, f"a pSp checkpoint whose opts name the encoder {opts['encoder_type']!r}, not "
                               "Encoder4Editing", ENCODER_FORMATS)
    size = opts.get("stylegan_size")
    if isinstance(size, int) and size > 4 and 2 * int(math.log2(size)) - 2 != n_styles:
        raise checkpoint_error(
            path, f"{found} with {n_styles} style heads whose opts give stylegan_size {size} "
            f"({2 * int(math.log2(size)) - 2} style inputs)", ENCODER_FORMATS,
        )
    latent_avg = obj.get("latent_avg")
    if not isinstance(latent_avg, torch.Tensor):
        raise checkpoint_error(
            path, f"{found} without the average latent 'latent_avg' (the encoder's codes are offsets from it)",
            ENCODER_FORMATS,
        )
    if latent_avg.numel() not in (STYLE_DIM, n_styles * STYLE_DIM):
        raise checkpoint_error(
            path, f"{found} whose latent_avg has shape {list(latent_avg.shape)}; [{STYLE_DIM}] or "
            f"[{n_styles}, {STYLE_DIM}] is needed", ENCODER_FORMATS,
        )
    state["latent_avg"] = latent_avg.reshape(-1, STYLE_DIM).expand(n_styles, STYLE_DIM)
    return build_checked(EncoderConfig(n_styles), uninitialised(Encoder4Editing), with_batch_counts(state), path, found, ENCODER_FORMATS)


def generator_from_e4e(obj: Mapping, path: str | os.PathLike, accepted: str) -> Generator:
    """The rosinality generator stored as the decoder of a pSp/e4e checkpoint, with its average latent."""
    g_ema = {k[len(DECODER_PREFIX):]: v for k, v in obj["state_dict"].items() if k.startswith(DECODER_PREFIX)}
    if not g_ema:
        raise checkpoint_error(path, "an e4e checkpoint without its decoder ('decoder.*' tensors)", accepted)
    config, state = convert_state_dict(g_ema, path, accepted)
    latent_avg = obj.get("latent_avg")
    if isinstance(latent_avg, torch.Tensor) and latent_avg.dim() == 2:
        # e4e stores the average latent repeated once per style input.
        latent_avg = latent_avg[0] if bool((latent_avg == latent_avg[:1]).all()) else None
    if not isinstance(latent_avg, torch.Tensor):
        latent_avg = None
    return build_generator(config, state, latent_avg, path, "an e4e decoder", accepted)


def identity_from_state(obj: object, path: str | os.PathLike) -> IdentityNet:
    """The ArcFace IR-SE net in a loaded state dict; its depth is read from the number of residual units."""
    if not _is_state_dict(obj) or not any(k.startswith("output_layer.") for k in obj):
        raise _wrong(path, obj, IDENTITY_FORMATS)
    units = len(_indices(obj, r"body\.(\d+)\."))
    depths = {sum(counts): depth for depth, counts in STAGE_UNITS.items()}
    found = "an ArcFace IR-SE state dict"
    if units not in depths:
        raise checkpoint_error(
            path, f"{found} with {units} residual units ({', '.join(f'{n} for IR-SE {d}' for n, d in depths.items())})",
            IDENTITY_FORMATS,
        )
    return build_checked(IdentityConfig(depths[units]), uninitialised(IdentityNet), with_batch_counts(obj), path, found, IDENTITY_FORMATS)


def parser_from_state(obj: object, path: str | os.PathLike) -> FaceParser:
    """The face-parsing UNet in a loaded state dict; its width and class count are read from the tensors."""
    first, final = (obj.get(k) if _is_state_dict(obj) else None for k in ("conv1.conv1.0.weight", "final.weight"))
    if not isinstance(first, torch.Tensor) or not isinstance(final, torch.Tensor):
        raise _wrong(path, obj, PARSER_FORMATS)
    found = "a face-parsing UNet state dict"
    if first.dim() != 4 or final.dim() != 4:
        raise checkpoint_error(path, f"{found} whose first or last conv weight is not 4-D", PARSER_FORMATS)
    config = FaceParserConfig(width=int(first.shape[0]), n_classes=int(final.shape[0]))
    return build_checked(config, uninitialised(FaceParser), with_batch_counts(obj), path, found, PARSER_FORMATS)
