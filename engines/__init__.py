"""Backends that run an exported stage, behind the `StageEngine` interface of `ffclip.engines.base`.

Backends are imported only when asked for, so `tensorrt` or `triton` are never imported unless used.
"""

from __future__ import annotations

import importlib

from ffclip.engines.base import EngineUnavailable, StageEngine, StageInfo, TensorInfo

# backend name -> "module:class"; a module that is not installed makes its backend unavailable, not an error
BACKENDS: dict[str, str] = {
    "eager": "ffclip.engines.eager:EagerEngine",
    "torchscript": "ffclip.engines.torchscript:TorchScriptEngine",
    "onnxruntime": "ffclip.engines.onnxruntime:OnnxRuntimeEngine",
    "tensorrt": "ffclip.engines.tensorrt:TensorRTEngine",
    "triton": "ffclip.engines.triton:TritonEngine",
    "openvino": "ffclip.engines.openvino:OpenVinoEngine",
}


def engine_class(backend: str) -> type[StageEngine]:
    """The engine class of `backend`; `EngineUnavailable` for an unknown name or a backend whose module is absent."""
    if backend not in BACKENDS:
        raise EngineUnavailable(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    module_name, attr = BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise EngineUnavailable(f"the {backend} backend is not part of this installation") from None
    return getattr(module, attr)


__all__ = ["BACKENDS", "EngineUnavailable", "StageEngine", "StageInfo", "TensorInfo", "engine_class"]
