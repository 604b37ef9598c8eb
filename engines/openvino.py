"""The OpenVINO backend: an OpenVINO IR stage compiled for the CPU, in latency or throughput mode.

A batch of one runs in latency mode (one stream using every thread); a larger batch is split across the infer
requests of a throughput-mode model (several streams) and run asynchronously. Each mode is compiled on first use,
with `threads` threads or, by default, as many as torch uses (`torch.set_num_threads`).
The IR's inference precision ("f32" or "bf16") comes from the manifest and is always set explicitly, since OpenVINO
would otherwise compute in bf16 on CPUs that support it.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ffclip.artifacts import MANIFEST, ArtifactError, StageInfo
from ffclip.engines.base import EngineUnavailable, StageEngine
from ffclip.errors import summarize

MODES = ("auto", "latency", "throughput")
# inference precision hint per ffclip precision name; an int8 model computes its layers left in float in f32
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def openvino_reason() -> str | None:
    """Why OpenVINO cannot run here (not installed), or None."""
    if importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (install the ffclip[openvino] extra)"
    return None


def cpu_capabilities() -> tuple[str, list[str]]:
    """The name of this CPU and its capabilities ("FP32", "BF16", ...) as OpenVINO reports them, with "VNNI" and
    "AMX" added where the CPU has AVX-512 VNNI or AMX tiles (OpenVINO reports "INT8" on any CPU)."""
    import openvino as ov

    core = ov.Core()
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    capabilities += [name for name, present in (("VNNI", torch.cpu._is_vnni_supported()),
                                                ("AMX", torch.cpu._is_amx_tile_supported())) if present]
    return core.get_property("CPU", "FULL_DEVICE_NAME"), capabilities


def bf16_reason() -> str | None:
    """Why OpenVINO cannot compute in bf16 on this CPU, or None when it can (AVX-512 BF16 or AMX)."""
    reason = openvino_reason()
    if reason is not None:
        return reason
    name, capabilities = cpu_capabilities()
    if "BF16" in capabilities:
        return None
    return f"this CPU ({name}) has neither AVX-512 BF16 nor AMX"


def int8_reason() -> str | None:
    """Why OpenVINO cannot compute int8 quickly on this CPU, or None when it can (AVX-512 VNNI or AMX); without them
    an int8 model runs slower than float32."""
    reason = openvino_reason()
    if reason is not None:
        return reason
    name, capabilities = cpu_capabilities()
    if "VNNI" in capabilities or "AMX" in capabilities:
        return None
    return f"this CPU ({name}) has neither AVX-512 VNNI nor AMX"


class OpenVinoEngine(StageEngine):
    """Runs `openvino/<stage>.xml` on the CPU; compiled models are safe to share, each call takes its own requests."""

    backend = "openvino"
    thread_safe = True

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device, threads: int | None = None,
                 mode: str = "auto"):
        super().__init__(folder, stage, device)
        if mode not in MODES:
            raise ValueError(f"unknown OpenVINO mode {mode!r}; choose from {', '.join(MODES)}")
        import openvino as ov

        self._precision = stage.entry.get("openvino", {}).get("inference_precision", "f32")
        if self._precision not in INFERENCE_PRECISIONS.values():
            raise ArtifactError(f"{folder / MANIFEST}: the {stage.name} OpenVINO model's inference precision "
                                f"{self._precision!r} is none of {', '.join(INFERENCE_PRECISIONS.values())}; "
                                f"re-export with ffclip-export --out {folder}")
        if self._precision == "bf16":
            reason = bf16_reason()
            if reason is not None:
                raise EngineUnavailable(
                    f"{folder}: the {stage.name} OpenVINO model computes in bf16, but {reason}; "
                    "re-export with --precision fp32"
                )
        self._quantization = stage.entry.get("openvino", {}).get("quantization")
        if self._quantization is not None:
            reason = int8_reason()
            if reason is not None:
                raise EngineUnavailable(
                    f"{folder}: the {stage.name} OpenVINO model is quantized to int8, but {reason}; "
                    "re-export with --precision fp32"
                )
        self._core = ov.Core()
        # from the checked bytes of the IR and its weights, not from the paths
        model = stage.read(self.folder, self.artifact)
        weights = stage.entry.get("openvino", {}).get("weights", stage.files[self.artifact].removesuffix(".xml") + ".bin")
        weights_bytes = stage.read_listed(self.folder, weights)
        try:
            self._model = self._core.read_model(model, weights_bytes)
        except RuntimeError as exc:
            raise ArtifactError(f"{stage.file(self.folder, self.artifact)}: OpenVINO cannot read it with "
                                f"{self.folder / weights} ({_first_failure(exc)}); re-export with ffclip-export "
                                f"--out {self.folder}") from None
        self._threads = threads
        self._mode = mode
        self._compile_lock = threading.Lock()
        self._compiled: dict[str, Any] = {}
        # latency mode: idle requests, one taken per call (created when none is idle)
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        # throughput mode: one set of requests, used by one call at a time (each call keeps every stream busy)
        self._pool: list[Any] = []
        self._pool_lock = threading.Lock()

    @classmethod
    def availability(cls, device: torch.device) -> str | None:
        reason = openvino_reason()
        if reason is not None:
            return reason
        if device.type != "cpu":
            return "ffclip runs OpenVINO on the CPU only; use the device cpu"
        return None

    def mode_for(self, batch: int) -> str:
        """The mode a call with `batch` rows runs in: latency for one row, throughput for more, unless fixed."""
        if self._mode != "auto":
            return self._mode
        return "latency" if batch == 1 else "throughput"

    def _compiled_model(self, mode: str) -> Any:
        with self._compile_lock:
            if mode not in self._compiled:
                config: dict[str, Any] = {
                    "PERFORMANCE_HINT": mode.upper(),
                    "INFERENCE_PRECISION_HINT": self._precision,
                }
                # the process's thread budget is torch's (set by torch.set_num_threads) unless `threads` is given
                config["INFERENCE_NUM_THREADS"] = self._threads or torch.get_num_threads()
                try:
                    compiled = self._core.compile_model(self._model, "CPU", config)
                except RuntimeError as exc:
                    raise ArtifactError(f"{self.stage.file(self.folder, self.artifact)}: OpenVINO cannot compile it "
                                        f"({_first_failure(exc)}); re-export with ffclip-export --out "
                                        f"{self.folder}") from None
                if mode == "throughput":
                    count = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
                    self._pool = [compiled.create_infer_request() for _ in range(max(1, count))]
                self._compiled[mode] = compiled
            return self._compiled[mode]

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feeds = {n: inputs[n].numpy() for n in self.input_names}
        batch = next(iter(feeds.values())).shape[0]
        mode = self.mode_for(batch)
        compiled = self._compiled_model(mode)
        if mode == "latency":
            outs = self._infer_latency(compiled, feeds)
        else:
            outs = self._infer_throughput(feeds, batch)
        return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs)}

    def _infer_latency(self, compiled: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            request.infer(feeds)
            return [request.get_tensor(n).data.copy() for n in self.output_names]
        finally:
            self._idle.put(request)

    def _infer_throughput(self, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        with self._pool_lock:
            requests = self._pool[: min(batch, len(self._pool))]
            bounds = np.linspace(0, batch, len(requests) + 1).round().astype(int)
            chunks = [{n: np.ascontiguousarray(x[a:b]) for n, x in feeds.items()} for a, b in zip(bounds, bounds[1:])]
            started = []
            try:
                for request, chunk in zip(requests, chunks):
                    request.start_async(chunk)
                    started.append(request)
            finally:
                _wait_all(started)
            parts = [[request.get_tensor(n).data.copy() for n in self.output_names] for request in requests]
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.output_names))]

    def _release(self) -> None:
        self._pool.clear()
        while not self._idle.empty():
            self._idle.get_nowait()
        self._compiled.clear()
        del self._model, self._core


def _first_failure(exc: RuntimeError) -> str:
    """OpenVINO's message in one line: it opens with the source location and puts the failed check after it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[1:3]) or summarize(exc)


def _wait_all(requests: list[Any]) -> None:
    """Wait for every request, so none is still busy when the pool is handed on; then raise the first failure."""
    failures = []
    for request in requests:
        try:
            request.wait()
        except Exception as exc:  # noqa: BLE001 - kept and raised once all have finished
            failures.append(exc)
    if failures:
        raise failures[0]
