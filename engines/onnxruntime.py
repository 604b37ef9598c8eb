"""The ONNX Runtime backend: CPU execution provider, or CUDA's where onnxruntime-gpu is installed."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ffclip.artifacts import ArtifactError, StageInfo
from ffclip.engines.base import EngineUnavailable, StageEngine, cuda_reason
from ffclip.errors import summarize


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def external_data(model: bytes, folder: Path, name: str) -> list[str]:
    """The files (relative to `folder`) that the ONNX model `name` keeps its external tensors in; `ArtifactError`
    when one lies outside the folder."""
    import onnx

    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:
        raise ArtifactError(f"{folder / name}: not a readable ONNX model ({summarize(exc)}); "
                            f"re-export with ffclip-export --out {folder}") from None
    found: list[str] = []
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), location))
        if not location or posixpath.isabs(location) or joined.startswith("../") or joined == "..":
            raise ArtifactError(f"{folder / name}: external data {location!r} of tensor {tensor.name!r} is outside the "
                                f"artifact folder; re-export with ffclip-export --out {folder}")
        if joined not in found:
            found.append(joined)
    return found


def _session(ort: ModuleType, model: bytes | str, options: Any, providers: list, path: Path) -> Any:
    """An `InferenceSession` of `model` (bytes, or the path of a private copy); `EngineUnavailable` naming the
    artifact `path` when ONNX Runtime cannot build one, e.g. for an operator it does not implement."""
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors share no narrower base class
        raise EngineUnavailable(f"{path}: ONNX Runtime cannot load it ({summarize(exc)}); re-export the folder with "
                                "ffclip-export, or choose another backend") from None


class OnnxRuntimeEngine(StageEngine):
    """Runs `onnx/<stage>.onnx` in one `InferenceSession` (whose `run` is safe to call from many threads)."""

    backend = "onnxruntime"
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
        model = stage.read(self.folder, self.artifact)
        external = external_data(model, self.folder, stage.files[self.artifact])
        path = stage.file(self.folder, self.artifact)
        if not external:
            self._session = _session(ort, model, options, providers, path)
        else:  # ONNX Runtime finds external data beside the model file: load from a private copy of checked bytes
            with stage.private_copy(self.folder, [stage.files[self.artifact], *external]) as tmp:
                self._session = _session(ort, str(tmp / stage.files[self.artifact]), options, providers, path)

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
