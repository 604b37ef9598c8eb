"""The TensorRT backend (TensorRT 10 and 11 Python API): a serialised engine per stage, its own CUDA stream, static
buffers for the largest batch, and optional CUDA-graph capture through cuda-python.

The engine's own tensor list (names, modes, dtypes, profile shapes) is read back and must match the manifest; every
shape and address TensorRT is given is checked. Everything runs under the engine's device, so engines on several GPUs
in one process each use their own.

`tensorrt` and `cuda-python` are the optional extra `ffclip[tensorrt]`; they are imported only when this backend
is used, and `availability` says why it cannot run where they or a CUDA device are missing.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ffclip.artifacts import DTYPES, StageInfo
from ffclip.engines.base import EngineUnavailable, StageEngine

_LOG = logging.getLogger("ffclip.tensorrt")
# TensorRT's DataType names -> the manifest's dtype names
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
               "UINT8": "uint8"}

def import_tensorrt() -> ModuleType:
    """The `tensorrt` module; `EngineUnavailable` saying how to install it when it is missing."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise EngineUnavailable("TensorRT is not installed; install the extra: pip install 'ffclip[tensorrt]'") from None


def import_cudart() -> ModuleType:
    """cuda-python's runtime bindings, `cuda.bindings.runtime` (the extra pins cuda-python 13)."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        raise EngineUnavailable("cuda-python is not installed; install the extra: pip install 'ffclip[tensorrt]'") from None


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


def cuda_device(device: torch.device) -> torch.device:
    """`device` with its index: a bare `cuda` names the current device."""
    device = torch.device(device)
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (emulation does not count)."""
    with torch.cuda.device(cuda_device(device)):
        return torch.cuda.is_bf16_supported(including_emulation=False)


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


def _label(member: Any) -> str:
    """The name of a TensorRT enum member (`DataType.HALF` -> "HALF")."""
    return getattr(member, "name", None) or str(member).rsplit(".", 1)[-1]


def make_logger(trt: ModuleType, lines: list[str] | None = None, floor: Any = None) -> Any:
    """A TensorRT logger keeping messages of severity `floor` (WARNING by default) or worse: appended to `lines`
    (a build log) when given, else sent to the `ffclip.tensorrt` Python logger, whose warnings and errors reach stderr."""
    floor = int(trt.ILogger.Severity.WARNING if floor is None else floor)
    levels = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING}

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) > floor:  # TensorRT numbers severities from INTERNAL_ERROR (0) to VERBOSE (4)
                return
            if lines is not None:
                lines.append(f"[{_label(severity)}] {msg}")
            else:
                _LOG.log(levels.get(_label(severity), logging.INFO), "TensorRT: %s", msg)

    return Logger()


@dataclass(frozen=True)
class IoTensor:
    """One input or output as the engine declares it; `shape` has -1 on dynamic axes, `profile` is the input's
    (min, opt, max) shapes of optimisation profile 0."""

    name: str
    is_input: bool
    dtype: str
    shape: tuple[int, ...]
    profile: tuple[tuple[int, ...], ...] | None = None


def io_tensors(trt: ModuleType, engine: Any) -> list[IoTensor]:
    """The engine's inputs and outputs, in its order."""
    found = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = _label(engine.get_tensor_dtype(name))
        profile = tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, 0)) if is_input else None
        found.append(IoTensor(name, is_input, _TRT_DTYPES.get(dtype, dtype), tuple(engine.get_tensor_shape(name)), profile))
    return found


def io_problems(found: list[IoTensor], stage: StageInfo) -> list[str]:
    """How the engine's tensors differ from the manifest's: names, direction, dtypes, fixed sizes, batch range."""
    problems = []
    want = {t.name: (True, t) for t in stage.inputs} | {t.name: (False, t) for t in stage.outputs}
    have = {t.name: t for t in found}
    for name in sorted(set(want) - set(have)):
        problems.append(f"no tensor {name}")
    for name in sorted(set(have) - set(want)):
        problems.append(f"an unexpected tensor {name}")
    for name in sorted(set(want) & set(have)):
        is_input, info = want[name]
        t = have[name]
        if t.is_input != is_input:
            problems.append(f"{name} is an {'input' if t.is_input else 'output'}")
        if t.dtype != info.dtype:
            problems.append(f"{name} is {t.dtype}, not {info.dtype}")
        fixed = [d for d in info.shape if not isinstance(d, str)]
        if len(t.shape) != len(info.shape) or any(d not in (-1, f) for d, f in zip(t.shape[1:], fixed)):
            problems.append(f"{name} has shape {t.shape}, not {tuple(info.shape)}")
        if t.profile is not None and (t.profile[0][0] > stage.min_batch or t.profile[2][0] < stage.max_batch):
            problems.append(f"{name} takes batches {t.profile[0][0]}..{t.profile[2][0]}, not "
                            f"{stage.min_batch}..{stage.max_batch}")
    return problems


def profile_batch(batch: int, min_batch: int, max_batch: int) -> int:
    """The batch size to run `batch` rows at: raised to the profile's minimum (the extra rows are padding)."""
    if not 1 <= batch <= max_batch:
        raise ValueError(f"batch {batch} is outside the engine's range 1..{max_batch}")
    return max(batch, min_batch)


