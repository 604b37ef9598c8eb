"""Files that cannot be used raise one-line `CheckpointError`s naming the file, what was found and what is accepted."""

from __future__ import annotations

import pytest
import torch

from ffclip.checkpoints import extract_generator, load_generator, load_mapper, load_text_encoder, save_module
from ffclip.config import MapperConfig
from ffclip.errors import CheckpointError
from ffclip.factory import build_mapper
from reference_models import make_reference_generator

LOADERS = [load_generator, load_mapper, load_text_encoder, extract_generator]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    generator = root / "generator.pt"
    torch.save({"g_ema": make_reference_generator().state_dict(), "latent_avg": torch.zeros(32)}, generator)
    data = generator.read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.txt").write_text("these are not weights\n")
    (root / "pickle_of_list.pkl").write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94K\x01a.")
    save_module(root / "mapper.safetensors", build_mapper(MapperConfig(num_ws=4, dim=8, num_blocks=1)))
    return root


def _error(loader, path) -> str:
    with pytest.raises(CheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    return message


@pytest.mark.parametrize("loader", LOADERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("empty.pt", "an empty file"),
        ("truncated.pt", "truncated zip archive"),
        ("notes.txt", "a text file starting with 'these are"),
        ("missing.pt", "no such file"),
    ],
)
def test_unusable_files(files, loader, name, found):
    message = _error(loader, files / name)
    assert found in message
    assert "read from" in message or "extracted from" in message


def test_mapper_file_given_to_load_generator(files):
    message = _error(load_generator, files / "mapper.safetensors")
    assert "an ffclip mapper bundle" in message and "rosinality" in message


def test_generator_file_given_to_load_mapper(files):
    message = _error(load_mapper, files / "generator.pt")
    assert "'g_ema'" in message and "FFCLIP release checkpoint" in message


def test_generator_file_given_to_load_text_encoder(files):
    message = _error(load_text_encoder, files / "generator.pt")
    assert "without CLIP text weights" in message and "open_clip" in message


def test_pickle_without_a_generator(files):
    message = _error(load_generator, files / "pickle_of_list.pkl")
    assert "a pickle holding a list" in message and "G_ema" in message
