"""The eager backend: the stage's ffclip bundle (or an in-memory module) run by plain PyTorch, under autocast at the
precision the manifest records for it (`compute_precision.eager`: fp16 or bf16 on any device, fp32 for the mapper)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ffclip.artifacts import StageInfo
from ffclip.backends import PRECISIONS
from ffclip.checkpoints.bundle import load_module
from ffclip.engines.base import StageEngine, cuda_reason


class EagerEngine(StageEngine):
    """Runs `<stage>.safetensors` with the project's own modules; the reference every other backend is held to.
    Given `module`, runs that module instead of reading a folder (`folder` is then None)."""

    backend = "eager"

    def __init__(self, folder: Path | None, stage: StageInfo, device: torch.device, module: nn.Module | None = None):
        super().__init__(folder, stage, device)
        if module is None:
            with stage.checked_file(self.folder, self.artifact) as path:
                module = load_module(path)
        self._module = module.to(self.device).eval()
        self._autocast = PRECISIONS[stage.entry.get("compute_precision", {}).get("eager", "fp32")]

    @classmethod
    def availability(cls, device: torch.device) -> str | None:
        return cuda_reason(device)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [inputs[n] for n in self.input_names]
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self._autocast, enabled=self._autocast != torch.float32
        ):
            out = self._module(*args)
        return {self.output_names[0]: out.float()}

    def _release(self) -> None:
        del self._module
