"""The TensorRT backend (TensorRT 10 Python API): a serialised engine per stage, its own CUDA stream, static
buffers for the largest batch, and optional CUDA-graph capture per batch size through cuda-python.

`tensorrt` and `cuda-python` are the optional extra `ffclip[tensorrt]`; they are imported only when this backend
is used, and `availability` says why it cannot run where they or a CUDA device are missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .base import DTYPES, EngineUnavailable, StageEngine, StageInfo

def import_tensorrt() -> ModuleType:
    """The `tensorrt` module; `EngineUnavailable` saying how to install it when it is missing."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise EngineUnavailable("TensorRT is not installed; install the extra: pip install 'ffclip[tensorrt]'") from None


def import_cudart() -> ModuleType:
    """cuda-python's runtime bindings (`cuda.bindings.runtime`, or `cuda.cudart` in releases before 12.6)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise EngineUnavailable("cuda-python is not installed; install the extra: pip install 'ffclip[tensorrt]'")


def tensorrt_reason(device: torch.device) -> str | None:
    """None when TensorRT can build and run on `device` here, else why not."""
    if device.type != "cuda":
        return "TensorRT needs a CUDA device (use --device cuda)"
    if not torch.cuda.is_available():
        return "no CUDA device is available here"
    try:
        import_tensorrt()
        import_cudart()
    except EngineUnavailable as exc:
        return str(exc)
    return None


def gpu_facts(device: torch.device) -> dict[str, Any]:
    """What a serialised engine is tied to: the TensorRT version, the GPU and its compute capability."""
    trt = import_tensorrt()
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def fit_problem(built: dict[str, Any], here: dict[str, Any], precision: str, bf16_supported: bool) -> str | None:
    """Why an engine whose build facts are `built` cannot run where `gpu_facts` gives `here`; None when it fits."""
    for key in ("tensorrt", "compute_capability"):
        if built.get(key) != here[key]:
            return f"was built for {key} {built.get(key)}, this machine has {here[key]}"
    if precision == "bf16" and not bf16_supported:
        return "is bf16, which this GPU does not support"
    return None


def check_cuda(result: tuple) -> Any:
    """Unpack a cuda-python call's (error, *values), raising on an error code."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime call failed with {err}")
    return values[0] if len(values) == 1 else values or None


def make_logger(trt: ModuleType, lines: list[str] | None = None) -> Any:
    """A TensorRT logger that appends every message, with its severity, to `lines` (the build log) when given."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            label = str(severity).rsplit(".", 1)[-1]
            if lines is not None:
                lines.append(f"[{label}] {msg}")

    return Logger()


class TensorRTEngine(StageEngine):
    """Runs `tensorrt/<stage>.plan`: load, activate, allocate buffers, infer (in the TensorRT diffusion demo's manner).

    Inputs are copied into static device buffers sized for the engine's largest batch; smaller batches use the leading
    rows. With `cuda_graphs`, the first call at each batch size runs normally and is then captured into a CUDA graph
    that later calls replay.
    """

    backend = "tensorrt"
    artifact = "tensorrt"

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device, cuda_graphs: bool = True):
        super().__init__(folder, stage, device)
        self.require(self.device)
        self._check_fits()
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        self._cuda_graphs = cuda_graphs
        self._graphs: dict[int, Any] = {}
        self._warm: set[int] = set()
        self._load()
        self._activate()
        self._allocate_buffers()

    @classmethod
    def availability(cls, device: torch.device) -> str | None:
        return tensorrt_reason(device)

    @property
    def max_batch(self) -> int:
        return self.stage.max_batch

    def _check_fits(self) -> None:
        """Refuse an engine built for another TensorRT version, GPU or a precision this GPU lacks."""
        problem = fit_problem(self.stage.entry.get("tensorrt", {}), gpu_facts(self.device), self.stage.precision,
                              torch.cuda.is_bf16_supported())
        if problem is not None:
            raise EngineUnavailable(
                f"{self.folder}: the {self.stage.name} TensorRT engine {problem}; rebuild here with ffclip-export "
                f"--formats tensorrt --precision {self.stage.precision} --out {self.folder}"
            )

    def _load(self) -> None:
        path = self.stage.file(self.folder, self.artifact)
        self._runtime = self._trt.Runtime(make_logger(self._trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.stage.read(self.folder, self.artifact))
        if self._engine is None:
            raise EngineUnavailable(f"{path}: TensorRT could not deserialise the engine; rebuild it with ffclip-export")

    def _activate(self) -> None:
        torch.cuda.set_device(self.device)
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self.device)

    def _allocate_buffers(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        for t in (*self.stage.inputs, *self.stage.outputs):
            self._buffers[t.name] = torch.empty(
                t.concrete_shape(self.max_batch), dtype=DTYPES[t.dtype], device=self.device
            )
            self._context.set_tensor_address(t.name, self._buffers[t.name].data_ptr())

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = next(iter(inputs.values())).shape[0]
        if not self.stage.min_batch <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside the engine's range {self.stage.min_batch}..{self.max_batch}")
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for name, x in inputs.items():
                self._buffers[name][:batch].copy_(x, non_blocking=True)
                self._context.set_input_shape(name, tuple(x.shape))
            self._infer(batch)
            outputs = {t.name: self._buffers[t.name][:batch].clone() for t in self.stage.outputs}
        self._stream.synchronize()
        return outputs

    def _infer(self, batch: int) -> None:
        handle = self._stream.cuda_stream
        if batch in self._graphs:
            check_cuda(self._cudart.cudaGraphLaunch(self._graphs[batch], handle))
            return
        if not self._context.execute_async_v3(handle):
            raise RuntimeError(f"TensorRT inference failed for the {self.stage.name} stage at batch {batch}")
        if self._cuda_graphs and batch in self._warm:
            self._capture(batch, handle)
        self._warm.add(batch)

    def _capture(self, batch: int, handle: int) -> None:
        cudart = self._cudart
        check_cuda(cudart.cudaStreamBeginCapture(handle, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        self._context.execute_async_v3(handle)
        graph = check_cuda(cudart.cudaStreamEndCapture(handle))
        self._graphs[batch] = check_cuda(cudart.cudaGraphInstantiate(graph, 0))
        check_cuda(cudart.cudaGraphDestroy(graph))

    def _release(self) -> None:
        for instance in self._graphs.values():
            self._cudart.cudaGraphExecDestroy(instance)
        self._graphs.clear()
        del self._buffers, self._context, self._engine, self._runtime
        torch.cuda.empty_cache()
