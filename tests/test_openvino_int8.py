"""int8 OpenVINO export of the tiny configuration: the policy's quantization per stage, its parity, its manifest
record, the engine running it, and the refusals where int8 is not computed."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import TINY

from ffclip.backends import INT8_MODES, compute_precision, precision_refusal
from ffclip.artifacts import read_manifest
from ffclip.engines.base import EngineUnavailable, StageInfo
from ffclip.errors import InputError
from ffclip.export.exporter import ExportOptions, check_buildable, export_artifacts
from ffclip.export.parity import errors
from ffclip.export.stages import stage_specs
from ffclip.factory import build_preset
from ffclip.runtime import Runtime

pytest.importorskip("openvino", reason="OpenVINO is not installed (the ffclip[openvino] extra)")
pytest.importorskip("nncf", reason="NNCF is not installed (the ffclip[openvino] extra)")

import ffclip.engines.openvino as engine  # noqa: E402
from ffclip.export.openvino_export import openvino_skip_reason  # noqa: E402

INT8 = ExportOptions(precision="int8", formats=("onnx", "openvino"), min_batch=1, opt_batch=2, max_batch=2,
                     calibration_samples=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    reason = engine.int8_reason()
    if reason is not None:
        pytest.skip(f"int8 not tested: {reason}")
    modules = build_preset(TINY)
    report = export_artifacts(modules, tmp_path_factory.mktemp("int8") / "tiny", INT8, preset="tiny", sources={})
    return modules, report


@pytest.fixture
def cpu_without_int8(monkeypatch):
    """This CPU made to report neither VNNI nor AMX, whatever it has."""
    monkeypatch.setattr(engine, "cpu_capabilities", lambda: ("Test CPU", ["FP32", "BF16", "INT8"]))


def test_int8_export_is_built_within_its_tolerance(folders):
    _, int8 = folders
    assert not int8.failed
    for stage, entry in int8.manifest["stages"].items():
        parity = entry["parity"]["openvino"]
        assert parity["ok"], (stage, parity)
        if stage in INT8_MODES:
            assert parity["tolerance"]["value"] > 1e-3, stage


def test_manifest_records_the_policy_per_stage_and_format(folders):
    _, int8 = folders
    assert int8.manifest["precision"] == "int8"
    for stage, entry in int8.manifest["stages"].items():
        for fmt, held in entry["compute_precision"].items():
            backend = {"eager": "eager", "onnx": "onnxruntime", "openvino": "openvino"}[fmt]
            assert held == compute_precision(stage, backend, "int8", "cpu"), (stage, fmt)
        assert entry["compute_precision"]["onnx"] == "fp32"
        assert entry["compute_precision"]["openvino"] == ("int8" if stage in INT8_MODES else "fp32")
        assert entry["openvino"]["quantization"] == INT8_MODES.get(stage)


def test_the_engine_runs_the_int8_text_encoder_within_its_tolerance(folders):
    (text_encoder, _, _), int8 = folders
    tokens = text_encoder.tokenize(["red hair", "a smile"])
    info = StageInfo.from_manifest(read_manifest(int8.folder), "text_encoder")
    quantized = engine.OpenVinoEngine(int8.folder, info, torch.device("cpu"))
    try:
        got = quantized.run({"tokens": tokens})["embedding"]
    finally:
        quantized.close()
    with torch.no_grad():
        want = text_encoder(tokens)
    _, rel = errors(got, want)
    assert 0 < rel <= stage_specs(*folders[0])["text_encoder"].tolerance("int8").value
    with Runtime.load(int8.folder, "openvino", "cpu") as runtime:
        w = torch.randn(2, TINY.mapper.num_ws, 512, generator=torch.Generator().manual_seed(5))
        assert runtime.edit(w, ["red hair", "a smile"]).shape == (2, 32, 32, 3)


def test_int8_is_refused_in_one_line_on_a_cpu_without_vnni_or_amx(cpu_without_int8):
    reason = openvino_skip_reason("int8")
    assert "neither AVX-512 VNNI nor AMX" in reason and "\n" not in reason
    assert openvino_skip_reason("fp32") is None
    with pytest.raises(InputError, match="none of them can be built"):
        check_buildable(ExportOptions(precision="int8", formats=("openvino",)))


def test_an_int8_ir_is_refused_by_the_engine_on_a_cpu_without_vnni_or_amx(folders, cpu_without_int8):
    _, int8 = folders
    with pytest.raises(EngineUnavailable, match="quantized to int8"):
        Runtime.load(int8.folder, "openvino", "cpu")


def test_formats_that_do_not_quantize_are_skipped_or_kept_float():
    for backend in ("torchscript", "tensorrt"):
        reason = precision_refusal(backend, "int8", "cpu")
        assert "does not compute int8" in reason and "\n" not in reason
    assert precision_refusal("onnxruntime", "int8", "cpu") is None
    assert compute_precision("generator", "onnxruntime", "int8", "cpu") == "fp32"
    assert compute_precision("generator", "eager", "int8", "cpu") == "fp32"
    assert compute_precision("mapper", "openvino", "int8", "cpu") == "fp32"
    with pytest.raises(InputError, match="does not compute int8"):
        check_buildable(ExportOptions(precision="int8", formats=("torchscript",)))
