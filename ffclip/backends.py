"""Every backend in one record, and the precision policy (DESIGN §6, §9).

A backend runs the stages of an artifact folder through one kind of engine. Its record says which artifact it reads,
where its engine and (for an artifact that an export builds) its builder live, whether `auto` may open it without a
pin, and where it computes a reduced precision. The exporter, the runtime, the command line and the benchmark loop over
`REGISTRY`; none of them names a backend. `compute_precision` is the only place that decides what a stage computes in.

This module imports nothing else of the project, so every layer may read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Precisions a backend reaches by quantizing its artifact after training (no torch dtype computes them)
QUANTIZED_PRECISIONS = ("int8",)
# every precision an export may be asked for, and that a manifest may record a stage computing in
EXPORT_PRECISIONS: tuple[str, ...] = (*PRECISIONS, *QUANTIZED_PRECISIONS)
# Stages that compute in float32 whatever precision is asked: the mapper (0.1% of an edit's arithmetic) misses its
# parity bound in fp16 and bf16, where its output is mostly rounding noise (DESIGN §4.2, §9).
FLOAT32_STAGES = ("mapper",)
# How an int8 export quantizes a stage where a backend computes int8 (`quantized_on`): "full" quantizes the weights
# and activations of every convolution and matrix product, "mixed" all but the first and last, and "weights" the
# weights alone (stored int8, computed in float). Stages not named compute in float32 at int8. Measured with OpenVINO
# on a 2-core Xeon with AMX: the text encoder with int8 weights is within 1.6% of float32 (world preset); the
# generator is kept float: with int8 activations ("full" or "mixed", 300 mapped latents) the world's edit accuracy fell
# from 93.8% to 15.5% and the 256-px random generator was off by 6.5 grey levels on average (bf16: 0.6) while running
# no faster than bf16 (0.98x at batch 8), and its int8 weights alone ruined its images (76.6 grey levels off).
INT8_MODES: dict[str, str] = {"text_encoder": "weights"}
QUANTIZATION_MODES = ("full", "mixed", "weights")
# The bundle of each stage's weights that every export writes; the eager and triton backends read it.
EAGER_ARTIFACT = "eager"


@dataclass(frozen=True)
class Backend:
    """One backend. `engine` and `builder` are "module:name" references, imported only when used, so a backend's
    packages (TensorRT, OpenVINO, Triton) are never imported unless it is asked for."""

    name: str
    # the key of the manifest's per-stage "files" it reads
    artifact: str
    engine: str
    # device types on which it computes a requested fp16/bf16 (elsewhere float32)
    reduced_on: tuple[str, ...]
    # its artifact holds data only (no program): `auto` may open it in a folder that is not pinned
    data_only: bool
    # device types on which `auto` considers it; `auto` tries backends in `REGISTRY` order
    auto_on: tuple[str, ...] = ()
    # the exporter's builder of `artifact` (None: the eager bundle, which every export writes)
    builder: str | None = None
    # the artifact that `builder` converts (TensorRT and OpenVINO build from the ONNX file)
    built_from: str | None = None
    # device types on which its kernels run in an interpreter: correct, but no measure of speed
    interpreted_on: tuple[str, ...] = ()
    # the device type an export checks its artifact on (None: the export's device)
    check_on: str | None = None
    # device types on which it computes a requested int8 (`INT8_MODES`)
    quantized_on: tuple[str, ...] = ()

    def engine_class(self) -> Any:
        """The `StageEngine` subclass (imported now)."""
        return _resolve(self.engine)

    def build_module(self) -> Any:
        """The exporter's module for `artifact` (imported now): it holds `skip_reason(options)`, why this machine
        cannot build the artifact, and `build(spec, module, folder, options, entry)`, which writes it and records its
        file and facts in the stage's manifest `entry`."""
        if self.builder is None:
            raise ValueError(f"the {self.name} backend reads the eager bundle; no export builds it")
        return importlib.import_module(self.builder)

    def check_device(self, device: torch.device) -> torch.device:
        """The device an export on `device` checks this backend's artifact on."""
        return device if self.check_on is None else torch.device(self.check_on)


