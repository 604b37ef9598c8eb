"""TensorRT engines from the ONNX files (TensorRT 10 Python API): precision flags, one optimisation profile for the
batch range, a timing cache kept in the artifact folder, and the build log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ffclip.engines.tensorrt import gpu_facts, import_tensorrt, make_logger

from .stages import StageSpec

TIMING_CACHE = "tensorrt/timing.cache"
_WORKSPACE_BYTES = 8 << 30


def build_engine(
    spec: StageSpec,
    onnx_path: Path,
    plan_path: Path,
    log_path: Path,
    cache_path: Path,
    precision: str,
    batch: tuple[int, int, int],
    device: torch.device,
) -> dict[str, Any]:
    """Build and serialise the engine of one stage; returns the facts the engine is tied to (for the manifest)."""
    trt = import_tensorrt()
    lines: list[str] = []
    logger = make_logger(trt, lines)
    torch.cuda.set_device(device)
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {problems}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile(*batch).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build the {spec.name} engine (see {log_path.name})")
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(bytes(serialized))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    finally:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(lines) + "\n")
    return gpu_facts(device)
