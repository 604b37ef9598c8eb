"""`Runtime` over an exported tiny configuration: backends agree, batches split, threads, hash checks, input errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from export_fixtures import TINY

from ffclip.checkpoints.bundle import load_module
from ffclip.errors import InputError
from ffclip.export.parity import FLOAT64_SLACK, errors
from ffclip.imaging import to_uint8
from ffclip.export.exporter import ExportOptions, export_artifacts
from ffclip.export.manifest import ArtifactError
from ffclip.factory import build_preset
from ffclip.runtime import Runtime

BACKENDS = ("eager", "torchscript", "onnxruntime")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "tiny"
    options = ExportOptions(formats=("onnx", "torchscript"), min_batch=1, opt_batch=2, max_batch=4)
    export_artifacts(build_preset(TINY), out, options, preset="tiny", sources={})
    return out


@pytest.fixture(scope="module")
def runtimes(folder):
    rts = {b: Runtime.load(folder, b, "cpu") for b in BACKENDS}
    yield rts
    for rt in rts.values():
        rt.close()


def _latents(n: int) -> torch.Tensor:
    return torch.randn(n, TINY.mapper.num_ws, 512, generator=torch.Generator().manual_seed(n))


def test_backends_agree_on_every_stage_and_edit(folder, runtimes):
    ref = runtimes["eager"]
    w, prompts = _latents(3), ["a smiling face", "blond hair", "an old man"]
    e_ref = ref.encode_text(prompts)
    # The mapper is ill-conditioned in float32 (see ffclip.export.parity): each backend is held against a float64
    # evaluation, within FLOAT64_SLACK times eager float32's own error there.
    mapper64 = load_module(folder / "mapper.safetensors").double()
    with torch.no_grad():
        w_edit64 = mapper64(w.double(), e_ref.double())
    eager_err = errors(ref.modulate(w, e_ref), w_edit64)[1]
    for name in ("torchscript", "onnxruntime"):
        rt = runtimes[name]
        assert (rt.encode_text(prompts) - e_ref).abs().max() <= 1e-4 * e_ref.abs().max()
        assert errors(rt.modulate(w, e_ref), w_edit64)[1] <= max(1e-4, FLOAT64_SLACK * eager_err)
        assert (rt.synthesize(w) - ref.synthesize(w)).abs().max() <= 1e-3
        edited = rt.edit(w, "a smiling face")
        assert edited.dtype == torch.uint8 and edited.shape == (3, 32, 32, 3)
        e = rt.encode_text(["a smiling face"]).expand(3, -1)
        same_latents = to_uint8(ref.synthesize(rt.modulate(w, e)))
        assert (edited.int() - same_latents.int()).abs().max() <= 1


def test_auto_picks_onnxruntime_on_cpu(folder):
    with Runtime.load(folder, "auto", "cpu") as rt:
        assert rt.backend == "onnxruntime" and rt.num_ws == TINY.mapper.num_ws and rt.resolution == 32


def test_batches_larger_than_the_engine_are_split(folder, runtimes):
    w = _latents(5)
    with Runtime.load(folder, "onnxruntime", "cpu", max_batch=2) as small:
        assert torch.allclose(small.synthesize(w), runtimes["onnxruntime"].synthesize(w), atol=1e-5)


def test_threads_give_the_serial_results(runtimes):
    rt = runtimes["onnxruntime"]
    jobs = [(_latents(1 + i % 3), f"prompt {i % 5}") for i in range(20)]
    serial = [rt.edit(w, p) for w, p in jobs]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            assert all(torch.equal(a, b) for a, b in zip(pool.map(lambda j: rt.edit(*j), jobs), serial))


def test_bad_inputs_are_refused(runtimes):
    rt = runtimes["eager"]
    with pytest.raises(InputError, match="shape"):
        rt.synthesize(torch.zeros(1, 3, 512))
    with pytest.raises(InputError, match="NaN"):
        rt.synthesize(torch.full((1, TINY.mapper.num_ws, 512), float("nan")))
    with pytest.raises(InputError, match="prompts"):
        rt.edit(_latents(3), ["a", "b"])


def test_changed_byte_and_missing_file_are_refused(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "onnx" / "mapper.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="mapper.onnx: changed since export.*re-export"):
        Runtime.load(copy, "eager", "cpu")
    path.unlink()
    with pytest.raises(ArtifactError, match="mapper.onnx: missing"):
        Runtime.load(copy, "eager", "cpu")


def test_edit_command_serves_from_artifacts(folder, tmp_path, monkeypatch, capsys):
    import sys

    from ffclip.cli import main

    out = tmp_path / "served.png"
    monkeypatch.setattr(sys, "argv", ["ffclip", "edit", "--artifacts", str(folder), "--backend", "onnxruntime",
                                      "--num", "2", "--prompt", "curly hair", "--out", str(out), "--device", "cpu"])
    main()
    assert "onnxruntime backend" in capsys.readouterr().err
    assert out.exists() and (tmp_path / "served_latents.npy").exists()


def test_triton_backend_serves_the_kernel_forms(folder, runtimes):
    # The numbers of the triton forms are held against the default forms at small widths in tests/test_kernels_*.py;
    # at this folder's real mapper width (512) Triton's CPU interpreter needs minutes, so here the backend's wiring is
    # checked and the stage without kernels is run.
    with Runtime.load(folder, "triton", "cpu") as rt:
        assert rt.backend == "triton"
        assert rt._engines["mapper"]._module.form == "triton"
        assert rt._engines["generator"]._module.conv_form == "triton"
        prompts = ["freckles", "a hat"]
        torch.testing.assert_close(rt.encode_text(prompts), runtimes["eager"].encode_text(prompts), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_close_waits_for_calls_in_progress(folder, backend):
    import threading

    from ffclip.engines.base import EngineUnavailable

    rt = Runtime.load(folder, backend, "cpu")
    w = _latents(2)
    errors_seen: list[BaseException] = []
    started = threading.Barrier(5)

    def worker():
        started.wait()
        try:
            while True:
                rt.synthesize(w)
        except EngineUnavailable:
            return
        except BaseException as exc:  # anything else is a race between close and a running call
            errors_seen.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    rt.close()
    for t in threads:
        t.join(timeout=60)
    assert not errors_seen and not any(t.is_alive() for t in threads)
    with pytest.raises(EngineUnavailable):
        rt.synthesize(w)


def test_auto_falls_back_when_an_engine_cannot_open(folder, monkeypatch):
    from ffclip.engines.base import EngineUnavailable
    from ffclip.engines.onnxruntime import OnnxRuntimeEngine

    def refuse(self, *args, **kwargs):
        raise EngineUnavailable("built for another machine")

    monkeypatch.setattr(OnnxRuntimeEngine, "__init__", refuse)
    with Runtime.load(folder, "auto", "cpu") as rt:
        assert rt.backend == "torchscript"
