"""Triton kernels for the hot spots, each beside its plain-PyTorch reference.

On a machine without CUDA the kernels run in Triton's interpreter: set `TRITON_INTERPRET=1` before importing this
package (or triton). `ffclip.models` imports this package only when a model is switched to its "triton" form.
"""

from ffclip.kernels.mapper_attention import (
    channel_attention,
    channel_attention_reference,
    layer_selection,
    layer_selection_reference,
    mapper_block,
)
from ffclip.kernels.modulated_conv import modulated_conv2d, modulated_conv2d_reference

__all__ = [
    "channel_attention",
    "channel_attention_reference",
    "layer_selection",
    "layer_selection_reference",
    "mapper_block",
    "modulated_conv2d",
    "modulated_conv2d_reference",
]
