"""The benchmarked backends: whether each can run here, and the `Runtime` that serves each one.

Every backend is a `ffclip.runtime.Runtime` (the one edit path) and runs the same calls on the same inputs (`call`).
eager and compile run the PyTorch modules as an `EditPipeline`; torchscript, onnxruntime, tensorrt, triton and
openvino run exported artifacts through `Runtime.load`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ffclip.artifacts import BACKENDS as SERVED_BACKENDS
from ffclip.artifacts import PRECISIONS as PRECISION_DTYPES
from ffclip.artifacts import STAGES as EXPORTED_STAGES
from ffclip.artifacts import StageInfo, read_manifest
from ffclip.engines import EngineUnavailable, engine_class

if TYPE_CHECKING:  # the runtime imports torch's compiler, and with it Triton, which `--gpu-check --dry-run` must not
    from ffclip.runtime import Runtime

STAGES = ("text", "mapper", "generator", "edit")
# backends served from an artifact folder through `Runtime.load`
RUNTIME_BACKENDS = tuple(b for b in SERVED_BACKENDS if b != "eager")
BACKENDS = ("eager", "torchscript", "compile", *RUNTIME_BACKENDS[1:])
PRECISIONS = tuple(PRECISION_DTYPES)
# the export each runtime backend needs: one folder per group, so a format that fails leaves the others usable;
# triton runs the eager weights that every export folder holds, so any group serves it
EXPORT_GROUPS = {"torchscript": ("torchscript",), "onnxruntime": ("onnx",), "openvino": ("onnx", "openvino"),
                 "tensorrt": ("onnx", "tensorrt")}


def skip_reason(backend: str, precision: str, device: torch.device) -> str | None:
    """Why `backend` at `precision` cannot be benchmarked on `device` here, or None when it can.

    Only cheap checks that need no model: installed packages, the device type, a C++ compiler for torch.compile.
    """
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if backend in ("tensorrt", "triton") and device.type != "cuda":
        if backend == "triton":
            return "no CUDA device; the Triton interpreter is not a benchmark"
        return "TensorRT needs a CUDA device"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if precision == "fp16" and device.type == "cpu":
        return "fp16 on the CPU is not meaningful: no fast half-precision kernels there"
    if backend == "torchscript" and precision != "fp32" and device.type == "cpu":
        return "TorchScript artifacts are traced in fp32 on the CPU; reduced precision runs in the eager backend"
    if backend == "onnxruntime" and precision != "fp32":
        return "the exported ONNX files are fp32 graphs; reduced precision is built by TensorRT"
    if backend == "compile" and device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile on the CPU needs a C++ compiler and none was found"
    if backend == "openvino":
        from ffclip.export.openvino_export import openvino_skip_reason

        reason = openvino_skip_reason(precision)  # the exporter builds no openvino files then
        if reason is not None:
            return reason
    if backend in RUNTIME_BACKENDS:
        return _engine_reason(backend, device)
    return None


def export_group(backends: tuple[str, ...] | list[str], backend: str) -> tuple[str, ...]:
    """The formats of the export folder that serves `backend`, given every runtime backend being benchmarked."""
    if backend in EXPORT_GROUPS:
        return EXPORT_GROUPS[backend]
    # triton shares a folder that is exported anyway, or else takes the quickest one
    for other in ("torchscript", "onnxruntime", "tensorrt"):
        if other in backends:
            return EXPORT_GROUPS[other]
    return EXPORT_GROUPS["torchscript"]


def _engine_reason(backend: str, device: torch.device) -> str | None:
    """The engine's own verdict on `device`, or why the runtime cannot serve `backend` at all."""
    try:
        return engine_class(backend).availability(device)
    except EngineUnavailable as exc:
        return str(exc)


def call(stages: Runtime, stage: str, inputs: dict[str, Any]) -> torch.Tensor:
    """Run `stage` on the cell's inputs (`prompts`, `latents`, `embeddings`); the edit gives float images."""
    if stage == "text":
        return stages.encode_text(inputs["prompts"])
    if stage == "mapper":
        return stages.modulate(inputs["latents"], inputs["embeddings"])
    if stage == "generator":
        return stages.synthesize(inputs["latents"], as_float=True)
    return torch.cat(list(stages.edited(inputs["latents"], inputs["prompts"])))


def stage_flops(stages: Runtime, inputs: dict[str, Any], names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """FLOPs per item of each stage in `names` (convolutions and matrix products, as counted by torch's
    FlopCounterMode on the eager modules), from one call on `inputs` divided by its batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = len(inputs["prompts"])
    flops = {}
    for name in names:
        with FlopCounterMode(display=False) as counter:
            call(stages, name, inputs)
        flops[name] = counter.get_total_flops() / batch
    return flops


def build_modules(preset: str, device: torch.device, artifacts: Path | None = None) -> tuple[Any, Any, Any]:
    """(text encoder, mapper, generator) on `device`: the eager weights of an artifact folder when one is given (so
    every backend runs the same weights), else `preset`'s default weights: the trained ones it ships (the world's), or
    seeded random ones."""
    if artifacts is not None:
        from ffclip.checkpoints.bundle import load_module

        manifest = read_manifest(artifacts, verify=False)
        loaded = []
        for name in EXPORTED_STAGES:
            with StageInfo.from_manifest(manifest, name).checked_file(artifacts, "eager") as path:
                loaded.append(load_module(path))
        modules = tuple(loaded)
    else:
        from ffclip.checkpoints import load_generator, load_mapper, load_text_encoder

        modules = (load_text_encoder(preset=preset), load_mapper(preset=preset), load_generator(preset=preset))
    text_encoder, mapper, generator = modules
    return text_encoder.to(device), mapper.to(device), generator.to(device)


def module_stages(modules: tuple[Any, Any, Any], device: torch.device, precision: str, compiled: bool) -> Runtime:
    """An `EditPipeline` of the modules (with `compiled`, each through torch.compile, one static graph per input
    shape, so a new batch size compiles once and never turns an earlier graph into a dynamic one) at `precision`, its
    prompt cache off so the text stage is computed on every call."""
    from ffclip.pipeline import EditPipeline

    if compiled:
        modules = tuple(torch.compile(m, dynamic=False) for m in modules)
    return EditPipeline(*modules, device=device, precision=precision, cache_size=0)


@contextlib.contextmanager
def open_stages(
    backend: str, preset: str, device: torch.device, precision: str, artifacts: Path | None,
    expected_sha256: str | None = None,
) -> Iterator[Runtime]:
    """The `Runtime` of `backend`, closed on exit, on `artifacts` pinned by `expected_sha256` when given. eager and
    compile use the folder's weights when one is given."""
    from ffclip.runtime import Runtime

    if backend in RUNTIME_BACKENDS:
        if artifacts is None:
            raise RuntimeError(f"the {backend} backend needs an artifact folder")
        stages = Runtime.load(artifacts, backend=backend, device=device, cache_size=0, expected_sha256=expected_sha256)
    else:
        modules = build_modules(preset, device, artifacts)
        stages = module_stages(modules, device, precision, compiled=backend == "compile")
    try:
        yield stages
    finally:
        stages.close()
