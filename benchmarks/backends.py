"""The benchmarked backends: whether each can run here, and the `Runtime` that serves each one.

Every backend is a `ffclip.runtime.Runtime` (the one edit path) and runs the same calls on the same inputs (`call`).
eager and compile run the PyTorch modules as an `EditPipeline`; torchscript, onnxruntime, tensorrt, triton and
openvino run exported artifacts through `Runtime.load`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ffclip.artifacts import STAGES as EXPORTED_STAGES
from ffclip.backends import BACKENDS as RECORDS
from ffclip.backends import EXPORT_PRECISIONS, INT8_MODES, QUANTIZED_PRECISIONS, REGISTRY, Backend, by_artifact
from ffclip.backends import PRECISIONS as PRECISION_DTYPES
from ffclip.backends import compute_precision, needed_artifacts
from ffclip.engines import EngineUnavailable, engine_class

if TYPE_CHECKING:  # the runtime imports torch's compiler, and with it Triton, which `--gpu-check --dry-run` must not
    from ffclip.runtime import Runtime

# what the bench times: each exported stage alone (the text encoder as "text") and the whole edit
TIMED_STAGES = ("text", "mapper", "generator", "edit")
# the eager modules through torch.compile: a backend of the benchmark only, over the eager backend's weights
COMPILE = "compile"
# backends served from an artifact folder through `Runtime.load`; the eager backend runs the modules in process
RUNTIME_BACKENDS = tuple(b.name for b in REGISTRY if b.name != "eager")
BACKENDS = ("eager", COMPILE, *RUNTIME_BACKENDS)
# every precision a cell may be asked for; the default runs the float ones, int8 (a quantized export, OpenVINO only)
# when asked for
PRECISIONS = EXPORT_PRECISIONS
DEFAULT_PRECISIONS = tuple(PRECISION_DTYPES)
# the formats of the export each runtime backend needs: one folder per group, so a format that fails leaves the
# others usable; a backend that reads the eager weights (triton) is served by any folder, since every export has them
EXPORT_GROUPS = {b.name: needed_artifacts(b.artifact) for b in REGISTRY if b.builder is not None}


def skip_reason(backend: str, precision: str, device: torch.device) -> str | None:
    """Why `backend` at `precision` cannot be benchmarked on `device` here, or None when it can.

    Only cheap checks that need no model: the backend's record and its engine's verdict on the device, the precision
    policy, whether the exporter can build its files here, a C++ compiler for torch.compile.
    """
    if backend == COMPILE and device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile on the CPU needs a C++ compiler and none was found"
    record = RECORDS["eager" if backend == COMPILE else backend]
    if device.type in record.interpreted_on:
        return f"the {backend} kernels run in an interpreter on {device.type}: correct, but not a benchmark"
    reason = _engine_reason(record.name, device)
    if reason is not None:
        return reason
    if precision == "fp16" and device.type == "cpu":
        return "fp16 on the CPU is not meaningful: no fast half-precision kernels there"
    if precision in QUANTIZED_PRECISIONS:
        if not any(compute_precision(stage, record.name, precision, device) == precision for stage in INT8_MODES):
            quantizers = ", ".join(b.name for b in REGISTRY if device.type in b.quantized_on) or "no backend"
            return (f"the {backend} backend computes no stage in {precision} on {device.type} "
                    f"(ffclip.backends.compute_precision; {quantizers} does)")
    elif precision != "fp32" and compute_precision("generator", record.name, precision, device) == "fp32":
        return (f"the {backend} backend computes in fp32 on {device.type} whatever the export's precision "
                f"(ffclip.backends.compute_precision); reduced precision runs in the eager backend")
    if record.builder is not None:
        return _export_reason(record, precision, device)
    return None


def export_group(backends: tuple[str, ...] | list[str], backend: str) -> tuple[str, ...]:
    """The formats of the export folder that serves `backend`, given every runtime backend being benchmarked."""
    if backend in EXPORT_GROUPS:
        return EXPORT_GROUPS[backend]
    # a backend of the eager weights shares a folder that is exported anyway, or else takes a single-format one
    for other in backends:
        if other in EXPORT_GROUPS:
            return EXPORT_GROUPS[other]
    return next(group for group in EXPORT_GROUPS.values() if len(group) == 1)


def _export_reason(record: Backend, precision: str, device: torch.device) -> str | None:
    """Why the exporter builds no files of `record`'s artifact (or of one it is built from) at `precision` here."""
    from ffclip.export.exporter import ExportOptions

    options = ExportOptions(precision=precision, formats=(record.artifact,), device=device)
    for artifact in needed_artifacts(record.artifact):
        reason = by_artifact(artifact).build_module().skip_reason(options)
        if reason is not None:
            return reason
    return None


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


def build_modules(preset: str, device: torch.device, artifacts: Path | None = None,
                  expected_sha256: str | None = None) -> tuple[Any, Any, Any]:
    """(text encoder, mapper, generator) on `device`: the eager weights of an artifact folder (pinned by
    `expected_sha256`) when one is given, so every backend runs the same weights, else `preset`'s default weights:
    the trained ones it ships (the world's), or seeded random ones."""
    from ffclip.stages import StageSources, load_modules

    return load_modules(StageSources(preset=preset), device, artifacts, expected_sha256)


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
    from ffclip.stages import StageSources
    from ffclip.stages import open_stages as open_runtime

    if backend in RUNTIME_BACKENDS:
        if artifacts is None:
            raise RuntimeError(f"the {backend} backend needs an artifact folder")
        stages = open_runtime(StageSources(preset=preset), device, artifacts, backend, expected_sha256, cache_size=0)
    else:
        modules = build_modules(preset, device, artifacts, expected_sha256)
        stages = module_stages(modules, device, precision, compiled=backend == "compile")
    try:
        yield stages
    finally:
        stages.close()
