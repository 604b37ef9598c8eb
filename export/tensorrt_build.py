"""TensorRT engines from precision-planned ONNX graphs (TensorRT 10 and 11 Python API): a strongly typed network,
one optimisation profile for the batch range, a timing cache kept in the artifact folder, and the build log.

TensorRT 11 has no FP16/BF16 builder flags: the reduced precision is in the graph itself. `onnx/<stage>.<precision>.onnx`
is exported from the module converted to the precision (its own widening casts kept), behind float32 inputs and
outputs, and is read only by TensorRT; the float32 `onnx/<stage>.onnx` stays for ONNX Runtime and OpenVINO. Stages
that compute in float32 at every precision (the mapper) build from the float32 graph.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ffclip.backends import PRECISIONS, stage_precision
from ffclip.engines.tensorrt import bf16_supported, gpu_facts, import_tensorrt, make_logger, tensorrt_reason
from ffclip.export import tensorrt_operators
from ffclip.export.onnx_export import export_onnx
from ffclip.export.options import ExportOptions
from ffclip.export.stages import StageSpec

TIMING_CACHE = "tensorrt/timing.cache"
_WORKSPACE_BYTES = 8 << 30

_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.DOUBLE: "DOUBLE",
}


def skip_reason(options: ExportOptions) -> str | None:
    """Why this machine cannot build TensorRT engines for `options` (no TensorRT, no CUDA device, no bf16)."""
    reason = tensorrt_reason(options.device)
    if reason is None and options.precision == "bf16" and not bf16_supported(options.device):
        reason = "this GPU has no bf16 support"
    return reason


def build(spec: StageSpec, module: nn.Module, folder: Path, options: ExportOptions, entry: dict[str, Any]) -> None:
    """Build `tensorrt/<stage>.plan` from the stage's precision-planned graph, after checking that graph against the
    parser's published operator list, and record the engine's facts."""
    plan = folder / "tensorrt" / f"{spec.name}.plan"
    graph = export_precision_onnx(spec, module, folder, options.precision, options.opset)
    problems = unsupported_nodes(onnx.load(str(graph), load_external_data=False))
    if problems:
        raise RuntimeError(f"{graph.name} holds what TensorRT's ONNX parser {tensorrt_operators.PARSER_RELEASE} does "
                           f"not accept: {'; '.join(problems[:5])}")
    facts = build_engine(spec, graph, plan, folder / "tensorrt" / f"{spec.name}.build.log", folder / TIMING_CACHE,
                         options.precision, options.batch, options.device)
    entry["files"]["tensorrt"] = plan.relative_to(folder).as_posix()
    entry["tensorrt"] = {**facts, "onnx": graph.relative_to(folder).as_posix(),
                         "build_log": f"tensorrt/{spec.name}.build.log", "timing_cache": TIMING_CACHE}


def precision_onnx_path(folder: Path, stage: str, precision: str) -> Path:
    """The graph TensorRT builds `stage` from: `onnx/<stage>.<precision>.onnx`, or the float32 graph."""
    compute = stage_precision(stage, precision)
    return folder / "onnx" / (f"{stage}.onnx" if compute == "fp32" else f"{stage}.{compute}.onnx")


def export_precision_onnx(spec: StageSpec, module: nn.Module, folder: Path, precision: str, opset: int) -> Path:
    """Write the precision-planned graph of one stage when it differs from the float32 one; returns its path."""
    path = precision_onnx_path(folder, spec.name, precision)
    compute = stage_precision(spec.name, precision)
    if compute != "fp32":
        export_onnx(spec, copy.deepcopy(module), path, opset, dtype=PRECISIONS[compute])
    return path


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """What in `model` TensorRT's ONNX parser does not accept, per `tensorrt_operators`: the opset, operators, and the
    element type each node computes on, that of its first input (later inputs are often shapes or indices, and
    comparisons output BOOL) and, for casts, of their output."""
    problems = []
    lo, hi = tensorrt_operators.OPSET_RANGE
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not lo <= entry.version <= hi:
            problems.append(f"opset {entry.version} is outside {lo}..{hi}")
        elif entry.domain not in ("", "ai.onnx"):
            problems.append(f"operator domain {entry.domain!r}")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        accepted = tensorrt_operators.SUPPORTED.get(node.op_type)
        if accepted is None:
            problems.append(f"{node.op_type} ({node.name})")
            continue
        checked = (*node.input[:1], *node.output) if node.op_type in ("Cast", "CastLike") else node.input[:1]
        for name in checked:
            kind = _ONNX_TYPES.get(types.get(name, 0))
            if kind is not None and kind not in accepted:
                problems.append(f"{node.op_type} on {kind} ({node.name})")
    return problems


def load_timing_cache(config: Any, saved: bytes, lines: list[str]) -> Any:
    """Give `config` the saved timing cache when it was made by this TensorRT on this kind of GPU, else a fresh one
    (the mismatch is noted in the build log); returns the cache set."""
    if saved:
        try:
            cache = config.create_timing_cache(saved)
        except Exception as exc:  # an unreadable cache is replaced like a mismatched one
            cache, reason = None, f"unreadable ({exc})"
        else:
            reason = "made by another TensorRT version or GPU"
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
        lines.append(f"[ffclip] the saved timing cache is {reason}; starting a fresh one")
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT refused a fresh timing cache")
    return cache


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
    """Build and serialise the strongly typed engine of one stage from its precision-planned graph `onnx_path`;
    returns the facts the engine is tied to (for the manifest)."""
    trt = import_tensorrt()
    lines: list[str] = []
    logger = make_logger(trt, lines, trt.ILogger.Severity.INFO)
    try:
        with torch.cuda.device(device):
            builder = trt.Builder(logger)
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {problems}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
            # TF32 is on by default; the float32 layers (all of an fp32 build, the mapper in every build) stay IEEE
            config.clear_flag(trt.BuilderFlag.TF32)
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in spec.profile(*batch).items():
                profile.set_shape(name, lo, opt, hi)
            if config.add_optimization_profile(profile) < 0:
                raise RuntimeError(f"TensorRT refused the optimisation profile for batches {batch}")
            load_timing_cache(config, cache_path.read_bytes() if cache_path.is_file() else b"", lines)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise RuntimeError(f"TensorRT failed to build the {spec.name} engine (see {log_path.name})")
            plan_path.parent.mkdir(parents=True, exist_ok=True)
            plan_path.write_bytes(bytes(serialized))
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
            facts = gpu_facts(device)
    finally:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(lines) + "\n")
    return {**facts, "strongly_typed": True, "compute_precision": stage_precision(spec.name, precision)}
