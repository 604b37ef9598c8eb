"""The benchmark's CPU peak estimate and FLOP counts behind its `% peak` column, and openvino in its backend list."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import TINY

from ffclip.benchmarks import machine, report
from ffclip.benchmarks.backends import BACKENDS, EXPORT_GROUPS, module_stages, skip_reason, stage_flops
from ffclip.benchmarks.runner import Benchmark, Cell, Settings
from ffclip.factory import build_preset


@pytest.mark.parametrize(
    ("flags", "vendor", "family", "per_cycle"),
    [
        ({"avx", "avx2", "fma", "avx512f"}, "GenuineIntel", 6, 64),
        ({"avx", "avx2", "fma", "avx512f"}, "AuthenticAMD", 25, 32),  # Zen 4: AVX-512 on 256-bit pipes
        ({"avx", "avx2", "fma", "avx512f"}, "AuthenticAMD", 26, 64),  # Zen 5
        ({"avx", "avx2", "fma"}, "AuthenticAMD", 23, 32),
        ({"avx"}, "GenuineIntel", 6, 16),
        ({"sse2"}, "GenuineIntel", 6, 8),
    ],
)
def test_flops_per_cycle_follow_the_widest_vector_unit(flags, vendor, family, per_cycle):
    assert machine.fp32_flops_per_cycle(flags, vendor, family)[0] == per_cycle


def test_peak_is_cores_times_clock_times_flops_per_cycle(monkeypatch):
    info = {"model name": "Some CPU @ 2.50GHz", "flags": "fpu avx avx2 fma", "vendor_id": "GenuineIntel",
            "cpu family": "6"}
    monkeypatch.setattr(machine, "_cpuinfo_field", info.get)
    monkeypatch.setattr(machine.psutil, "cpu_count", lambda logical=True: 4)
    machine.cpu_fp32_peak.cache_clear()
    try:
        peak = machine.cpu_fp32_peak()
    finally:
        machine.cpu_fp32_peak.cache_clear()
    assert peak["gflops"] == pytest.approx(4 * 2.5 * 32)
    assert peak["how"].startswith("4 cores x 2.5 GHz x 32 FLOP/cycle")


def test_stage_flops_are_per_item_and_add_up_over_the_edit():
    modules = build_preset(TINY)
    stages = module_stages(modules, torch.device("cpu"), "fp32", compiled=False)
    latents = torch.randn(2, TINY.mapper.num_ws, 512, generator=torch.Generator().manual_seed(0))
    inputs = {"prompts": ["a", "b"], "latents": latents, "embeddings": torch.randn(2, 512)}
    flops = stage_flops(stages, inputs, ("text", "mapper", "generator", "edit"))
    one = stage_flops(stages, {k: v[:1] for k, v in inputs.items()}, ("generator",))
    assert flops["generator"] == pytest.approx(one["generator"]) and flops["generator"] > 0
    assert flops["edit"] == pytest.approx(flops["text"] + flops["mapper"] + flops["generator"])


def test_peak_column_is_printed_for_cpu_rows():
    row = Cell("generator", "openvino", "fp32", 8).row(
        "ok", median_ms=100.0, p90_ms=110.0, p99_ms=120.0, n=3, throughput=80.0, gflops=240.0, peak_frac=0.5,
        memory_mib=1.0, max_abs_err=1e-6)
    cells = dict(zip(report.MEASURED_HEADER, report.measured_cells(row)))
    assert cells["% peak"] == "50.0"
    assert cells["backend"] == "openvino"


def test_openvino_is_benchmarked_from_its_own_export():
    assert "openvino" in BACKENDS and EXPORT_GROUPS["openvino"] == ("onnx", "openvino")


@pytest.fixture
def openvino_here(monkeypatch):
    """OpenVINO installed and able to run on this CPU, whatever this machine has; bf16 refused by its CPU."""
    from ffclip.engines import openvino
    from ffclip.export import openvino_export

    for module in (openvino, openvino_export):
        monkeypatch.setattr(module, "openvino_reason", lambda: None)
    monkeypatch.setattr(openvino_export, "bf16_reason", lambda: "this CPU (test CPU) has neither AVX-512 BF16 nor AMX")


def test_openvino_is_skipped_where_the_exporter_builds_no_openvino_files(openvino_here, monkeypatch):
    from ffclip.engines import openvino

    cpu = torch.device("cpu")
    assert skip_reason("openvino", "fp32", cpu) is None
    assert skip_reason("openvino", "bf16", cpu) == ("bf16 refused: this CPU (test CPU) has neither AVX-512 BF16 nor "
                                                    "AMX; export the openvino format with --precision fp32")
    assert skip_reason("openvino", "fp16", cpu) == ("fp16 on the CPU is not meaningful: no fast half-precision kernels "
                                                    "there")
    assert skip_reason("openvino", "fp32", torch.device("cuda")) == ("ffclip runs OpenVINO on the CPU only; use the "
                                                                     "device cpu")
    monkeypatch.setattr(openvino, "openvino_reason", lambda: "OpenVINO is not installed")
    assert skip_reason("openvino", "fp32", cpu) == "OpenVINO is not installed"


def test_a_folder_exported_in_fp16_is_said_to_hold_no_openvino_files(openvino_here, monkeypatch, tmp_path):
    from ffclip import artifacts
    from ffclip.export.openvino_export import openvino_skip_reason

    # what `ffclip-export --precision fp16` records: ONNX files, and OpenVINO skipped with the exporter's reason
    skipped = openvino_skip_reason("fp16")
    assert skipped.startswith("OpenVINO on the CPU computes in fp32 or bf16, or quantized to int8, not fp16")
    entry = {"files": {"eager": "stage.safetensors", "onnx": "onnx/stage.onnx"},
             "status": {"onnx": "built", "openvino": f"skipped: {skipped}"}}
    manifest = {"precision": "fp16", "stages": {stage: entry for stage in artifacts.STAGES}}
    monkeypatch.setattr(artifacts, "read_manifest", lambda folder, verify=True: manifest)
    settings = Settings(preset="tiny", device="cpu", stages=("mapper",), backends=("openvino",), batches=(1,),
                        precisions=("fp32", "fp16"), warmup=0, iters=1, budget_s=0.0, artifacts=tmp_path)
    bench = Benchmark(settings)
    assert [c.precision for c in bench.runnable["openvino"]] == ["fp32"]  # fp16 on the CPU is refused before
    assert bench._source("openvino", "fp32", {}) == (
        "skipped", f"{tmp_path} holds no openvino artifacts (text_encoder openvino: skipped: {skipped}); export fp32 "
                   "ones for this row")
