"""`EditPipeline` on in-memory modules: stages that must fit together, a style width other than 512, and the
runtime side that serves without the exporter."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ffclip.errors import InputError
from ffclip.export.stages import stage_specs
from ffclip.factory import build_preset
from ffclip.pipeline import EditPipeline

from export_fixtures import TINY

NARROW = dataclasses.replace(
    TINY,
    generator=dataclasses.replace(TINY.generator, style_dim=32),
    mapper=dataclasses.replace(TINY.mapper, dim=32),
    text=dataclasses.replace(TINY.text, embed_dim=32),
)


def test_a_32_wide_pipeline_edits_the_latents_it_samples():
    pipe = EditPipeline(*build_preset(NARROW))
    w = pipe.sample_latents(2, seed=1)
    assert w.shape == (2, NARROW.mapper.num_ws, 32)
    assert pipe.edit(w, "a red circle").shape == (2, 32, 32, 3)
    assert pipe.edit(w[:, 0], ["a", "b"], strength=[0.5, 1.0]).shape == (2, 32, 32, 3)
    with pytest.raises(InputError, match=r"expected \[B, 8, 32\] or \[B, 32\]"):
        pipe.synthesize(w[..., :16])


@pytest.mark.parametrize("swap, message", [
    ("mapper", "the mapper is 512 wide but the generator's styles are 32 wide"),
    ("text", "the text encoder gives 512-wide embeddings but the mapper expects 32"),
])
def test_stages_that_do_not_fit_are_refused_by_the_pipeline_and_the_exporter(swap, message):
    stages = build_preset(dataclasses.replace(NARROW, **{swap: getattr(TINY, swap)}))
    with pytest.raises(InputError, match=message):
        EditPipeline(*stages)
    with pytest.raises(InputError, match=message):
        stage_specs(*stages)


def test_the_runtime_does_not_import_the_exporter():
    code = ("import sys, ffclip.runtime, ffclip.pipeline, ffclip.engines.eager; "
            "print(sorted(m for m in sys.modules if m.startswith('ffclip.export')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
