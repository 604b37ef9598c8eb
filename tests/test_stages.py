"""The one stage factory (`ffclip.stages`) and the edit of a batch by several prompts (`ffclip.editing`), on the
micro configuration and its export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from micro_preset import MICRO, export_micro

from ffclip.artifacts import ArtifactError
from ffclip.editing import edit_columns
from ffclip.errors import InputError
from ffclip.factory import build_preset
from ffclip.pipeline import EditPipeline
from ffclip.stages import StageSources, load_modules, open_stages


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return export_micro(tmp_path_factory.mktemp("stages") / "micro")


def test_a_folder_opens_with_the_backend_named_and_its_preset_decides(folder):
    notes = []
    with open_stages(StageSources(preset="world"), artifacts=folder, backend="eager", note=notes.append) as stages:
        assert stages.backend == "eager" and stages.resolution == MICRO.generator.resolution
    assert notes == [f"serving from {folder} with the eager backend"]


def test_a_chosen_preset_that_contradicts_the_folder_is_refused(folder):
    with pytest.raises(InputError, match="--preset world contradicts --artifacts .* exported from preset micro"):
        open_stages(StageSources(preset="world", preset_given=True), artifacts=folder)
    with pytest.raises(InputError, match="--preset world contradicts"):
        load_modules(StageSources(preset="world", preset_given=True), artifacts=folder)


def test_stage_files_and_a_folder_exclude_each_other(folder, tmp_path):
    with pytest.raises(InputError, match="do not apply with --artifacts"):
        open_stages(StageSources(mapper=tmp_path / "mapper.pt"), artifacts=folder)


def test_a_pinned_folder_must_match_its_pin(folder):
    with pytest.raises(ArtifactError, match="is not the pinned"):
        load_modules(StageSources(), artifacts=folder, expect_sha256="0" * 64)


def test_the_folder_modules_are_its_eager_weights(folder):
    text_encoder, mapper, generator = load_modules(StageSources(), artifacts=folder)
    for loaded, built in zip((text_encoder, mapper, generator), build_preset(MICRO)):
        expected = built.state_dict()
        assert all(torch.equal(value, expected[name]) for name, value in loaded.state_dict().items())


def test_seeded_random_weights_are_noted_and_trained_ones_are_not():
    notes = []
    assert isinstance(open_stages(StageSources(preset="random"), note=notes.append), EditPipeline)
    assert len(notes) == 1 and "seeded random, not trained" in notes[0]
    notes.clear()
    open_stages(StageSources(preset="world"), note=notes.append)
    assert notes == []


def test_edit_columns_are_the_originals_then_one_edit_per_prompt():
    stages = EditPipeline(*build_preset(MICRO))
    latents = stages.sample_latents(3, seed=1)
    prompts = ["a red square", "a blue disc"]
    heard = []
    columns, edited = edit_columns(stages, latents, prompts, strength=0.5, on_progress=heard.append)
    assert len(columns) == 3 and torch.equal(columns[0], stages.synthesize(latents))
    assert edited.shape == (2, *latents.shape)
    for prompt, column, w_edit in zip(prompts, columns[1:], edited):
        images, w = stages.edit_with_latents(latents, prompt, 0.5)
        assert torch.equal(column, images) and torch.equal(w_edit, w)
    assert not torch.equal(edited[0], edited[1])
    res = MICRO.generator.resolution
    assert heard == [f"rendering 3 original(s) at {res} px", "editing [1/2] 'a red square'",
                     "editing [2/2] 'a blue disc'"]
