"""FFCLIP: free-form text-driven StyleGAN2 editing with an export toolchain and an embeddable runtime."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_generator": "ffclip.checkpoints",
    "load_mapper": "ffclip.checkpoints",
    "load_text_encoder": "ffclip.checkpoints",
    "extract_generator": "ffclip.checkpoints",
    "save_module": "ffclip.checkpoints",
    "load_encoder": "ffclip.checkpoints",
    "load_identity_net": "ffclip.checkpoints",
    "load_face_parser": "ffclip.checkpoints",
    "Generator": "ffclip.models",
    "Mapper": "ffclip.models",
    "TextEncoder": "ffclip.models",
    "EditPipeline": "ffclip.pipeline",
    "Runtime": "ffclip.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import ffclip` and `ffclip --help` stay fast.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ffclip' has no attribute {name!r}")
