"""The photo encoder as the optional fourth stage: exported beside the three edit stages, held to float64 at export,
served by every backend's `Runtime.invert`, and a photo edited from one folder.

The encoder is e4e's layout with two style heads (the generator is 4 px, two style inputs) and reads 32 px photos,
and its IR-SE body is shortened to five units (`SHORT_BODY`: two in the first stage, so both kinds of shortcut
appear, and one in each other stage) holding the released tensors of the units they stand for; the mapper has one
block. So the export of four stages stays within seconds. The released 24-unit body is held to its reference in
test_photo_nets.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from cli_runner import run_cli as run
from export_fixtures import TINY
from filelock import FileLock
from PIL import Image

from ffclip.artifacts import MANIFEST, ArtifactError, read_manifest, write_manifest
from ffclip.config import GeneratorConfig, MapperConfig
from ffclip.errors import InputError
from ffclip.export.exporter import ExportOptions, export_artifacts
from ffclip.factory import build_preset
from ffclip.imaging import GAP, grid_tile
from ffclip.models import Encoder4Editing
from ffclip.models.encoder import EncoderConfig
from ffclip.photos import photo_batch, read_photo
from ffclip.pipeline import EditPipeline
from ffclip.runtime import Runtime
from reference_photo_models import e4e_weights
from test_cli import assert_user_error

PRESET = replace(TINY, generator=GeneratorConfig(resolution=4, channels={"4": 32}),
                 mapper=MapperConfig(num_ws=2, num_blocks=1))
NUM_WS = 2
SIZE = 32
SHORT_BODY = (2, 1, 1, 1)
RELEASED_UNITS = (0, 1, 3, 7, 21)  # the released body's units the short one takes (the same widths and strides)
OPTIONS = ExportOptions(formats=("onnx", "torchscript"), min_batch=2, opt_batch=2, max_batch=2, photo_size=SIZE)
# every backend against the folder's eager encoder, relative to the largest |w|: float32 graphs of the same maths
BACKEND_TOLERANCE = 1e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


pytestmark = pytest.mark.slow  # one export of four stages


def short_encoder() -> Encoder4Editing:
    """The encoder with `SHORT_BODY`, its tensors those of a released-layout e4e checkpoint (units renumbered)."""
    state = {k.removeprefix("encoder."): v for k, v in e4e_weights(NUM_WS, seed=3).items()}
    for new, old in enumerate(RELEASED_UNITS):
        state.update({k.replace(f"body.{old}.", f"body.{new}.", 1): v for k, v in state.items()
                      if k.startswith(f"body.{old}.")})
    state = {k: v for k, v in state.items() if not k.startswith("body.") or int(k.split(".")[1]) < len(RELEASED_UNITS)}
    state["latent_avg"] = torch.randn(512, generator=torch.Generator().manual_seed(4)).expand(NUM_WS, 512)
    with torch.device("meta"):
        encoder = Encoder4Editing(EncoderConfig(NUM_WS, SHORT_BODY))
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The exported folder, each stage's and format's export status, the encoder and the three stages. The folder is
    exported once per run: pytest-xdist's processes (`make test`) share it through a folder of the run and a lock."""
    encoder, modules = short_encoder(), build_preset(PRESET)
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each process's own
    with FileLock(shared / "photo_stage.lock"):
        folder, statuses = shared / "photo_stage" / "artifacts", shared / "photo_stage" / "statuses.json"
        if not statuses.is_file():
            folder.parent.mkdir(exist_ok=True)
            report = export_artifacts(modules, folder, OPTIONS, preset="tiny", sources={}, encoder=encoder)
            statuses.write_text(json.dumps([[o.stage, o.format, o.status] for o in report.outcomes]))
        status = {(stage, fmt): value for stage, fmt, value in json.loads(statuses.read_text())}
    return folder, status, encoder, modules