REGISTRY: tuple[Backend, ...] = (
    Backend("tensorrt", "tensorrt", "ffclip.engines.tensorrt:TensorRTEngine", ("cuda",), False,
            auto_on=("cuda",), builder="ffclip.export.tensorrt_build", built_from="onnx"),
    Backend("openvino", "openvino", "ffclip.engines.openvino:OpenVinoEngine", ("cpu",), True,
            auto_on=("cpu",), builder="ffclip.export.openvino_export", built_from="onnx", check_on="cpu",
            quantized_on=("cpu",)),
    Backend("onnxruntime", "onnx", "ffclip.engines.onnxruntime:OnnxRuntimeEngine", (), True,
            auto_on=("cpu", "cuda"), builder="ffclip.export.onnx_export", check_on="cpu"),
    Backend("torchscript", "torchscript", "ffclip.engines.torchscript:TorchScriptEngine", ("cuda",), False,
            auto_on=("cpu", "cuda"), builder="ffclip.export.torchscript_export"),
    Backend("eager", EAGER_ARTIFACT, "ffclip.engines.eager:EagerEngine", ("cpu", "cuda"), True,
            auto_on=("cpu", "cuda")),
    Backend("triton", EAGER_ARTIFACT, "ffclip.engines.triton:TritonEngine", ("cpu", "cuda"), True,
            interpreted_on=("cpu",)),
)
BACKENDS: dict[str, Backend] = {b.name: b for b in REGISTRY}
# the artifacts an export can be asked for (`--formats`), in build order: what a format is built from comes first
FORMATS: tuple[str, ...] = (tuple(b.artifact for b in REGISTRY if b.builder is not None and b.built_from is None)
                             + tuple(b.artifact for b in REGISTRY if b.builder is not None and b.built_from is not None))


def by_artifact(artifact: str) -> Backend:
    """The backend that reads `artifact` and whose export builds it (the eager bundle: the eager backend)."""
    return next(b for b in REGISTRY if b.artifact == artifact and (b.builder is not None or artifact == EAGER_ARTIFACT))


def needed_artifacts(artifact: str) -> tuple[str, ...]:
    """`artifact` and those it is built from, in build order."""
    chain = [artifact]
    while (source := by_artifact(chain[0]).built_from) is not None:
        chain.insert(0, source)
    return tuple(chain)


def stage_precision(stage: str, requested: str) -> str:
    """The precision `stage` computes in where a backend computes the requested precision."""
    return "fp32" if stage in FLOAT32_STAGES else requested


def compute_precision(stage: str, backend_name: str, requested: str, device: torch.device | str) -> str:
    """What `stage` computes in on backend `backend_name` for an export at `requested` precision, on `device`: the
    policy. The mapper always computes in float32; a backend computes fp16/bf16 only on the device types of its
    `reduced_on` (ONNX files are float32 graphs; TorchScript is traced in reduced precision on CUDA only; eager and
    triton autocast on any device; TensorRT builds its own reduced graph; OpenVINO sets its CPU inference precision),
    and int8 only on those of its `quantized_on`, for the stages of `INT8_MODES` (elsewhere float32)."""
    record = BACKENDS[backend_name]
    if requested in QUANTIZED_PRECISIONS:
        quantized = torch.device(device).type in record.quantized_on and stage in INT8_MODES
        return requested if quantized else "fp32"
    if torch.device(device).type not in record.reduced_on:
        return "fp32"
    return stage_precision(stage, requested)


def quantization_mode(stage: str, backend_name: str, requested: str, device: torch.device | str) -> str | None:
    """How backend `backend_name` quantizes `stage` for an export at `requested` on `device` (an `INT8_MODES` value),
    or None where the stage computes in float."""
    if compute_precision(stage, backend_name, requested, device) in QUANTIZED_PRECISIONS:
        return INT8_MODES[stage]
    return None


def precision_refusal(backend_name: str, requested: str, device: torch.device | str) -> str | None:
    """Why an export at `requested` on `device` does not build the artifact of backend `backend_name` (one line), or
    None when it does. At int8 a backend that does not quantize keeps only the float32 files that are needed anyway:
    the eager bundle every export writes, and the file a quantizing backend is built from (the ONNX file)."""
    record = BACKENDS[backend_name]
    if requested not in QUANTIZED_PRECISIONS or torch.device(device).type in record.quantized_on:
        return None
    if record.artifact == EAGER_ARTIFACT or any(b.built_from == record.artifact and b.quantized_on for b in REGISTRY):
        return None
    quantizers = ", ".join(b.name for b in REGISTRY if b.quantized_on)
    return (f"{record.name} does not compute {requested} (only {quantizers} does); export {record.artifact} at "
            f"{' or '.join(PRECISIONS)}")


def _resolve(reference: str) -> Any:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)
