"""Edit strength `w + s * (mapper(w, e) - w)`: the maths once, and the same result through `EditPipeline.edit`,
`Runtime.edit` and `ffclip edit --strength`."""

import sys

import pytest
import torch
from export_fixtures import TINY

from ffclip.errors import InputError
from ffclip.factory import build_preset
from ffclip.pipeline import EditPipeline
from ffclip.strength import apply_strength, check_strength


def _latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, TINY.mapper.num_ws, 512, generator=torch.Generator().manual_seed(seed))


def test_strength_against_float64():
    w, w_edit = _latents(3, 1), _latents(3, 2)
    s = torch.tensor([0.0, 0.5, -1.5])
    want = w.double() + s.double().view(-1, 1, 1) * (w_edit.double() - w.double())
    got = apply_strength(w, w_edit, s)
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    assert torch.equal(apply_strength(w, w_edit, check_strength(0.0, 3)), w)
    assert apply_strength(w, w_edit, check_strength(1.0, 3)) is w_edit
    assert torch.equal(apply_strength(w, w_edit, check_strength([0.25], 3)), apply_strength(w, w_edit, check_strength(0.25, 3)))


@pytest.mark.parametrize("strength, fragment", [
    (float("nan"), "finite"), (float("inf"), "finite"), ([1.0, 2.0], "2 strengths for 3"), ("x", "number"),
])
def test_bad_strength_is_an_input_error(strength, fragment):
    with pytest.raises(InputError, match=fragment):
        check_strength(strength, 3)


@pytest.fixture(scope="module")
def pipeline():
    return EditPipeline(*build_preset(TINY))


def test_pipeline_edit_strength(pipeline):
    w = pipeline.sample_latents(2, seed=3)
    e = pipeline.encode_text(["a red circle"]).expand(2, -1)
    w_edit = pipeline.modulate(w, e)
    assert torch.equal(pipeline.edit(w, ["a red circle"], strength=0), pipeline.synthesize(w))
    assert torch.equal(pipeline.edit(w, ["a red circle"]), pipeline.synthesize(w_edit))
    half = pipeline.edit(w, ["a red circle"], strength=[0.5, 2.0])
    want = pipeline.synthesize(w + torch.tensor([0.5, 2.0]).view(-1, 1, 1) * (w_edit - w))
    assert (half.int() - want.int()).abs().max() <= 1


def test_runtime_edit_strength(tmp_path, pipeline):
    from ffclip.export.exporter import ExportOptions, export_artifacts
    from ffclip.runtime import Runtime

    options = ExportOptions(formats=("torchscript",), min_batch=1, opt_batch=1, max_batch=2)
    export_artifacts((pipeline.text_encoder, pipeline.mapper, pipeline.generator), tmp_path / "a", options,
                     preset="tiny", sources={})
    with Runtime.load(tmp_path / "a", "eager", "cpu") as rt:
        w = pipeline.sample_latents(2, seed=4)
        assert torch.equal(rt.edit(w, "a red circle", strength=0), rt.synthesize(w))
        assert torch.equal(rt.edit(w, "a red circle", strength=0.7), pipeline.edit(w, ["a red circle"], strength=0.7))
        with pytest.raises(InputError, match="finite"):
            rt.edit(w, "a red circle", strength=float("nan"))


def test_cli_strength(monkeypatch, capsys, tmp_path):
    from ffclip.cli import main

    monkeypatch.setattr(sys, "argv", ["ffclip", "edit", "--prompt", "x", "--strength", "nan",
                                      "--out", str(tmp_path / "e.png")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines()[-1] == "ffclip: error: strength must be a finite number, got nan"
