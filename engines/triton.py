"""The triton backend: the eager stage modules with the fused Triton kernels of `ffclip.kernels` swapped in.

It reads the same bundle as the eager backend. The generator's synthesis layers and the mapper's blocks switch to
their "triton" implementation; the text encoder has no kernel and runs as in the eager backend. On the CPU the kernels run in
Triton's interpreter, which must be enabled (`TRITON_INTERPRET=1`) before triton is first imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ffclip.artifacts import StageInfo
from ffclip.engines.base import cuda_reason
from ffclip.engines.eager import EagerEngine


class TritonEngine(EagerEngine):
    """`EagerEngine` with `impl = "triton"` set on the loaded generator or mapper."""

    backend = "triton"

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device):
        super().__init__(folder, stage, device)
        if hasattr(self._module, "impl"):
            self._module.impl = "triton"

    @classmethod
    def availability(cls, device: torch.device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cpu":
            from ffclip.kernels._config import interpreting

            return None if interpreting() else "on the CPU the kernels need TRITON_INTERPRET=1 set before triton is imported"
        return cuda_reason(device)
