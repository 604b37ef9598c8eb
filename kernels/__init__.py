"""Triton kernels for the hot spots, each beside its plain-PyTorch reference in `ffclip.kernels.reference`.

The kernels take tensors and plain parameters and import nothing of the models: `ffclip.models` imports
`ffclip.kernels.reference` (torch only) for its maths, and the Triton modules load on first use of their names here.
On a machine without CUDA the kernels run in Triton's interpreter: set `TRITON_INTERPRET=1` before that first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "channel_attention": "mapper_attention",
    "layer_selection": "mapper_attention",
    "mapper_block": "mapper_attention",
    "modulated_conv2d": "modulated_conv",
    "channel_attention_reference": "reference",
    "layer_selection_reference": "reference",
    "mapper_block_reference": "reference",
    "modulated_conv2d_reference": "reference",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"ffclip.kernels.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'ffclip.kernels' has no attribute {name!r}")
