"""ffclip-bench at int8: only the backends that quantize run it, from a folder whose quantized stage names it."""

from __future__ import annotations

import pytest
from cli_runner import run_bench as _bench_main

from ffclip import artifacts
from ffclip.benchmarks import report
from ffclip.benchmarks.runner import Cell, Settings, held_precision, plan


@pytest.fixture
def openvino_quantizes_here(monkeypatch):
    """OpenVINO installed, and able to quantize on this CPU, whatever this machine has."""
    from ffclip.engines import openvino
    from ffclip.export import openvino_export

    for module in (openvino, openvino_export):
        monkeypatch.setattr(module, "openvino_reason", lambda: None)
    monkeypatch.setattr(openvino_export, "int8_reason", lambda: None)


def test_int8_runs_the_quantizing_backend_and_skips_the_others(openvino_quantizes_here):
    settings = Settings(preset="random", device="cpu", stages=("text", "generator"),
                        backends=("eager", "onnxruntime", "openvino"), batches=(1,), precisions=("fp32", "int8"),
                        warmup=0, iters=1, budget_s=0.0)
    runnable, skipped = plan(settings)
    assert [c for c in runnable["openvino"] if c.precision == "int8"] == [
        Cell("text", "openvino", "int8", 1), Cell("generator", "openvino", "int8", 1)]
    int8_skipped = {r["backend"]: r["reason"] for r in skipped if r["precision"] == "int8"}
    assert sorted(int8_skipped) == ["eager", "onnxruntime"]
    assert all(reason.startswith(f"the {backend} backend computes no stage in int8 on cpu")
               and "openvino does" in reason for backend, reason in int8_skipped.items())


def test_an_int8_folder_is_held_at_int8_though_its_generator_stays_float():
    def manifest(text: str, generator: str) -> dict:
        precisions = {"text_encoder": text, "generator": generator}
        return {"stages": {stage: {"compute_precision": {"openvino": precisions.get(stage, "fp32")}}
                           for stage in artifacts.STAGES}}

    assert held_precision(manifest("int8", "fp32"), "openvino") == "int8"
    assert held_precision(manifest("bf16", "bf16"), "openvino") == "bf16"
    assert held_precision(manifest("bf16", "fp32"), "openvino") == "mixed"


def test_int8_is_a_precision_the_command_line_accepts_when_asked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench_main(["--precision", "int4"])
    assert exit_info.value.code == 2
    assert "choose from fp32,fp16,bf16,int8" in capsys.readouterr().err
    # nothing to measure (TensorRT on the CPU): quick, and the row names int8
    with pytest.raises(SystemExit) as exit_info:
        _bench_main(["--backends", "tensorrt", "--stages", "mapper", "--precision", "int8", "--device", "cpu",
                     "--out", str(tmp_path / "run")])
    assert "nothing was measured" in capsys.readouterr().err
    rows = report.load_results(tmp_path / "run" / "results.json")["rows"]
    assert rows and all((r["precision"], r["status"]) == ("int8", "skipped") for r in rows)
