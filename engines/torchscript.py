"""The TorchScript backend: `torch.jit.trace` artifacts, on the device type they were traced on."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from ffclip.artifacts import StageInfo
from ffclip.engines.base import EngineUnavailable, StageEngine, cuda_reason


class TorchScriptEngine(StageEngine):
    """Runs `torchscript/<stage>.pt`. Traced graphs keep the device of the tensors they create, so an artifact traced
    on the CPU serves the CPU and one traced on CUDA serves CUDA."""

    backend = "torchscript"

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device):
        super().__init__(folder, stage, device)
        path = stage.file(self.folder, self.artifact)
        reason = self.fits(stage, self.device)
        if reason is not None:
            raise EngineUnavailable(f"{path}: {reason}; re-export with ffclip-export --device {self.device.type} "
                                    f"--out {self.folder}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self._module = torch.jit.load(io.BytesIO(stage.read(self.folder, self.artifact)), map_location=self.device).eval()

    @classmethod
    def fits(cls, stage: StageInfo, device: torch.device) -> str | None:
        traced_on = stage.entry.get("torchscript", {}).get("device", "cpu")
        return None if torch.device(traced_on).type == device.type else f"traced on {traced_on}, cannot serve {device}"

    @classmethod
    def availability(cls, device: torch.device) -> str | None:
        return cuda_reason(device)

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self._module(*[inputs[n] for n in self.input_names])
        return {self.output_names[0]: out}

    def _release(self) -> None:
        del self._module
