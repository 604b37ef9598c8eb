"""The per-stage precision policy: what the manifest records, and bf16 that really computes on the CPU in the eager
backend (the mapper stays float32), with images close to float32's."""

from __future__ import annotations

import pytest
import torch
from export_fixtures import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from ffclip.export.exporter import ExportOptions, export_artifacts
from ffclip.artifacts import MANIFEST, sha256
from ffclip.backends import PRECISIONS, by_artifact, compute_precision
from ffclip.factory import build_preset
from ffclip.pipeline import EditPipeline
from ffclip.runtime import Runtime

aten = torch.ops.aten
# as seen under inference mode, where composite operators arrive undecomposed
_PRODUCTS = {aten.linear.default, aten.matmul.default, aten.conv2d.default, aten.conv_transpose2d.input,
             aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default}


class ProductDtypes(TorchDispatchMode):
    """Records the dtype of every convolution and matrix product run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _PRODUCTS:
            self.seen.add(out.dtype)
        return out


def test_the_manifest_records_the_policys_answer_for_every_format(bf16_export):
    _, manifest = bf16_export
    for stage, entry in manifest["stages"].items():
        for artifact, held in entry["compute_precision"].items():
            record = by_artifact(artifact)
            device = record.check_device(torch.device(manifest["export_device"]))
            assert held == compute_precision(stage, record.name, "bf16", device), (stage, artifact)


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16") / "artifacts"
    options = ExportOptions(precision="bf16", formats=("torchscript",), min_batch=1, opt_batch=2, max_batch=4)
    report = export_artifacts(build_preset(TINY), folder, options, preset="tiny", sources={})
    return folder, report.manifest


def test_manifest_records_each_stage_compute_precision(bf16_export):
    _, manifest = bf16_export
    stages = manifest["stages"]
    assert stages["text_encoder"]["compute_precision"] == {"eager": "bf16", "torchscript": "fp32"}
    assert stages["generator"]["compute_precision"] == {"eager": "bf16", "torchscript": "fp32"}
    assert stages["mapper"]["compute_precision"] == {"eager": "fp32", "torchscript": "fp32"}
    assert stages["mapper"]["parity"]["torchscript"]["reference"] == "float64"


def test_eager_bf16_computes_in_bf16_and_keeps_the_images(bf16_export):
    """Text encoder and generator products run in bf16, the mapper's in float32 (and so it equals float32 exactly);
    the generator's images stay within 2 levels on average of float32's."""
    folder, _ = bf16_export
    pipe = EditPipeline(*build_preset(TINY))
    latents = pipe.sample_latents(4, seed=3)
    with Runtime.load(folder, backend="eager", device="cpu") as rt:
        with ProductDtypes() as text:
            embedding = rt.encode_text(["a smiling face"])
        with ProductDtypes() as mapper:
            edited = rt.modulate(latents, embedding.expand(4, -1))
        with ProductDtypes() as generator:
            images = rt.synthesize(latents).int()
    assert text.seen == generator.seen == {torch.bfloat16}
    assert mapper.seen == {torch.float32}
    reference = pipe.encode_text(["a smiling face"])
    assert (embedding - reference).abs().max() <= 8e-2 * reference.abs().max()
    assert torch.equal(edited, pipe.modulate(latents, embedding.expand(4, -1)))
    difference = (images - pipe.synthesize(latents).int()).abs().float()
    assert difference.mean() <= 2.0


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_each_engine_computes_what_the_policy_says(bf16_export, backend):
    """The products each stage really runs, on the engines that run torch operators here, are in the dtype the policy
    gives that stage on that backend."""
    folder, _ = bf16_export
    with Runtime.load(folder, backend=backend, device="cpu", expected_sha256=sha256(folder / MANIFEST)) as rt:
        latents = rt.sample_latents(2, seed=1)
        calls = {"text_encoder": lambda: rt.encode_text(["a red circle", "a gray background"]),
                 "mapper": lambda: rt.modulate(latents, torch.randn(2, rt.embed_dim)),
                 "generator": lambda: rt.synthesize(latents)}
        for stage, call in calls.items():
            with ProductDtypes() as seen:
                call()
            assert seen.seen == {PRECISIONS[compute_precision(stage, backend, "bf16", "cpu")]}, (backend, stage)


def test_the_export_note_states_what_the_policy_gives_each_built_backend():
    from ffclip.cli.export import _precision_note
    from ffclip.export.options import ExportOptions

    note = _precision_note(ExportOptions(precision="int8", formats=("openvino",)))
    assert "openvino int8/fp32" in note and "onnxruntime fp32/fp32" in note
    assert "tensorrt" not in note and "torchscript" not in note  # not built at int8, so not described
    assert "eager bf16/bf16" in _precision_note(ExportOptions(precision="bf16", formats=("onnx",)))