class GraphRunner:
    """Runs one execution context on a stream, replaying a CUDA graph where that is valid.

    A captured graph holds the input shapes it was captured with, and TensorRT's guidance is to capture again once
    the context's shapes change; so one graph is kept, for the current batch size, and `shapes_changed` drops it.
    A batch size that runs twice in a row is captured after its second normal run (the first ran TensorRT's shape
    setup), and replayed from then on. A capture that fails is ended and destroyed, and that batch size runs without
    a graph from then on.
    """

    def __init__(self, context: Any, cudart: Any, enabled: bool, name: str):
        self.context = context
        self.cudart = cudart
        self.enabled = enabled
        self.name = name
        self.graph: Any = None
        self.graph_batch: int | None = None
        self.last_batch: int | None = None
        self.failed: set[int] = set()
        self.replays = 0

    def infer(self, batch: int, stream: int) -> None:
        """Run the context at `batch` (its shapes already set) on `stream`."""
        if self.graph is not None and self.graph_batch == batch:
            check_cuda(self.cudart.cudaGraphLaunch(self.graph, stream))
            self.replays += 1
            return
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT inference failed for the {self.name} stage at batch {batch}")
        if self.enabled and batch not in self.failed and self.last_batch == batch:
            self._capture(batch, stream)
        self.last_batch = batch

    def shapes_changed(self) -> None:
        """The context's input shapes changed: the held graph no longer applies."""
        self.drop()
        self.last_batch = None

    def _capture(self, batch: int, stream: int) -> None:
        cudart = self.cudart
        check_cuda(cudart.cudaStreamBeginCapture(stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            enqueued = self.context.execute_async_v3(stream)
        finally:
            err, graph = cudart.cudaStreamEndCapture(stream)
        instance, problem = None, None
        if not enqueued:
            problem = "TensorRT could not enqueue during the capture"
        elif int(err) != 0:
            problem = f"ending the capture failed with {err}"
        else:
            err, instance = cudart.cudaGraphInstantiate(graph, 0)
            if int(err) != 0:
                instance, problem = None, f"instantiating the graph failed with {err}"
        if graph:
            cudart.cudaGraphDestroy(graph)
        if problem is not None:
            cudart.cudaGetLastError()  # clear the capture's error so that later calls start clean
            self.failed.add(batch)
            _LOG.warning("CUDA graph capture of the %s stage at batch %d failed (%s); that batch size runs without "
                         "a graph", self.name, batch, problem)
            return
        self.graph, self.graph_batch = instance, batch

    def drop(self) -> None:
        """Destroy the held graph, if any."""
        if self.graph is not None:
            self.cudart.cudaGraphExecDestroy(self.graph)
        self.graph, self.graph_batch = None, None


class TensorRTEngine(StageEngine):
    """Runs `tensorrt/<stage>.plan`: load, activate, allocate buffers, infer (in the TensorRT diffusion demo's manner).

    Inputs are copied into static device buffers sized for the engine's largest batch; smaller batches use the leading
    rows, and a batch below the profile's minimum is padded with zero rows. With `cuda_graphs`, repeated calls at one
    batch size replay a CUDA graph (see `GraphRunner`).
    """

    backend = "tensorrt"

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device, cuda_graphs: bool = True):
        super().__init__(folder, stage, device)
        self.require(self.device)
        self.device = cuda_device(self.device)
        self._check_fits()
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        with torch.cuda.device(self.device):
            self._load()
            self._activate(cuda_graphs)
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
                              bf16_supported(self.device))
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
        self._io = io_tensors(self._trt, self._engine)
        problems = io_problems(self._io, self.stage)
        if problems:
            raise EngineUnavailable(f"{path}: the engine does not match manifest.json ({'; '.join(problems)}); "
                                    f"re-export the folder with ffclip-export")

    def _activate(self, cuda_graphs: bool) -> None:
        context = self._engine.create_execution_context()
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for the {self.stage.name} stage")
        self._context = context
        self._stream = torch.cuda.Stream(self.device)
        self._graphs = GraphRunner(context, self._cudart, cuda_graphs, self.stage.name)
        self._shape_batch: int | None = None

    def _allocate_buffers(self) -> None:
        self._set_shapes(self.max_batch)
        self._buffers: dict[str, torch.Tensor] = {}
        for t in self._io:
            shape = t.profile[2] if t.is_input else tuple(self._context.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT left the shape of {t.name} unresolved: {shape}")
            self._buffers[t.name] = torch.empty(shape, dtype=DTYPES[t.dtype], device=self.device)
            if not self._context.set_tensor_address(t.name, self._buffers[t.name].data_ptr()):
                raise RuntimeError(f"TensorRT refused the buffer of {t.name}")

    def _set_shapes(self, batch: int) -> None:
        if batch == self._shape_batch:
            return
        self._graphs.shapes_changed()
        self._shape_batch = None
        for t in self._io:
            if t.is_input:
                shape = (batch, *t.profile[2][1:])
                if not self._context.set_input_shape(t.name, shape):
                    raise RuntimeError(f"TensorRT refused the shape {shape} for {t.name} of the {self.stage.name} stage")
        self._shape_batch = batch

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = next(iter(inputs.values())).shape[0]
        run_batch = profile_batch(batch, self.stage.min_batch, self.max_batch)
        with torch.cuda.device(self.device):
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for name, x in inputs.items():
                    self._buffers[name][:batch].copy_(x, non_blocking=True)
                    self._buffers[name][batch:run_batch].zero_()
                self._set_shapes(run_batch)
                self._graphs.infer(run_batch, self._stream.cuda_stream)
                outputs = {t.name: self._buffers[t.name][:batch].clone() for t in self.stage.outputs}
            self._stream.synchronize()
        return outputs

    def _release(self) -> None:
        with torch.cuda.device(self.device):
            self._graphs.drop()
            del self._buffers, self._context, self._engine, self._runtime
            torch.cuda.empty_cache()
