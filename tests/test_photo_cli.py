"""`ffclip invert` and `ffclip edit --image`: photos read, batched and written; bad photos and files get one line.

The encoder's maths is held to its reference in test_photo_nets.py; here a small stand-in takes its place so that a
run costs no 256-pixel IR-SE passes, except in the test that reads a real e4e file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import run_cli as run
from PIL import Image

from ffclip.config import DEFAULT_PRESET, get_preset
from ffclip.imaging import GAP, grid_tile
from ffclip.photos import read_photo
from reference_photo_models import e4e_weights
from test_cli import assert_user_error

PRESET = get_preset(DEFAULT_PRESET).generator


class StandInEncoder(torch.nn.Module):
    """Photos `[B, 3, 256, 256]` to `[B, num_ws, dim]`: 8x8 average pools through a fixed random map. Its (zero)
    average latent gives its output's shape, as the e4e encoder's does."""

    def __init__(self, num_ws: int, dim: int):
        super().__init__()
        self.num_ws, self.dim = num_ws, dim
        self.map = torch.nn.Parameter(torch.randn(3 * 64, num_ws * dim, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("latent_avg", torch.zeros(num_ws, dim))

    def forward(self, photos: torch.Tensor) -> torch.Tensor:
        assert photos.shape[1:] == (3, 256, 256)
        return (F.adaptive_avg_pool2d(photos, 8).flatten(1) @ self.map).view(-1, self.num_ws, self.dim)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """The checkpoint path to pass; loading it gives a stand-in shaped for the default preset's generator."""
    loaded = []

    def load_encoder(path, *, device="cpu"):
        loaded.append(path)
        return StandInEncoder(PRESET.num_ws, PRESET.style_dim).to(device)

    monkeypatch.setattr("ffclip.checkpoints.load_encoder", load_encoder)
    path = tmp_path / "e4e.pt"
    path.write_bytes(b"stand-in")
    return path


def write_photos(folder, sizes=((300, 260, "RGB"), (256, 256, "L"), (96, 120, "RGBA"))) -> list:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h, mode) in enumerate(sizes):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
        path = folder / f"face{i}.{'jpg' if mode == 'L' else 'png'}"
        Image.fromarray(pixels, mode).save(path)
        paths.append(path)
    return paths


def test_invert_writes_codes_in_name_order(monkeypatch, capsys, tmp_path, stand_in):
    paths = write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "notes.txt").write_text("not a photo, and not read")
    out = tmp_path / "codes.npy"
    code, stdout, err = run(monkeypatch, capsys, "invert", "--images", tmp_path / "photos", "--encoder", stand_in,
                            "--out", out, "--batch-size", 2, "--device", "cpu")
    assert code == 0, err
    assert "inverted 2/3 photos" in err and "inverted 3/3 photos" in err
    codes = np.load(out)
    expected = StandInEncoder(PRESET.num_ws, PRESET.style_dim)(torch.stack([read_photo(p) for p in paths]))
    assert codes.shape == (3, PRESET.num_ws, PRESET.style_dim) and codes.dtype == np.float32
    assert np.allclose(codes, expected.detach().numpy(), atol=1e-5)
    assert (tmp_path / "codes_files.txt").read_text().split() == [p.name for p in paths]
    assert f"wrote {out}" in stdout

    # the codes are usable as --latents
    code, _, err = run(monkeypatch, capsys, "edit", "--latents", out, "--prompt", "red", "--out", tmp_path / "g.png",
                       "--device", "cpu")
    assert code == 0, err


def test_read_photo_turns_the_photo_upright(tmp_path):
    pixels = np.zeros((64, 128, 3), dtype=np.uint8)
    pixels[:, 64:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned a quarter clockwise, so the left half ends on top
    path = tmp_path / "turned.png"
    Image.fromarray(pixels).save(path, exif=exif)
    photo = read_photo(path)
    assert photo.shape == (3, 256, 256) and photo.dtype == torch.float32
    assert photo[:, :120].max() == -1 and photo[:, 136:].min() == 1


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"GIF89a but not really", "not an image that can be read"),
        ("small", "too small to invert"),
        (None, "no photos found"),
    ],
)
def test_invert_refuses_bad_photos(monkeypatch, capsys, tmp_path, stand_in, content, fragment):
    folder = tmp_path / "photos"
    folder.mkdir()
    if content == "small":
        Image.new("RGB", (48, 300)).save(folder / "tiny.png")
    elif content is not None:
        (folder / "broken.png").write_bytes(content)
    out = tmp_path / "codes.npy"
    code, _, err = run(monkeypatch, capsys, "invert", "--images", folder, "--encoder", stand_in, "--out", out)
    assert_user_error(code, err, fragment)
    assert not out.exists() and not list(tmp_path.glob(".codes*"))


