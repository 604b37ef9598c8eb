"""The ONNX Runtime backend: CPU execution provider, or CUDA's where onnxruntime-gpu is installed."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import StageEngine, StageInfo, cuda_reason


class OnnxRuntimeEngine(StageEngine):
    """Runs `onnx/<stage>.onnx` in one `InferenceSession` (whose `run` is safe to call from many threads)."""

    backend = "onnxruntime"
    artifact = "onnx"
    thread_safe = True

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device, threads: int | None = None):
        super().__init__(folder, stage, device)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 16)
        options.log_severity_level = 3
        # three sessions share the cores: idle workers must sleep, not spin, or they slow the session that runs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # graph-optimiser notices go to the default logger, not the session's
        ort.set_default_logger_severity(3)
        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(stage.file(self.folder, self.artifact)), options, providers=providers)

    @classmethod
    def availability(cls, device: torch.device) -> str | None:
        reason = cuda_reason(device)
        if reason is not None or device.type != "cuda":
            return reason
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)"
        return None

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {n: inputs[n].cpu().numpy() for n in self.input_names}
        outs = self._session.run(self.output_names, feeds)
        return {n: torch.from_numpy(o).to(self.device) for n, o in zip(self.output_names, outs)}

    def _release(self) -> None:
        del self._session
