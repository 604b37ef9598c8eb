"""The eager backend: the stage's ffclip bundle run by plain PyTorch, under autocast at the precision the manifest
records for it (`compute_precision.eager`: fp16 or bf16 on any device, fp32 for the mapper)."""

from __future__ import annotations

from pathlib import Path

import torch

from ffclip.checkpoints.bundle import load_module

from ffclip.engines.base import StageEngine, StageInfo, cuda_reason

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class EagerEngine(StageEngine):
    """Runs `<stage>.safetensors` with the project's own modules; the reference every other backend is held to."""

    backend = "eager"
    artifact = "eager"

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device):
        super().__init__(folder, stage, device)
        with stage.checked_file(self.folder, self.artifact) as path:
            self._module = load_module(path).to(self.device)
        self._autocast = _AUTOCAST.get(stage.entry.get("compute_precision", {}).get("eager", "fp32"))

    @classmethod
    def availability(cls, device: torch.device) -> str | None:
        return cuda_reason(device)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [inputs[n] for n in self.input_names]
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self._autocast or torch.float32, enabled=self._autocast is not None
        ):
            out = self._module(*args)
        return {self.output_names[0]: out.float()}

    def _release(self) -> None:
        del self._module
