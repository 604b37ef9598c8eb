"""Export of the tiny configuration (and the 256-px random preset, slow): files, manifest, parity, atomic replacement."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from export_fixtures import TINY

from ffclip.export import onnx_export
from ffclip.export.exporter import ExportFailed, ExportOptions, export_artifacts
from ffclip.artifacts import MANIFEST
from ffclip.errors import InputError
from ffclip.factory import build_preset

# openvino is built from the ONNX file, so asking for it builds that too
OPTIONS = ExportOptions(formats=("torchscript", "openvino"), min_batch=1, opt_batch=3, max_batch=8)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "artifacts"
    report = export_artifacts(build_preset(TINY), folder, OPTIONS, preset="tiny", sources={})
    return folder, report


def test_every_stage_and_format_is_built_or_skipped_with_reason(tiny_export):
    _, report = tiny_export
    by = {(o.stage, o.format): o for o in report.outcomes}
    for stage in ("text_encoder", "mapper", "generator"):
        assert by[stage, "onnx"].status == "built"
        assert by[stage, "torchscript"].status == "built"
        assert by[stage, "openvino"].status == "built", by[stage, "openvino"].detail
        assert by[stage, "tensorrt"].status == "skipped" and by[stage, "tensorrt"].detail == "not requested (--formats)"
    assert set(report.manifest["stages"]["generator"]["files"]) == {"eager", "onnx", "torchscript", "openvino"}


def test_a_request_of_formats_none_of_which_build_here_is_refused_before_any_work(tmp_path):
    options = ExportOptions(formats=("tensorrt",), device=torch.device("cpu"))
    with pytest.raises(InputError, match="--formats tensorrt: none of them can be built here .*tensorrt: "):
        export_artifacts(build_preset(TINY), tmp_path / "out", options, preset="tiny", sources={})
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_shapes_hashes_parity_and_surgery(tiny_export):
    folder, report = tiny_export
    manifest = json.loads((folder / MANIFEST).read_text())
    assert report.manifest_sha256 == hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    assert manifest["batch"] == {"min": 1, "opt": 3, "max": 8}
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "tensorrt"}
    gen = manifest["stages"]["generator"]
    assert gen["outputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert gen["onnx"]["nodes_after_surgery"] <= gen["onnx"]["nodes_before_surgery"]
    assert gen["parity"]["onnx"]["ok"] and gen["parity"]["onnx"]["batch_sizes"] == [1, 3]
    for name in ("onnx/generator.onnx", "torchscript/mapper.pt", "text_encoder.safetensors"):
        assert len(manifest["files"][name]) == 64


def test_failed_export_leaves_older_folder_and_no_temporary(tiny_export, monkeypatch):
    folder, _ = tiny_export
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(onnx_export, "build", broken)
    with pytest.raises(ExportFailed, match="simulated failure"):
        export_artifacts(build_preset(TINY), folder, OPTIONS, preset="tiny", sources={})
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


@pytest.mark.slow
def test_demo_preset_exports(tmp_path):
    from ffclip.config import get_preset

    options = ExportOptions(formats=("onnx",), min_batch=1, opt_batch=2, max_batch=4)
    report = export_artifacts(build_preset(get_preset("random")), tmp_path / "demo", options, preset="random", sources={})
    assert not report.failed
    assert torch.tensor([report.manifest["stages"][s]["parity"]["onnx"]["ok"] for s in report.manifest["stages"]]).all()


def test_large_models_keep_their_weights_in_external_data(tmp_path, monkeypatch):
    """Past protobuf's 2 GB limit the weights go to `<file>.data`; the limit is lowered here to exercise that path."""
    import onnxruntime

    from ffclip.export import onnx_export
    from ffclip.export.stages import stage_specs

    generator = build_preset(TINY)[2]
    spec = stage_specs(*build_preset(TINY)[:2], generator)["generator"]
    monkeypatch.setattr(onnx_export, "_PROTOBUF_LIMIT", (1 << 24) + 1)
    result = onnx_export.export_onnx(spec, generator, tmp_path / "generator.onnx")
    data = tmp_path / "generator.onnx.data"
    assert result.external_data and data in result.files
    assert data.stat().st_size > (tmp_path / "generator.onnx").stat().st_size
    w = spec.example_inputs(2)["w"]
    session = onnxruntime.InferenceSession(str(tmp_path / "generator.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"w": w.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(out) - generator(w)).abs().max() <= 1e-3


def test_a_refused_folder_costs_no_loading(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    loads = []
    with pytest.raises(InputError, match="pass --force"):
        export_artifacts(lambda: loads.append(1), tmp_path / "mine", OPTIONS, preset="tiny", sources={})
    assert not loads and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