def uint8_photos(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_encoder_stage_is_built_listed_hashed_and_held_to_float64(exported):
    folder, status, _, _ = exported
    assert status["encoder", "onnx"] == status["encoder", "torchscript"] == "built"
    manifest = read_manifest(folder)
    assert manifest["model"]["photo_size"] == SIZE
    entry = manifest["stages"]["encoder"]
    assert entry["inputs"] == [{"name": "images", "dtype": "float32", "shape": ["batch", 3, SIZE, SIZE]}]
    assert entry["outputs"] == [{"name": "w", "dtype": "float32", "shape": ["batch", NUM_WS, 512]}]
    for fmt in ("onnx", "torchscript", "eager"):
        assert len(manifest["files"][entry["files"][fmt]]) == 64
    for fmt in ("onnx", "torchscript"):
        parity = entry["parity"][fmt]
        assert parity["reference"] == "float64" and parity["ok"]
        assert parity["tolerance"] == {"metric": "rel", "value": 1e-4} and parity["max_rel_err"] <= 1e-4


def test_every_backend_inverts_as_the_eager_encoder(exported):
    folder, _, encoder, _ = exported
    photos = uint8_photos(3, 40, 48)  # not square, not the encoder's size; three rows run as chunks of two
    with torch.no_grad():
        direct = encoder(photo_batch(photos, SIZE))
    with Runtime.load(folder, backend="eager") as eager:
        reference = eager.invert(photos)
        assert reference.shape == (3, NUM_WS, 512) and reference.dtype == torch.float32
        assert relative(reference, direct) <= 1e-6
        assert torch.equal(eager.invert(photo_batch(photos, SIZE)), reference)  # float in [-1, 1], already sized
    for backend in ("onnxruntime", "torchscript"):
        with Runtime.load(folder, backend=backend) as runtime:
            assert relative(runtime.invert(photos), reference) <= BACKEND_TOLERANCE, backend


def test_bad_photos_get_one_line(exported):
    folder, _, _, _ = exported
    with Runtime.load(folder, backend="onnxruntime") as runtime:
        for bad, fragment in [(torch.rand(2, 3, 8, 8) * 255, "finite values in [-1, 1]"),
                              (torch.zeros(2, 8, 8, dtype=torch.uint8), "expected [B, 3, H, W]"),
                              (torch.zeros(1, 3, 8, 8, dtype=torch.int32), "pass uint8 pixels or floats")]:
            with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
                runtime.invert(bad)


def test_photo_to_edit_from_one_folder(exported, monkeypatch, capsys, tmp_path):
    folder, _, _, _ = exported
    rng = np.random.default_rng(1)
    (tmp_path / "photos").mkdir()
    paths = []
    for i, (w, h) in enumerate(((80, 72), (64, 64))):
        paths.append(tmp_path / "photos" / f"face{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    with Runtime.load(folder) as runtime:
        w = runtime.invert(torch.stack([read_photo(p) for p in paths]))
        expected_images, expected_latents = runtime.edit_with_latents(w, "a smile")

    out = tmp_path / "grid.png"
    code, stdout, err = run(monkeypatch, capsys, "edit", "--image", paths[0], "--image", paths[1], "--artifacts", folder,
                            "--prompt", "a smile", "--out", out, "--device", "cpu")
    assert code == 0, err
    assert "3 columns x 2 rows" in stdout and f"the encoder stage of {folder}" in err
    grid = np.asarray(Image.open(out).convert("RGB"))
    res = PRESET.generator.resolution
    tile = grid_tile(res)
    for row, image in enumerate(expected_images.numpy()):  # the last column, its two rows from the bottom edge
        top = grid.shape[0] - (2 - row) * tile - (1 - row) * GAP
        shown = image.repeat(tile // res, axis=0).repeat(tile // res, axis=1)
        assert np.array_equal(grid[top:top + tile, grid.shape[1] - tile:], shown)
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "grid_latents.npy"))[0], expected_latents, atol=1e-6)

    codes = tmp_path / "codes.npy"
    code, _, err = run(monkeypatch, capsys, "invert", "--images", tmp_path / "photos", "--artifacts", folder, "--out", codes,
                       "--device", "cpu")
    assert code == 0, err
    assert torch.allclose(torch.from_numpy(np.load(codes)), w, atol=1e-6)


def test_a_folder_without_the_encoder_stays_valid_and_says_so(exported, monkeypatch, capsys, tmp_path):
    folder, _, _, _ = exported
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["stages"]["encoder"], manifest["model"]["photo_size"]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in manifest["files"]:
        if not name.startswith(("encoder", "onnx/encoder", "torchscript/encoder")):
            (plain / name).parent.mkdir(parents=True, exist_ok=True)
            (plain / name).write_bytes((folder / name).read_bytes())
    write_manifest(plain, manifest)
    with Runtime.load(plain, backend="onnxruntime") as runtime:
        assert not runtime.has_encoder
        with pytest.raises(InputError, match="no encoder stage, so photos cannot be inverted; re-export") as caught:
            runtime.invert(uint8_photos(1, SIZE, SIZE))
        assert "\n" not in str(caught.value)
    photo = tmp_path / "face.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(photo)
    code, _, err = run(monkeypatch, capsys, "edit", "--image", photo, "--artifacts", plain, "--prompt", "x",
                       "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "no encoder stage")
    assert not (tmp_path / "g.png").exists()

    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["model"]["photo_size"]
    (plain / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="photo_size"):
        read_manifest(plain, verify=False)


def test_the_encoder_must_fit_the_generator(exported, tmp_path):
    _, _, encoder, modules = exported
    with torch.device("meta"):
        wrong = Encoder4Editing(EncoderConfig(NUM_WS + 1))
    with pytest.raises(InputError, match=r"^--encoder e4e.pt gives latents \[B, 3, 512\] but the generator takes "
                                         r"\[B, 2, 512\]"):
        export_artifacts(lambda: modules, tmp_path / "out", OPTIONS, preset="tiny", sources={}, encoder=wrong,
                         encoder_name="--encoder e4e.pt")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=r"\[B, 3, 512\]"):
        EditPipeline(*modules, encoder=wrong)

    pipeline = EditPipeline(*modules, encoder=encoder)
    photos = uint8_photos(1, SIZE, SIZE, seed=5)  # one: the pipeline's encoder reads 256 px
    with torch.no_grad():
        assert torch.equal(pipeline.invert(photos), encoder(photo_batch(photos, 256)))
    with pytest.raises(InputError, match="no photo encoder; pass encoder="):
        EditPipeline(*modules).invert(photos)
