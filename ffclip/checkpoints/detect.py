"""What a checkpoint file is, judged from its bytes, and the one-line errors that name it."""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, FfclipError, summarize
from .bundle_format import is_bundle
from .limits import check_config
from .safe_pickle import load_torch_file


@dataclass(frozen=True)
class FileKind:
    """`kind` is one of: bundle, safetensors, torch-zip, torchscript, torch-legacy, pickle; `description` says it."""

    kind: str
    description: str


_LEGACY_TORCH_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # LONG1 0x1950a86a20f9469cfc6c


def sniff(path: str | os.PathLike, accepted: str) -> FileKind:
    """Classify `path`; a missing, empty or unrecognised file raises `CheckpointError` listing `accepted`."""
    p = Path(path)
    if not p.is_file():
        raise checkpoint_error(path, "no such file" if not p.exists() else "not a regular file", accepted)
    try:
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise checkpoint_error(path, f"an unreadable file ({exc.strerror})", accepted) from None
    if not head:
        raise checkpoint_error(path, "an empty file", accepted)
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(p, accepted)
    # Before the pickle test: a safetensors header whose length is 128 modulo 256 also starts with 0x80.
    if _is_safetensors_header(head):
        if 8 + struct.unpack("<Q", head[:8])[0] > p.stat().st_size:
            raise checkpoint_error(path, "a truncated safetensors file", accepted)
        if is_bundle(p):
            return FileKind("bundle", "an ffclip bundle")
        return FileKind("safetensors", "a safetensors file without ffclip bundle metadata")
    if head[:1] == b"\x80":
        if head[2:14] == _LEGACY_TORCH_MAGIC:
            return FileKind("torch-legacy", "a legacy torch.save file")
        return FileKind("pickle", "a pickle")
    raise checkpoint_error(path, _describe_bytes(head, p.stat().st_size), accepted)


def _sniff_zip(path: Path, accepted: str) -> FileKind:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise checkpoint_error(path, f"a damaged or truncated zip archive ({exc})", accepted) from None
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return FileKind("torchscript", "a TorchScript archive")
    if any(n.endswith("data.pkl") for n in names):
        return FileKind("torch-zip", "a torch.save zip archive")
    raise checkpoint_error(path, f"a zip archive holding {names[:5]}", accepted)


def _is_safetensors_header(head: bytes) -> bool:
    return len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 2**32


def _describe_bytes(head: bytes, size: int) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a file of {size} bytes in no format known here (it starts with {head[:8]!r})"
    return f"a text file starting with {text[:24]!r}"


def describe(obj: Any) -> str:
    """A short phrase for what a loaded checkpoint holds, e.g. "with keys ['g_ema', 'latent_avg']"."""
    if isinstance(obj, Mapping):
        keys = sorted(map(str, obj.keys()))
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"with keys {keys[:8]}{more}"
    return f"holding a {type(obj).__name__}"


def checkpoint_error(path: str | os.PathLike, found: str, accepted: str) -> CheckpointError:
    """The error for a file that cannot be used: `<path>: found <found>; <accepted>`."""
    return CheckpointError(f"{path}: found {found}; {accepted}")


def read_torch_file(path: str | os.PathLike, kind: FileKind, accepted: str) -> Any:
    """The object in a `torch.save` file (zip or legacy), read by the restricted unpickler; failures name the file."""
    try:
        return load_torch_file(path)
    except Exception as exc:  # a damaged or refused file can raise almost anything
        raise checkpoint_error(path, f"{kind.description} that cannot be read safely ({summarize(exc)})", accepted) from None


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


# A module may need at most this many times the bytes its tensors store (half-precision files load as float32),
# plus a little for the tensors a loader fills in itself.
STORED_RATIO = 4
STORED_SLACK = 2**20


def build_checked(
    config: Any,
    make: Callable[[Any], torch.nn.Module],
    state: Mapping[str, Any],
    path: str | os.PathLike,
    found: str,
    accepted: str,
) -> torch.nn.Module:
    """`make(config)` loaded strictly with `state`, in eval mode and frozen. Before anything is allocated the config
    must be within `limits`, the names and shapes in `state` must be those of the module (built on the meta device
    to learn them), and the module may not need far more bytes than the tensors store; non-finite weights are
    refused. Every refusal is a `CheckpointError` naming the file."""
    try:
        check_config(config)
        with torch.device("meta"):
            expected = make(config).state_dict()
    except (TypeError, ValueError, RuntimeError, FfclipError) as exc:
        raise checkpoint_error(path, f"{found} with an unusable config ({exc})", accepted) from None
    missing, unexpected = [k for k in expected if k not in state], sorted(set(state) - set(expected))
    if missing or unexpected:
        raise checkpoint_error(
            path, f"{found} whose tensors do not match: missing {missing[:4]}, unexpected {unexpected[:4]}", accepted
        )
    wrong = [
        f"{k} is {_shape(state[k])} where {list(v.shape)} is needed"
        for k, v in expected.items()
        if not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape
    ]
    if wrong:
        raise checkpoint_error(path, f"{found} with mismatched shapes: {'; '.join(wrong[:2])}", accepted)
    stored = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in state.values()}
    needed = sum(v.numel() * v.element_size() for v in expected.values())
    if needed > STORED_RATIO * sum(stored.values()) + STORED_SLACK:
        raise checkpoint_error(
            path, f"{found} whose tensors store {sum(stored.values())} bytes for a model of {needed} bytes "
            "(tensors broadcast or shared past what the file holds)", accepted,
        )
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise checkpoint_error(path, f"{found} with non-finite weights (NaN or infinity) in {key}", accepted)
    module = make(config)
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)
