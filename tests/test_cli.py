"""`ffclip edit` on the embedded default, and the one-line errors that bad input gets (exit status 2)."""

import numpy as np
import pytest
import torch
from cli_runner import run_cli as run
from PIL import Image

from ffclip.checkpoints.bundle import save_module
from ffclip.config import DEFAULT_PRESET, MapperConfig, get_preset
from ffclip.factory import build_mapper
from ffclip.imaging import GAP, grid_tile

NUM_WS = get_preset(DEFAULT_PRESET).generator.num_ws
RES = get_preset(DEFAULT_PRESET).generator.resolution
DIM = get_preset(DEFAULT_PRESET).generator.style_dim


def _pipeline(mapper=None):
    """The default preset's stages in process, with the mapper file `mapper` when given."""
    from ffclip.checkpoints import load_generator, load_mapper, load_text_encoder
    from ffclip.pipeline import EditPipeline

    return EditPipeline(load_text_encoder(None, None, preset=DEFAULT_PRESET), load_mapper(mapper, preset=DEFAULT_PRESET),
                        load_generator(None, preset=DEFAULT_PRESET))


def assert_user_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("ffclip: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.slow
def test_edit_on_embedded_default_writes_grid_and_latents(monkeypatch, capsys, tmp_path):
    out = tmp_path / "grid.png"
    code, stdout, err = run(monkeypatch, capsys, "edit", "--num", 2, "--prompt", "blond hair", "--prompt", "smiling",
                            "--out", out, "--device", "cpu")
    assert code == 0, err
    assert "seeded random" not in err  # the default preset ships trained weights
    width, height = Image.open(out).size
    tile = grid_tile(RES)  # three columns (original, two prompts) of two rows, a label margin and a title header
    assert width > 3 * tile + 2 * GAP and height > 2 * tile + GAP
    latents = np.load(tmp_path / "grid_latents.npy")
    assert latents.shape == (2, 2, NUM_WS, DIM) and latents.dtype == np.float32
    assert f"wrote {out}" in stdout
    # the edit is deterministic and the two prompts give different latents
    assert not np.allclose(latents[0], latents[1])


@pytest.mark.slow
def test_edit_reads_latents_and_broadcasts_w(monkeypatch, capsys, tmp_path):
    w = tmp_path / "w.npy"
    np.save(w, np.random.default_rng(0).standard_normal((1, DIM)).astype(np.float32))
    code, _, err = run(monkeypatch, capsys, "edit", "--latents", w, "--prompt", "red hair",
                       "--out", tmp_path / "one.png", "--device", "cpu")
    assert code == 0, err
    every_layer = torch.from_numpy(np.load(w)).unsqueeze(1).expand(-1, NUM_WS, -1)
    _, expected = _pipeline().edit_with_latents(every_layer, "red hair")
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "one_latents.npy")), expected.unsqueeze(0))


def test_wrong_kind_of_checkpoint(monkeypatch, capsys, tmp_path):
    mapper_file = save_module(tmp_path / "mapper.safetensors", build_mapper(MapperConfig(num_ws=NUM_WS)))
    code, _, err = run(monkeypatch, capsys, "edit", "--generator", mapper_file, "--prompt", "x",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "mapper.safetensors")
    assert not (tmp_path / "g.png").exists()


