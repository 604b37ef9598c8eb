"""The OpenVINO format and backend on the tiny configuration: export, manifest, parity with eager, modes, threads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from export_fixtures import TINY

from ffclip.checkpoints.bundle import load_module
from ffclip.engines.base import EngineUnavailable, StageInfo
from ffclip.export.exporter import ExportOptions, export_artifacts
from ffclip.artifacts import MANIFEST, ArtifactError, read_manifest
from ffclip.export.parity import errors
from ffclip.export.stages import MAPPER_TOLERANCE
from ffclip.factory import build_preset
from ffclip.runtime import Runtime

pytest.importorskip("openvino", reason="OpenVINO is not installed (the ffclip[openvino] extra)")

from ffclip.engines.openvino import OpenVinoEngine, bf16_reason  # noqa: E402
from ffclip.export.openvino_export import openvino_skip_reason  # noqa: E402

OPTIONS = ExportOptions(formats=("onnx", "openvino"), min_batch=1, opt_batch=2, max_batch=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "tiny"
    report = export_artifacts(build_preset(TINY), out, OPTIONS, preset="tiny", sources={})
    assert {(o.stage, o.status) for o in report.outcomes if o.format == "openvino"} == {
        ("text_encoder", "built"), ("mapper", "built"), ("generator", "built")}
    return out


@pytest.fixture(scope="module")
def runtimes(folder):
    rts = {b: Runtime.load(folder, b, "cpu") for b in ("eager", "openvino")}
    yield rts
    for rt in rts.values():
        rt.close()


def _latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, TINY.mapper.num_ws, 512, generator=torch.Generator().manual_seed(100 + n + seed))


def _engine(folder, stage: str, **kwargs) -> OpenVinoEngine:
    return OpenVinoEngine(folder, StageInfo.from_manifest(read_manifest(folder), stage), torch.device("cpu"), **kwargs)


def test_manifest_lists_and_hashes_the_ir_files_with_an_explicit_fp32_hint(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    for stage in ("text_encoder", "mapper", "generator"):
        entry = manifest["stages"][stage]
        assert entry["files"]["openvino"] == f"openvino/{stage}.xml"
        assert entry["openvino"]["inference_precision"] == "f32"
        assert entry["openvino"]["weights"] == f"openvino/{stage}.bin"
        assert entry["parity"]["openvino"]["ok"]
        for name in (entry["files"]["openvino"], entry["openvino"]["weights"]):
            assert len(manifest["files"][name]) == 64


def test_openvino_agrees_with_eager_on_every_stage(folder, runtimes):
    ref, rt = runtimes["eager"], runtimes["openvino"]
    prompts = ["a smiling face", "blond hair", "an old man"]
    e_ref = ref.encode_text(prompts)
    assert (rt.encode_text(prompts) - e_ref).abs().max() <= 1e-4 * e_ref.abs().max()
    for n in (1, 3):  # latency mode, then throughput mode
        w = _latents(n)
        assert (rt.synthesize(w, as_float=True) - ref.synthesize(w, as_float=True)).abs().max() <= 1e-3
    # the mapper is ill-conditioned in float32: held against float64 as the exporter does (ffclip.export.parity)
    w = _latents(3)
    mapper64 = load_module(folder / "mapper.safetensors").double()
    with torch.no_grad():
        w_edit64 = mapper64(w.double(), e_ref.double())
    assert errors(rt.modulate(w, e_ref), w_edit64)[1] <= MAPPER_TOLERANCE.value


def test_auto_prefers_openvino_on_the_cpu(folder):
    with Runtime.load(folder, "auto", "cpu") as rt:
        assert rt.backend == "openvino"


def test_latency_and_throughput_modes_give_the_same_images(folder):
    w = _latents(5, seed=1)
    latency, pool = _engine(folder, "generator", mode="latency"), _engine(folder, "generator", mode="throughput")
    with latency, pool:
        assert latency.mode_for(5) == "latency" and pool.mode_for(1) == "throughput"
        torch.testing.assert_close(pool.run({"w": w})["image"], latency.run({"w": w})["image"], rtol=0, atol=1e-5)
    with _engine(folder, "generator", threads=1) as auto:
        assert auto.mode_for(1) == "latency" and auto.mode_for(2) == "throughput"


def test_concurrent_calls_give_the_serial_results(folder, runtimes):
    rt = runtimes["openvino"]
    inputs = [_latents(n, seed=2) for n in (1, 2, 1, 3, 1, 2)]
    serial = [rt.synthesize(w) for w in inputs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(rt.synthesize, inputs))
    for a, b in zip(parallel, serial):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_closed_engine_refuses_calls(folder):
    engine = _engine(folder, "mapper")
    engine.close()
    with pytest.raises(EngineUnavailable, match="closed"):
        engine.run({"w": _latents(1), "embedding": torch.randn(1, 512)})


def test_changed_weights_file_is_refused(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    weights = copy / "openvino" / "generator.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="generator.bin"):
        Runtime.load(copy, "openvino", "cpu")


def test_a_stage_without_openvino_files_is_one_line(folder):
    import dataclasses

    info = StageInfo.from_manifest(read_manifest(folder), "mapper")
    info = dataclasses.replace(info, files={k: v for k, v in info.files.items() if k != "openvino"})
    with pytest.raises(ArtifactError, match="no openvino artifact for the mapper stage; re-export"):
        OpenVinoEngine(folder, info, torch.device("cpu"))


def test_openvino_serves_only_the_cpu():
    assert "cpu" in OpenVinoEngine.availability(torch.device("cuda"))
    assert OpenVinoEngine.availability(torch.device("cpu")) is None


@pytest.fixture(params=[False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def has_bf16(request, monkeypatch) -> bool:
    """This CPU made to report BF16 among its capabilities, or not, whatever it has."""
    import ffclip.engines.openvino as engine

    capabilities = ["FP32", "BF16"] if request.param else ["FP32"]
    monkeypatch.setattr(engine, "cpu_capabilities", lambda: ("Test CPU", capabilities))
    return request.param


def test_reduced_precisions_the_cpu_lacks_are_refused_in_one_line(has_bf16):
    reason = openvino_skip_reason("fp16")
    assert "fp32 or bf16" in reason and "\n" not in reason
    assert openvino_skip_reason("fp32") is None
    if has_bf16:
        assert openvino_skip_reason("bf16") is None and bf16_reason() is None
    else:
        reason = openvino_skip_reason("bf16")
        assert "Test CPU" in reason and "AVX-512 BF16 nor AMX" in reason and "--precision fp32" in reason
        assert "\n" not in reason


def test_a_bf16_ir_is_refused_only_on_a_cpu_without_bf16(folder, has_bf16):
    manifest = read_manifest(folder)
    manifest["stages"]["generator"]["openvino"]["inference_precision"] = "bf16"
    info = StageInfo.from_manifest(manifest, "generator")
    if has_bf16:
        with OpenVinoEngine(folder, info, torch.device("cpu")) as engine:
            assert engine._precision == "bf16"
    else:
        with pytest.raises(EngineUnavailable, match="Test CPU.*AVX-512 BF16 nor AMX.*--precision fp32"):
            OpenVinoEngine(folder, info, torch.device("cpu"))


def test_bf16_images_are_close_to_fp32(folder, tmp_path):
    reason = bf16_reason()
    if reason is not None:
        print(f"bf16 not tested: {reason}")
        pytest.skip(f"bf16 not tested: {reason}")
    out = tmp_path / "bf16"
    options = ExportOptions(precision="bf16", formats=("onnx", "openvino"), min_batch=1, opt_batch=2, max_batch=4)
    report = export_artifacts(build_preset(TINY), out, options, preset="tiny", sources={})
    stages = report.manifest["stages"]
    assert stages["generator"]["openvino"]["inference_precision"] == "bf16"
    assert stages["mapper"]["openvino"]["inference_precision"] == "f32"
    w = _latents(4, seed=3)
    with Runtime.load(out, "openvino", "cpu") as bf16, Runtime.load(folder, "openvino", "cpu") as fp32:
        assert (bf16.synthesize(w, as_float=True) - fp32.synthesize(w, as_float=True)).abs().mean() <= 0.02
