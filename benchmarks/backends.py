"""The benchmarked backends: whether each can run here, and the three stage functions each one offers.

Every backend exposes the same calls on the same inputs: `text(prompts)`, `mapper(latents, embeddings)` and
`generator(latents)`; the end-to-end `edit(prompts, latents)` chains the three. Outputs are float tensors on any
device. eager and compile run the PyTorch modules; torchscript, onnxruntime, tensorrt, triton and openvino run
exported artifacts through `ffclip.runtime.Runtime`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ffclip.export.stages import STAGES as EXPORTED_STAGES
from ffclip.export.stages import compute_precision

STAGES = ("text", "mapper", "generator", "edit")
BACKENDS = ("eager", "torchscript", "compile", "onnxruntime", "openvino", "tensorrt", "triton")
PRECISIONS = ("fp32", "fp16", "bf16")
# backends served from an artifact folder through `ffclip.runtime.Runtime`
RUNTIME_BACKENDS = ("torchscript", "onnxruntime", "openvino", "tensorrt", "triton")
# the export each runtime backend needs: one folder per group, so a format that fails leaves the others usable;
# triton runs the eager weights that every export folder holds, so any group serves it
EXPORT_GROUPS = {"torchscript": ("torchscript",), "onnxruntime": ("onnx",), "openvino": ("onnx", "openvino"),
                 "tensorrt": ("onnx", "tensorrt")}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
        from ffclip.engines import EngineUnavailable, engine_class
    except ImportError:
        return "ffclip.engines is not available in this installation"
    try:
        return engine_class(backend).availability(device)
    except EngineUnavailable as exc:
        return str(exc)


class StageSet:
    """The three stage functions of one backend at one precision, and the chained edit."""

    def __init__(
        self,
        text: Callable[[list[str]], torch.Tensor],
        mapper: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        generator: Callable[[torch.Tensor], torch.Tensor],
        close: Callable[[], None] = lambda: None,
    ):
        self.text = text
        self.mapper = mapper
        self.generator = generator
        self.close = close

    def edit(self, prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
        return self.generator(self.mapper(latents, self.text(prompts)))

    def call(self, stage: str, inputs: dict[str, Any]) -> torch.Tensor:
        """Run `stage` on the cell's inputs (`prompts`, `latents`, `embeddings`)."""
        if stage == "text":
            return self.text(inputs["prompts"])
        if stage == "mapper":
            return self.mapper(inputs["latents"], inputs["embeddings"])
        if stage == "generator":
            return self.generator(inputs["latents"])
        return self.edit(inputs["prompts"], inputs["latents"])


def stage_flops(stages: StageSet, inputs: dict[str, Any], names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """FLOPs per item of each stage in `names` (convolutions and matrix products, as counted by torch's
    FlopCounterMode on the eager modules), from one call on `inputs` divided by its batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = len(inputs["prompts"])
    flops = {}
    for name in names:
        with FlopCounterMode(display=False) as counter:
            stages.call(name, inputs)
        flops[name] = counter.get_total_flops() / batch
    return flops


def _autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[precision])


def build_modules(preset: str, device: torch.device, artifacts: Path | None = None) -> tuple[Any, Any, Any]:
    """(text encoder, mapper, generator) on `device`: the eager weights of an artifact folder when one is given (so
    every backend runs the same weights), else `preset`'s seeded weights."""
    if artifacts is not None:
        from ffclip.checkpoints.bundle import load_module
        from ffclip.engines import StageInfo
        from ffclip.export.manifest import read_manifest

        manifest = read_manifest(artifacts, verify=False)
        loaded = []
        for name in EXPORTED_STAGES:
            with StageInfo.from_manifest(manifest, name).checked_file(artifacts, "eager") as path:
                loaded.append(load_module(path))
        modules = tuple(loaded)
    else:
        from ffclip.config import get_preset
        from ffclip.factory import build_preset

        modules = build_preset(get_preset(preset))
    text_encoder, mapper, generator = modules
    return text_encoder.to(device), mapper.to(device), generator.to(device)


def module_stages(modules: tuple[Any, Any, Any], device: torch.device, precision: str, compiled: bool) -> StageSet:
    """eager (or, with `compiled`, torch.compile) stages of the modules; reduced precision runs under autocast, for
    the stages the export policy computes in it (not the mapper)."""
    text_encoder, mapper, generator = modules
    text_fn, mapper_fn, generator_fn = text_encoder, mapper, generator
    if compiled:
        text_fn, mapper_fn, generator_fn = (torch.compile(m) for m in (text_encoder, mapper, generator))
    autocast = _autocast(device, precision)
    mapper_autocast = _autocast(device, compute_precision("mapper", precision))

    @torch.inference_mode()
    def text(prompts: list[str]) -> torch.Tensor:
        tokens = text_encoder.tokenize(prompts).to(device)
        with autocast():
            return text_fn(tokens)

    @torch.inference_mode()
    def run_mapper(latents: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        with mapper_autocast():
            return mapper_fn(latents, embeddings)

    @torch.inference_mode()
    def run_generator(latents: torch.Tensor) -> torch.Tensor:
        with autocast():
            return generator_fn(latents)

    return StageSet(text, run_mapper, run_generator)


def runtime_stages(folder: Path, backend: str, device: torch.device) -> StageSet:
    """Stages served by `ffclip.runtime.Runtime` from the artifact `folder`; its prompt cache is off, so the text
    stage is computed on every call."""
    from ffclip.runtime import Runtime

    runtime = Runtime.load(folder, backend=backend, device=device, cache_size=0)
    return StageSet(runtime.encode_text, runtime.modulate, runtime.synthesize, close=runtime.close)


@contextlib.contextmanager
def open_stages(
    backend: str, preset: str, device: torch.device, precision: str, artifacts: Path | None
) -> Iterator[StageSet]:
    """The stages of `backend`, released on exit. eager and compile use the folder's weights when one is given."""
    if backend in RUNTIME_BACKENDS:
        if artifacts is None:
            raise RuntimeError(f"the {backend} backend needs an artifact folder")
        stages = runtime_stages(artifacts, backend, device)
    else:
        modules = build_modules(preset, device, artifacts)
        stages = module_stages(modules, device, precision, compiled=backend == "compile")
    try:
        yield stages
    finally:
        stages.close()
