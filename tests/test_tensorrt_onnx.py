"""The graphs TensorRT builds from: precision-planned per stage, and made only of what its ONNX parser accepts
(checked against the parser's published operator list kept in `ffclip.export.tensorrt_operators`)."""

from __future__ import annotations

import copy

import onnx
import pytest

from ffclip.export import tensorrt_operators
from ffclip.export.onnx_export import export_onnx
from ffclip.export.stages import stage_specs
from ffclip.export.tensorrt_build import export_precision_onnx, precision_onnx_path, unsupported_nodes
from ffclip.factory import build_preset

from export_fixtures import TINY

FLOAT = onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The graphs of an fp16 TensorRT build: every stage's precision-planned graph (the mapper's is its float32 one).
    An fp32 build reads the float32 graphs, which hold the same operators less the widening casts."""
    folder = tmp_path_factory.mktemp("onnx")
    modules = [m.cpu().float().eval() for m in build_preset(TINY)]
    found = {}
    for (name, spec), module in zip(stage_specs(*modules).items(), modules):
        path = export_precision_onnx(spec, module, folder, "fp16", 18)
        assert path == precision_onnx_path(folder, name, "fp16")
        if name == "mapper":
            assert path.name == "mapper.onnx" and not path.exists()  # nothing planned: it is the float32 graph
            export_onnx(spec, copy.deepcopy(module), path)
        found[name] = onnx.load(str(path))
    return found


def test_every_graph_uses_only_what_the_tensorrt_parser_accepts(graphs):
    for name, model in graphs.items():
        assert unsupported_nodes(model) == [], name


def test_reduced_precision_graphs_keep_float32_io_and_the_mapper_stays_float32(graphs):
    for name in ("text_encoder", "generator"):
        model = graphs[name]
        floats = [t.type.tensor_type.elem_type for t in (*model.graph.input, *model.graph.output)
                  if t.type.tensor_type.elem_type != onnx.TensorProto.INT64]
        assert floats and set(floats) == {FLOAT}, name
        weights = [t.data_type for t in model.graph.initializer if t.data_type in (FLOAT, onnx.TensorProto.FLOAT16)]
        assert weights.count(onnx.TensorProto.FLOAT16) > weights.count(FLOAT), name
        assert any(n.op_type == "Cast" for n in model.graph.node), name
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in graphs["mapper"].graph.initializer)


def test_the_checker_names_what_the_parser_refuses():
    node = onnx.helper.make_node("Unique", ["x"], ["y"], name="u")
    bits = onnx.helper.make_node("BitShift", ["a", "b"], ["c"], name="s", direction="LEFT")
    graph = onnx.helper.make_graph(
        [node, bits], "g",
        [onnx.helper.make_tensor_value_info("x", FLOAT, [3]),
         onnx.helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [3]),
         onnx.helper.make_tensor_value_info("b", onnx.TensorProto.UINT8, [3])],
        [onnx.helper.make_tensor_value_info("y", FLOAT, None), onnx.helper.make_tensor_value_info("c", onnx.TensorProto.UINT8, [3])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 25)])
    lo, hi = tensorrt_operators.OPSET_RANGE
    assert unsupported_nodes(model) == [f"opset 25 is outside {lo}..{hi}", "Unique (u)", "BitShift (s)"]
    assert "Unique" in tensorrt_operators.UNSUPPORTED and "Conv" in tensorrt_operators.SUPPORTED
