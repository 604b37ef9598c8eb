"""Artifact folders crafted to break the engines, and pinning: each problem is one line (exit 2 from the CLI), `auto`
falls back to the next backend where that one can serve, and code-bearing formats are opened unpinned only with a
warning."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from cli_runner import run_bench, run_cli
from micro_preset import export_micro

from ffclip.artifacts import MANIFEST, sha256, write_manifest
from ffclip.cli import COMMANDS, _load
from ffclip.runtime import Runtime


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_micro(tmp_path_factory.mktemp("hostile") / "micro")


@pytest.fixture
def folder(exported, tmp_path) -> Path:
    """A private copy of the exported folder, free to break."""
    return Path(shutil.copytree(exported, tmp_path / "micro"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _rewrite(folder: Path, manifest: dict) -> None:
    """Write `manifest` with `files` hashed again, as an export would have written it."""
    write_manifest(folder, {k: v for k, v in manifest.items() if k != "files"})


def _add_format(folder: Path, fmt: str, files: dict[str, bytes]) -> None:
    """Give every stage the artifact `fmt` made of `files` (relative name -> bytes; `{stage}` in a name is the stage's
    name), the first file being the one the manifest's stage entry names."""
    manifest = _manifest(folder)
    for stage, entry in manifest["stages"].items():
        for i, (name, data) in enumerate(files.items()):
            path = folder / name.format(stage=stage)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if i == 0:
                entry["files"][fmt] = name.format(stage=stage)
    _rewrite(folder, manifest)


def _edit(monkeypatch, capsys, folder: Path, *args: str) -> tuple[int, str]:
    code, _, err = run_cli(monkeypatch, capsys, "edit", "--artifacts", folder, "--device", "cpu", "--num", "1",
                           "--prompt", "a hat", "--out", folder.parent / "edit.png", *args)
    return code, err


