"""Photos as they come: black borders through the project's own resize, outsized images refused before decoding, and
`ffclip invert`'s name list holding any file name in step with the codes."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import run_cli
from test_photo_cli import stand_in  # noqa: F401 (a fixture)

from ffclip.errors import InputError
from ffclip.photos import MAX_PHOTO_PIXELS, photo_batch, photo_latents, quote_name, read_photo_names, unquote_name


def _bordered(size: int) -> torch.Tensor:
    pixels = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    pixels[..., size // 4:-size // 4, size // 4:-size // 4] = 255
    return pixels


@pytest.mark.parametrize("size", [337, 374, 522])
def test_a_black_bordered_photo_resized_here_stays_in_range(size):
    """The antialiased resize lands 2e-7 past -1 and 1 at these sizes; what it gives must pass the strict check that
    `Runtime.invert` makes of floats."""
    resized = photo_batch(_bordered(size), 256)
    assert resized.min() >= -1 and resized.max() <= 1
    assert torch.equal(photo_batch(resized, 256), resized)


def test_photo_latents_pass_bordered_photos_to_a_strict_encoder(tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(_bordered(337)[0].permute(1, 2, 0).numpy()).save(path)
    codes, shown = photo_latents(lambda x: photo_batch(x, 256).mean((2, 3))[:, None], [path], 64)
    assert codes.shape == (1, 1, 3) and shown.shape == (1, 64, 64, 3)


def test_floats_a_caller_passes_out_of_range_are_still_refused():
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        photo_batch(torch.full((1, 3, 300, 300), -1.0000002), 256)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: anything that decodes it fails another way."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_a_photo_of_too_many_pixels_is_refused_before_decoding(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "huge.png").write_bytes(_png_header(13000, 13000))
    assert 13000 * 13000 > MAX_PHOTO_PIXELS
    (tmp_path / "e4e.pt").write_bytes(b"never read")
    run = subprocess.run([str(Path(sys.executable).parent / "ffclip"), "invert", "--images", str(photos), "--encoder",
                          str(tmp_path / "e4e.pt"), "--out", str(tmp_path / "codes.npy")],
                         capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "huge.png" in lines[0] and "13000x13000" in lines[0] and "megapixels" in lines[0]
    assert not (tmp_path / "codes.npy").exists()


@pytest.mark.parametrize("name", ["face.png", "tab\there.png", "new\nline.png", "back\\slash.png", "café.png",
                                  "raw\udce9byte.png", "line\u2028sep.png", "x\\x41.png", "nel\x85.png"])
def test_quoted_names_are_one_line_and_read_back(name):
    quoted = quote_name(name)
    assert len(quoted.splitlines()) == 1 and quoted.encode("utf-8")
    assert unquote_name(quoted) == name
    if name in ("face.png", "café.png"):
        assert quoted == name


@pytest.mark.skipif(sys.platform != "linux", reason="file names of arbitrary bytes are a Linux file system's")
def test_invert_lists_any_file_name_in_step_with_the_codes(monkeypatch, capsys, tmp_path, stand_in):  # noqa: F811
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [b"a\xe9.png", b"b\nc.png", b"d.png"]
    rng = np.random.default_rng(0)
    for name in names:
        pixels = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.fsdecode(os.fsencode(photos) + b"/" + name))
    out = tmp_path / "codes.npy"
    listed = tmp_path / "codes_files.txt"
    listed.write_text("stale.png\n")
    code, _, err = run_cli(monkeypatch, capsys, "invert", "--images", photos, "--encoder", stand_in, "--out", out)
    assert code == 0, err
    assert len(np.load(out)) == 3
    text = listed.read_bytes().decode("utf-8")
    assert len(text.splitlines()) == 3 and text.splitlines()[2] == "d.png"
    assert [os.fsencode(n) for n in read_photo_names(listed)] == sorted(names)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_invert_that_fails_leaves_the_earlier_codes_and_names_as_they_were(monkeypatch, capsys, tmp_path,
                                                                            stand_in):  # noqa: F811
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8)).save(photos / "a.png")
    out, listed = tmp_path / "codes.npy", tmp_path / "codes_files.txt"
    np.save(out, np.zeros((1, 2, 3), dtype=np.float32))
    listed.write_text("old.png\n")

    def fail(*args, **kwargs):
        raise InputError("the names cannot be written")

    monkeypatch.setattr("ffclip.photos.quote_name", fail)
    code, _, err = run_cli(monkeypatch, capsys, "invert", "--images", photos, "--encoder", stand_in, "--out", out)
    assert code == 2, err
    assert np.load(out).shape == (1, 2, 3) and listed.read_text() == "old.png\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "codes_files.txt", "e4e.pt", "photos"]


def test_read_photo_names_of_a_plain_list(tmp_path):
    path = Path(tmp_path / "names.txt")
    path.write_text("a.png\nb.png\n", encoding="utf-8")
    assert read_photo_names(path) == ["a.png", "b.png"]