def test_truncated_checkpoint(monkeypatch, capsys, tmp_path):
    whole = save_module(tmp_path / "whole.safetensors", build_mapper(MapperConfig(num_ws=NUM_WS)))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    code, _, err = run(monkeypatch, capsys, "edit", "--mapper", cut, "--prompt", "x",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "cut.pt")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (np.zeros((2, 3, DIM), np.float32), "shape"),
        (np.zeros((2, NUM_WS, DIM), np.int64), "floating point"),
        (np.full((1, NUM_WS, DIM), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_latents(monkeypatch, capsys, tmp_path, content, fragment):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    code, _, err = run(monkeypatch, capsys, "edit", "--latents", path, "--prompt", "x",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "bad.npy", fragment)
    assert not (tmp_path / "g.png").exists()


def test_unreadable_latents(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bad.pt"
    path.write_text("not a tensor")
    code, _, err = run(monkeypatch, capsys, "edit", "--latents", path, "--prompt", "x",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "bad.pt")


def test_empty_prompt(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "edit", "--prompt", "  ", "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "empty")


def test_missing_prompt_is_a_usage_error(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "edit", "--out", tmp_path / "g.png")
    assert code == 2 and "--prompt" in err and "Traceback" not in err


@pytest.mark.slow
def test_long_prompt_is_truncated_with_a_warning(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "edit", "--num", 1, "--prompt", "very " * 90 + "long",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert code == 0, err
    assert "ffclip: warning:" in err and "truncated" in err


@pytest.mark.parametrize("device, fragment", [("banana", "unknown device"), ("cuda:7", "cuda:7")])
def test_bad_device(monkeypatch, capsys, tmp_path, device, fragment):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = run(monkeypatch, capsys, "edit", "--prompt", "x", "--out", tmp_path / "g.png", "--device", device)
    assert_user_error(code, err, fragment)


def test_out_must_be_png(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "edit", "--prompt", "x", "--out", tmp_path / "g.jpg")
    assert_user_error(code, err, ".png")


@pytest.mark.slow
def test_train_then_edit_with_the_trained_mapper(monkeypatch, capsys, tmp_path):
    code, stdout, err = run(monkeypatch, capsys, "train", "--steps", 2, "--batch-size", 1, "--out", tmp_path / "run",
                            "--device", "cpu")
    assert code == 0, err
    mapper = tmp_path / "run" / "mapper.safetensors"
    assert mapper.exists() and (tmp_path / "run" / "loss.png").exists()
    code, _, err = run(monkeypatch, capsys, "edit", "--mapper", mapper, "--num", 1, "--prompt", "grey hair",
                       "--out", tmp_path / "trained.png", "--device", "cpu")
    assert code == 0, err
    edited = torch.from_numpy(np.load(tmp_path / "trained_latents.npy"))[0]
    for stages, same in ((_pipeline(mapper), True), (_pipeline(), False)):
        _, expected = stages.edit_with_latents(stages.sample_latents(1, 0, 0.7), "grey hair")  # the command's defaults
        assert torch.equal(edited, expected) == same


def test_train_resume_needs_saved_state(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "train", "--resume", "--out", tmp_path / "empty", "--device", "cpu")
    assert_user_error(code, err, "train_state.pt")


def test_checkpoints_and_artifacts_do_not_mix(monkeypatch, capsys, tmp_path):
    mapper_file = save_module(tmp_path / "mapper.safetensors", build_mapper(MapperConfig(num_ws=NUM_WS)))
    code, _, err = run(monkeypatch, capsys, "edit", "--artifacts", tmp_path, "--mapper", mapper_file, "--prompt", "x",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "--artifacts")


def test_edit_names_the_words_the_world_never_saw_once_per_prompt(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "edit", "--num", 1, "--prompt", "make it orange", "--prompt", "make it red",
                       "--prompt", "make it orange", "--out", tmp_path / "g.png", "--device", "cpu")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "never saw" in line]
    assert len(notes) == 1 and "'make it orange'" in notes[0] and "'orange'" in notes[0], err


def test_export_refuses_formats_none_of_which_build_here(monkeypatch, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("TensorRT may build here")
    code, _, err = run(monkeypatch, capsys, "export", "--formats", "tensorrt", "--device", "cpu",
                       "--out", tmp_path / "out")
    assert_user_error(code, err, "--formats tensorrt", "onnx")
    assert not (tmp_path / "out").exists()


def test_edit_names_the_empty_prompt_by_its_number_before_drawing(monkeypatch, capsys, tmp_path):
    out = tmp_path / "grid.png"
    code, _, err = run(monkeypatch, capsys, "edit", "--num", 1, "--prompt", "make it red", "--prompt", " ",
                       "--prompt", "make it blue", "--out", out, "--device", "cpu")
    assert_user_error(code, err, "prompt 1 is empty")
    assert "rendering" not in err and not out.exists()


def test_a_long_prompt_is_quoted_short_in_every_message(monkeypatch, capsys, tmp_path):
    prompt = " ".join(f"word{i}" for i in range(700))  # 5,489 characters, every word unseen by the world
    code, _, err = run(monkeypatch, capsys, "edit", "--num", 1, "--prompt", prompt, "--out", tmp_path / "g.png",
                       "--device", "cpu")
    assert code == 0, err[-500:]
    assert len(err) < 2000 and "(5489 characters)" in err and "and 690 more" in err
