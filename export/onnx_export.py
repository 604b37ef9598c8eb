"""ONNX export of one stage (dynamic batch), graph surgery for TensorRT, and saving with external data past 2 GB."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from ffclip.export.options import DEFAULT_OPSET, ExportOptions
from ffclip.export.stages import Boundary, StageSpec

# protobuf cannot serialise a message of 2 GiB or more; larger models keep their weights in one side file
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class OnnxResult:
    """What one ONNX export produced."""

    files: tuple[Path, ...]
    nodes_before: int
    nodes_after: int
    external_data: bool


def skip_reason(options: ExportOptions) -> str | None:
    """ONNX export runs wherever torch does."""
    return None


def build(spec: StageSpec, module: nn.Module, folder: Path, options: ExportOptions, entry: dict[str, Any]) -> None:
    """Write `onnx/<stage>.onnx`, a float32 graph whatever the export's precision, and its facts."""
    path = folder / "onnx" / f"{spec.name}.onnx"
    result = export_onnx(spec, module, path, options.opset)
    entry["files"]["onnx"] = path.relative_to(folder).as_posix()
    entry["onnx"] = {
        "opset": options.opset,
        "nodes_before_surgery": result.nodes_before,
        "nodes_after_surgery": result.nodes_after,
        "external_data": result.external_data,
    }


def export_onnx(spec: StageSpec, module: nn.Module, path: Path, opset: int = DEFAULT_OPSET,
                dtype: torch.dtype = torch.float32) -> OnnxResult:
    """Export `module` (CPU) to `path` with a dynamic batch axis, run the surgery and the checker. The graph computes
    in `dtype` (the module is converted in place) behind float32 inputs and outputs."""
    example = spec.example_inputs(2)
    args = tuple(example[n] for n in spec.input_names)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Boundary(module.cpu().float().eval(), dtype),
            args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=(tuple({0: batch} for _ in args),),
            optimize=False,
            verbose=False,
        )
    model = program.model_proto
    before = len(model.graph.node)
    model = surgery(model, spec.input_names, spec.output_names)
    external = save_onnx(model, path)
    onnx.checker.check_model(str(path))
    files = (path, path.with_name(path.name + ".data")) if external else (path,)
    return OnnxResult(files, before, len(model.graph.node), external)


def surgery(model: onnx.ModelProto, input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    """Name the graph's inputs and outputs, drop Identity and no-op Cast nodes, fold constants (shapes included),
    remove dead nodes and sort topologically."""
    graph = gs.import_onnx(model)
    _rename_boundary(graph, input_names, output_names)
    outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op == "Identity" or (node.op == "Cast" and _is_noop_cast(node)):
            out = node.outputs[0]
            if id(out) in outputs:
                continue
            for consumer in list(out.outputs):
                for i, tensor in enumerate(consumer.inputs):
                    if tensor is out:
                        consumer.inputs[i] = node.inputs[0]
            node.outputs.clear()
    graph.cleanup()
    import onnxruntime

    # constant folding evaluates subgraphs in ONNX Runtime, whose optimiser notices are not for users
    onnxruntime.set_default_logger_severity(3)
    graph.fold_constants(fold_shapes=True)
    _narrow_double_constants(graph)
    graph.cleanup().toposort()
    result = gs.export_onnx(graph)
    result.ir_version = model.ir_version
    return result


def _rename_boundary(graph: gs.Graph, input_names: list[str], output_names: list[str]) -> None:
    """Give the graph's inputs and outputs the spec's names. Names are set here rather than by the exporter, which can
    reuse a wanted name for an inner value (the text tower's token `embedding`) and so produce a cyclic graph."""
    boundary = list(graph.inputs) + list(graph.outputs)
    wanted = set(input_names) | set(output_names)
    for name, tensor in graph.tensors().items():
        if name in wanted and all(tensor is not t for t in boundary):
            tensor.name = f"{name}_inner"
    for tensor, name in zip(boundary, input_names + output_names):
        tensor.name = name


def _narrow_double_constants(graph: gs.Graph) -> None:
    """float64 constants that only give a value to `CastLike` (Python scalars in the traced code) become float32:
    TensorRT has no float64 tensors, and the cast narrows them to float32 or less anyway."""
    for tensor in graph.tensors().values():
        if (isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float64 and tensor.outputs
                and all(n.op == "CastLike" and n.inputs[0] is tensor for n in tensor.outputs)):
            tensor.values = tensor.values.astype(np.float32)


def _is_noop_cast(node: gs.Node) -> bool:
    src = node.inputs[0].dtype
    if src is None:
        return False
    return onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]) == src


def save_onnx(model: onnx.ModelProto, path: Path) -> bool:
    """Write `model`; weights go to `<path>.data` when the model would pass protobuf's 2 GB limit. True if so."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weights >= _PROTOBUF_LIMIT - (1 << 24)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    return external


class _quiet_exporter:
    """Raise the `torch.onnx` logger to ERROR during one export, so its progress messages are not shown."""

    def __enter__(self) -> None:
        self._level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("torch.onnx").setLevel(self._level)
