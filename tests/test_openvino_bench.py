"""The benchmark's CPU peak estimate and FLOP counts behind its `% peak` column, and openvino in its backend list."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import TINY

from ffclip.benchmarks import machine, report
from ffclip.benchmarks.backends import BACKENDS, EXPORT_GROUPS, module_stages, stage_flops
from ffclip.benchmarks.runner import Cell
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