def test_invert_refuses_a_file_that_is_no_encoder(monkeypatch, capsys, tmp_path):
    write_photos(tmp_path / "photos", sizes=((64, 64, "RGB"),))
    notes = tmp_path / "e4e.pt"
    notes.write_text("weights to follow")
    code, _, err = run(monkeypatch, capsys, "invert", "--images", tmp_path / "photos", "--encoder", notes,
                       "--out", tmp_path / "codes.npy")
    assert_user_error(code, err, str(notes), "an encoder is read from an e4e checkpoint")
    code, _, err = run(monkeypatch, capsys, "invert", "--images", tmp_path / "photos", "--encoder", notes,
                       "--out", tmp_path / "codes.txt")
    assert_user_error(code, err, "ending in .npy")


def test_edit_photos_writes_photo_inversion_and_edits(monkeypatch, capsys, tmp_path, stand_in):
    paths = write_photos(tmp_path / "photos", sizes=((300, 260, "RGB"), (256, 256, "L")))
    out = tmp_path / "grid.png"
    args = ["edit", "--image", paths[0], "--image", paths[1], "--encoder", stand_in, "--prompt", "blue",
            "--out", out, "--device", "cpu"]
    code, stdout, err = run(monkeypatch, capsys, *args)
    assert code == 0, err
    res = PRESET.resolution
    tile = grid_tile(res)
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[1] > 3 * tile + 2 * GAP and grid.shape[0] > 2 * tile + GAP
    shown = ((read_photo(paths[1], res) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    shown = shown.repeat(tile // res, axis=0).repeat(tile // res, axis=1)
    left = grid.shape[1] - 3 * tile - 2 * GAP  # column 0 of 3, last row: the second photo itself
    assert np.array_equal(grid[-tile:, left:left + tile], shown)
    assert "3 columns x 2 rows" in stdout
    assert np.load(tmp_path / "grid_latents.npy").shape == (1, 2, PRESET.num_ws, PRESET.style_dim)


def test_edit_photo_option_errors(monkeypatch, capsys, tmp_path, stand_in):
    paths = write_photos(tmp_path / "photos", sizes=((64, 64, "RGB"),))
    code, _, err = run(monkeypatch, capsys, "edit", "--image", paths[0], "--prompt", "x", "--out", tmp_path / "g.png")
    assert_user_error(code, err, "--image needs an encoder to invert the photos")
    code, _, err = run(monkeypatch, capsys, "edit", "--encoder", stand_in, "--prompt", "x", "--out", tmp_path / "g.png")
    assert_user_error(code, err, "--encoder inverts the --image photos")
    code, _, err = run(monkeypatch, capsys, "invert", "--images", paths[0].parent, "--out", tmp_path / "c.npy")
    assert_user_error(code, err, "either as --encoder e4e_ffhq_encode.pt or as --artifacts FOLDER")
    monkeypatch.setattr("ffclip.checkpoints.load_encoder", lambda path, device="cpu": StandInEncoder(18, 512))
    code, _, err = run(monkeypatch, capsys, "edit", "--image", paths[0], "--encoder", stand_in, "--prompt", "x",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, f"--encoder {stand_in} gives latents [B, 18, 512] but the generator takes "
                      f"[B, {PRESET.num_ws}, {PRESET.style_dim}]")
    assert not (tmp_path / "g.png").exists()


def test_invert_names_an_inconsistent_e4e_file(monkeypatch, capsys, tmp_path):
    state = e4e_weights(1, seed=7)
    path = tmp_path / "e4e_ffhq_encode.pt"
    torch.save({"state_dict": state, "latent_avg": torch.zeros(512), "opts": {"stylegan_size": 1024}}, path)
    write_photos(tmp_path / "photos", sizes=((64, 64, "RGB"),))
    code, _, err = run(monkeypatch, capsys, "invert", "--images", tmp_path / "photos", "--encoder", path,
                       "--out", tmp_path / "codes.npy", "--device", "cpu")
    assert_user_error(code, err, "with 1 style heads whose opts give stylegan_size 1024")
