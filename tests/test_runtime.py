"""`Runtime` over an exported tiny configuration: backends agree, batches split, threads, hash checks, input errors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from export_fixtures import TINY

from ffclip.checkpoints.bundle import load_module
from ffclip.errors import InputError
from ffclip.export.parity import errors
from ffclip.export.stages import MAPPER_TOLERANCE
from ffclip.imaging import to_uint8
from ffclip.latents import sample_latents
from ffclip.export.exporter import ExportOptions, export_artifacts
from ffclip.artifacts import ArtifactError
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
    # The mapper is held against a float64 evaluation with the exporter's fixed tolerance (ffclip.export.parity).
    mapper64 = load_module(folder / "mapper.safetensors").double()
    with torch.no_grad():
        w_edit64 = mapper64(w.double(), e_ref.double())
    for name in ("torchscript", "onnxruntime"):
        rt = runtimes[name]
        assert (rt.encode_text(prompts) - e_ref).abs().max() <= 1e-4 * e_ref.abs().max()
        assert errors(rt.modulate(w, e_ref), w_edit64)[1] <= MAPPER_TOLERANCE.value
        assert (rt.synthesize(w, as_float=True) - ref.synthesize(w, as_float=True)).abs().max() <= 1e-3
        edited = rt.edit(w, "a smiling face")
        assert edited.dtype == torch.uint8 and edited.shape == (3, 32, 32, 3)
        e = rt.encode_text(["a smiling face"]).expand(3, -1)
        same_latents = ref.synthesize(rt.modulate(w, e))
        assert (edited.int() - same_latents.int()).abs().max() <= 1


def test_auto_picks_onnxruntime_on_cpu(folder):
    with Runtime.load(folder, "auto", "cpu") as rt:
        assert rt.backend == "onnxruntime" and rt.num_ws == TINY.mapper.num_ws and rt.resolution == 32


def test_synthesize_and_edit_give_the_same_image_type(runtimes):
    rt, w = runtimes["eager"], _latents(2)
    images = rt.synthesize(w)
    assert images.dtype == torch.uint8 and images.shape == (2, 32, 32, 3) and images.device.type == "cpu"
    raw = rt.synthesize(w, as_float=True)
    assert raw.dtype == torch.float32 and raw.shape == (2, 3, 32, 32)
    assert torch.equal(images, to_uint8(raw))
    edited, w_edit = rt.edit_with_latents(w, "a red circle")
    assert torch.equal(edited, rt.synthesize(w_edit)) and torch.equal(rt.edit(w, "a red circle"), edited)
    assert torch.equal(rt.edit(w, "a red circle", as_float=True), rt.synthesize(w_edit, as_float=True))


def _count_rows(rt: Runtime, stage: str) -> list[int]:
    """The rows of every call `rt` makes to its `stage` engine from now on."""
    seen: list[int] = []
    engine = rt._engines[stage]
    real = engine.run
    engine.run = lambda inputs: seen.append(next(iter(inputs.values())).shape[0]) or real(inputs)
    return seen


def test_batches_larger_than_max_batch_are_split(folder, runtimes):
    w = _latents(5)
    with Runtime.load(folder, "onnxruntime", "cpu", max_batch=2) as small:
        rows = {stage: _count_rows(small, stage) for stage in ("text_encoder", "mapper", "generator")}
        prompts = [f"prompt {i}" for i in range(5)]
        edited = small.edit(w, prompts).int()
        assert (edited - runtimes["onnxruntime"].edit(w, prompts).int()).abs().max() <= 1
        assert torch.allclose(small.synthesize(w, as_float=True), runtimes["onnxruntime"].synthesize(w, as_float=True),
                              atol=1e-5)
    assert rows == {"text_encoder": [2, 2, 1], "mapper": [2, 2, 1], "generator": [2, 2, 1, 2, 2, 1]}


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
    assert out.exists()
    with Runtime.load(folder, "onnxruntime", "cpu") as rt:  # the command's defaults: seed 0, truncation 0.7
        _, expected = rt.edit_with_latents(rt.sample_latents(2, 0, 0.7), "curly hair")
    served = torch.from_numpy(np.load(tmp_path / "served_latents.npy"))
    assert served.shape == (1, *expected.shape) and torch.equal(served[0], expected)


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
    with Runtime.load(folder, "auto", "cpu") as rt:  # the folder is not pinned: TorchScript (a program) is passed over
        assert rt.backend == "eager"


# Artifact folders as a trust boundary, input types shared with EditPipeline, bounded chunks, presets vs folders.


def _copy(folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _rewrite_manifest(copy, change):
    import json

    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return manifest


def test_stage_paths_outside_the_folder_or_unlisted_are_refused(folder, tmp_path):
    copy = _copy(folder, tmp_path)
    outside = tmp_path / "outside.pt"
    outside.write_bytes((copy / "torchscript" / "mapper.pt").read_bytes())
    (copy / "torchscript" / "spare.pt").write_bytes(outside.read_bytes())
    for path, fragment in ((str(outside), "outside"), ("../outside.pt", "outside"), ("torchscript/spare.pt", "not listed")):
        _rewrite_manifest(copy, lambda m: m["stages"]["mapper"]["files"].update(torchscript=path))
        with pytest.raises(ArtifactError, match=fragment):
            Runtime.load(copy, "torchscript", "cpu")
    _rewrite_manifest(copy, lambda m: m["stages"]["mapper"]["files"].update(torchscript="torchscript/mapper.pt"))
    # a listed name that is a symlink to identical bytes outside the folder
    (copy / "torchscript" / "mapper.pt").unlink()
    (copy / "torchscript" / "mapper.pt").symlink_to(outside)
    for backend in ("torchscript", "auto"):  # a listed file is checked whichever backend is asked for
        with pytest.raises(ArtifactError, match="outside"):
            Runtime.load(copy, backend, "cpu")


def test_the_bytes_loaded_are_the_bytes_checked(folder, tmp_path, monkeypatch):
    import ffclip.runtime as runtime_module

    copy = _copy(folder, tmp_path)
    real = runtime_module.read_manifest

    def read_then_swap(*args, **kwargs):
        manifest = real(*args, **kwargs)
        for fmt in ("torchscript/mapper.pt", "onnx/mapper.onnx", "mapper.safetensors"):
            (copy / fmt).write_bytes((copy / fmt.replace("mapper", "generator")).read_bytes())
        return manifest

    monkeypatch.setattr(runtime_module, "read_manifest", read_then_swap)
    for backend in BACKENDS:
        with pytest.raises(ArtifactError, match="mapper.*changed since"):
            Runtime.load(copy, backend, "cpu")


def test_pinned_and_unpinned_folders(folder, tmp_path):
    import hashlib

    copy = _copy(folder, tmp_path)
    # without ONNX files, auto must not pick the TorchScript archives (programs) of a folder that is not pinned
    _rewrite_manifest(copy, lambda m: [s["files"].pop("onnx") for s in m["stages"].values()])
    pin = hashlib.sha256((copy / "manifest.json").read_bytes()).hexdigest()
    with Runtime.load(copy, "auto", "cpu") as rt:
        assert rt.backend == "eager"
    with Runtime.load(copy, "auto", "cpu", expected_sha256=pin) as rt:
        assert rt.backend == "torchscript"
    with Runtime.load(copy, "torchscript", "cpu") as rt:  # an explicit backend is the caller's choice
        assert rt.backend == "torchscript"
    with pytest.raises(ArtifactError, match="sha256"):
        Runtime.load(copy, "auto", "cpu", expected_sha256="0" * 64)


def test_onnx_external_data_outside_the_folder_is_refused_and_auto_falls_back(folder, tmp_path):
    import hashlib

    import onnx

    copy = _copy(folder, tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    model = onnx.load(str(copy / "onnx" / "text_encoder.onnx"))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../../secret.bin")
    (copy / "onnx" / "text_encoder.onnx").write_bytes(model.SerializeToString())
    digest = hashlib.sha256((copy / "onnx" / "text_encoder.onnx").read_bytes()).hexdigest()
    _rewrite_manifest(copy, lambda m: m["files"].update({"onnx/text_encoder.onnx": digest}))
    with pytest.raises(ArtifactError, match="text_encoder.onnx.*outside"):
        Runtime.load(copy, "onnxruntime", "cpu")
    with Runtime.load(copy, "auto", "cpu") as rt:
        assert rt.backend == "eager"


def test_runtime_and_pipeline_take_the_same_inputs(folder, runtimes):
    from ffclip.pipeline import EditPipeline

    pipe = EditPipeline(*(load_module(folder / f"{s}.safetensors") for s in ("text_encoder", "mapper", "generator")))
    w = _latents(2)
    flipped = np.ascontiguousarray(w.numpy()[::-1])[::-1]  # negative strides
    assert flipped.strides[0] < 0
    grad = w.clone().requires_grad_(True)
    for stages in (pipe, runtimes["onnxruntime"], runtimes["eager"]):
        assert stages.encode_text("curly hair").shape == (1, 512)
        e = stages.encode_text(["curly hair"]).numpy()
        for latents in (flipped, grad, w):
            assert stages.modulate(latents, e).shape == w.shape
            assert stages.modulate(latents, e[0]).shape == w.shape
            assert stages.synthesize(latents).shape == (2, 32, 32, 3)
            assert stages.synthesize(latents, as_float=True).shape == (2, 3, 32, 32)
        images = stages.edit(grad, "curly hair")
        assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8
        with pytest.raises(InputError, match="prompt"):
            stages.edit(w, [3])


def test_large_batches_run_in_chunks_within_the_memory_budget(folder, runtimes):
    w = _latents(7)
    with Runtime.load(folder, "onnxruntime", "cpu", memory_budget_mib=0.001) as small:
        rows = small.chunk_rows("generator")
        assert rows >= 1
        seen = _count_rows(small, "generator")
        assert torch.allclose(small.synthesize(w, as_float=True), runtimes["onnxruntime"].synthesize(w, as_float=True),
                              atol=1e-5)
        assert max(seen) == rows < 7 and sum(seen) == 7
    assert runtimes["onnxruntime"].chunk_rows("generator") >= 4


def test_a_preset_that_contradicts_the_folder_is_refused(folder, tmp_path, monkeypatch, capsys):
    import sys

    from ffclip.cli import main

    for command in (["ffclip", "edit", "--prompt", "x", "--out", str(tmp_path / "a.png")], ["ffclip", "bench"]):
        monkeypatch.setattr(sys, "argv", [*command, "--artifacts", str(folder), "--preset", "ffhq-1024",
                                          "--device", "cpu"])
        with pytest.raises(SystemExit) as info:
            main()
        err = capsys.readouterr().err
        assert info.value.code == 2 and "tiny" in err and "ffhq-1024" in err and "Traceback" not in err


def test_bench_measures_what_a_reduced_precision_folder_holds_on_the_cpu(folder, tmp_path):
    from ffclip.benchmarks.runner import Benchmark, Settings

    copy = _copy(folder, tmp_path)
    _rewrite_manifest(copy, lambda m: m.update(precision="fp16"))
    settings = Settings(preset="tiny", device="cpu", stages=("mapper",), backends=("onnxruntime", "torchscript"),
                        batches=(1,), precisions=("fp32",), warmup=0, iters=1, budget_s=0.0, artifacts=copy)
    bench = Benchmark(settings)
    assert bench._source("onnxruntime", "fp32", {}) == copy
    assert bench._source("torchscript", "fp32", {}) == copy


def test_a_folder_says_whether_its_text_encoder_is_the_worlds(folder, tmp_path):
    from ffclip.world.vocabulary import folder_has_world_text_encoder

    copy = _copy(folder, tmp_path)
    assert not folder_has_world_text_encoder(copy)  # the tiny preset
    world = {"embedded_default": "trained weights of preset world (text_encoder.safetensors)"}
    _rewrite_manifest(copy, lambda m: m.update(preset="world", sources={"text_encoder": world}))
    assert folder_has_world_text_encoder(copy)
    _rewrite_manifest(copy, lambda m: m.update(sources={"text_encoder": {"path": "ViT-B-32.pt", "sha256": "0" * 64}}))
    assert not folder_has_world_text_encoder(copy)


def test_one_edit_checks_its_inputs_once_and_hashes_each_file_once(folder, monkeypatch):
    import hashlib

    import ffclip.runtime as runtime_module
    from ffclip.models.generator import LatentMapping

    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    def counting_sha256(*args):
        digest = real_sha256(*args)
        hashed.append(id(digest))
        return digest

    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    with Runtime.load(folder, "onnxruntime", "cpu") as rt:
        # every listed file once: the engines' ONNX files when they read them, the others when the folder is opened
        listed = json.loads((folder / "manifest.json").read_text())["files"]
        assert len(hashed) == len(listed) and any(name.startswith("onnx/") for name in listed)
        monkeypatch.setattr(hashlib, "sha256", real_sha256)
        checked = {"latents": 0, "strength": 0}
        for name, key in (("check_latents", "latents"), ("check_strength", "strength")):
            real = getattr(runtime_module, name)

            def counted(*args, _real=real, _key=key, **kwargs):
                checked[_key] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(runtime_module, name, counted)
        w = _latents(3)
        rt.edit(w, "a hat", [0.5, 1.0, 2.0])
        assert checked == {"latents": 1, "strength": 1}
        sampled = rt.sample_latents(2, seed=4)
        assert isinstance(rt._mapping, LatentMapping)  # the synthesis network is never built for sampling
        generator = load_module(folder / "generator.safetensors")
        torch.testing.assert_close(sampled, sample_latents(generator, 2, seed=4), rtol=0, atol=0)