def _one_line_error(code: object, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert ": error: " in err and err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_an_unknown_tensor_dtype_is_one_line(monkeypatch, capsys, folder):
    manifest = _manifest(folder)
    manifest["stages"]["mapper"]["inputs"][0]["dtype"] = "complex128"
    _rewrite(folder, manifest)
    _one_line_error(*_edit(monkeypatch, capsys, folder, "--backend", "eager"), "complex128", "re-export")


def test_a_manifest_nested_too_deep_is_one_line(monkeypatch, capsys, folder):
    (folder / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    _one_line_error(*_edit(monkeypatch, capsys, folder), "nested too deeply", "re-export")


@pytest.mark.parametrize(("section", "value", "fragment"), [
    ("compute_precision", {"eager": "fp8"}, "'fp8'"),
    ("compute_precision", "fp32", "'compute_precision' must be an object"),
    ("torchscript", ["cpu"], "'torchscript' must be an object"),
    ("torchscript", {"device": "abacus"}, "'abacus'"),
])
def test_malformed_engine_sections_are_one_line(monkeypatch, capsys, folder, section, value, fragment):
    manifest = _manifest(folder)
    manifest["stages"]["generator"][section] = value
    _rewrite(folder, manifest)
    _one_line_error(*_edit(monkeypatch, capsys, folder, "--backend", "eager"), fragment)


def _custom_op_model(stage: str) -> bytes:
    """An ONNX model whose one node comes from an operator domain ONNX Runtime does not know."""
    from onnx import TensorProto, helper

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.custom")
    graph = helper.make_graph([node], stage, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def test_an_onnx_custom_operator_is_one_line_and_auto_falls_back(monkeypatch, capsys, folder):
    pytest.importorskip("onnxruntime")
    _add_format(folder, "onnx", {"onnx/{stage}.onnx": _custom_op_model("stage")})
    _one_line_error(*_edit(monkeypatch, capsys, folder, "--backend", "onnxruntime"), "com.example.custom",
                    "onnx/text_encoder.onnx")
    with Runtime.load(folder, "auto", "cpu") as runtime:
        assert runtime.backend == "eager"


def _openvino_ir(tmp: Path) -> tuple[bytes, bytes]:
    """(xml, bin) of a small OpenVINO IR adding a 4-float constant, its `.bin` cut short of the constant's end."""
    import numpy as np
    import openvino as ov

    x = ov.opset13.parameter([-1, 4], ov.Type.f32, name="x")
    model = ov.Model([ov.opset13.add(x, ov.opset13.constant(np.arange(4, dtype=np.float32)))], [x], "cut")
    ov.save_model(model, tmp / "cut.xml", compress_to_fp16=False)
    return (tmp / "cut.xml").read_bytes(), (tmp / "cut.bin").read_bytes()[:-4]


def test_an_openvino_constant_past_the_end_of_its_weights_is_one_line_and_auto_falls_back(
        monkeypatch, capsys, folder, tmp_path):
    pytest.importorskip("openvino")
    xml, weights = _openvino_ir(tmp_path)
    _add_format(folder, "openvino", {"openvino/{stage}.xml": xml, "openvino/{stage}.bin": weights})
    _one_line_error(*_edit(monkeypatch, capsys, folder, "--backend", "openvino"), "openvino/text_encoder.xml",
                    "re-export")
    with Runtime.load(folder, "auto", "cpu") as runtime:
        assert runtime.backend == "eager"


def test_an_openvino_precision_the_engine_does_not_know_is_one_line(monkeypatch, capsys, folder, tmp_path):
    pytest.importorskip("openvino")
    xml, _ = _openvino_ir(tmp_path)
    _add_format(folder, "openvino", {"openvino/{stage}.xml": xml, "openvino/{stage}.bin": (tmp_path / "cut.bin")
                                     .read_bytes()})
    manifest = _manifest(folder)
    manifest["stages"]["mapper"]["openvino"] = {"inference_precision": "f64"}
    _rewrite(folder, manifest)
    _one_line_error(*_edit(monkeypatch, capsys, folder, "--backend", "openvino"), "'f64'")


def test_every_command_with_artifacts_takes_a_pin():
    taking = []
    for name in COMMANDS:
        params = {p.name for p in _load(name).params}
        if "artifacts" in params:
            taking.append(name)
            assert "expect_sha256" in params, f"ffclip {name} takes --artifacts but not --expect-sha256"
    assert {"edit", "invert", "serve", "bench", "eval-world"} <= set(taking)


def test_code_bearing_formats_opened_unpinned_warn_on_stderr(monkeypatch, capsys, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, err = _edit(monkeypatch, capsys, folder, "--backend", "torchscript")
    assert code == 0, err
    assert "ffclip: warning:" in err and "not pinned" in err and "--expect-sha256" in err


def test_a_pinned_folder_opens_code_bearing_formats_without_a_warning(monkeypatch, capsys, folder):
    pin = sha256(folder / MANIFEST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.load(folder, "torchscript", "cpu", expected_sha256=pin).close()
        code, err = _edit(monkeypatch, capsys, folder, "--backend", "torchscript", "--expect-sha256", pin.upper())
    assert code == 0 and "warning" not in err, err


@pytest.mark.parametrize(("pin", "fragment"), [("0" * 64, "is not the pinned"), ("abc", "64 hexadecimal digits")])
def test_a_wrong_or_malformed_pin_is_one_line(monkeypatch, capsys, folder, pin, fragment):
    _one_line_error(*_edit(monkeypatch, capsys, folder, "--backend", "eager", "--expect-sha256", pin), fragment)
    assert not (folder.parent / "edit.png").exists()


def test_the_pin_reaches_the_other_commands(monkeypatch, capsys, folder, tmp_path):
    from PIL import Image

    wrong = "0" * 64
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64)).save(photos / "face.png")
    code, _, err = run_cli(monkeypatch, capsys, "invert", "--images", photos, "--artifacts", folder,
                           "--expect-sha256", wrong, "--out", tmp_path / "w.npy", "--device", "cpu")
    _one_line_error(code, err, "is not the pinned")
    for command in ("eval-world", "serve"):
        code, _, err = run_cli(monkeypatch, capsys, command, "--artifacts", folder, "--expect-sha256", wrong)
        _one_line_error(code, err, "is not the pinned")
    with pytest.raises(SystemExit) as bench:
        run_bench(["--artifacts", str(folder), "--expect-sha256", wrong, "--out", str(tmp_path / "bench")])
    _one_line_error(bench.value.code, capsys.readouterr().err, "ffclip-bench: error:", "is not the pinned")
    assert not (tmp_path / "w.npy").exists() and not (tmp_path / "bench").exists()


def test_a_pin_without_a_folder_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "edit", "--expect-sha256", "0" * 64, "--prompt", "a hat",
                           "--out", tmp_path / "edit.png")
    _one_line_error(code, err, "--expect-sha256 pins the --artifacts folder")
    assert not (tmp_path / "edit.png").exists()
