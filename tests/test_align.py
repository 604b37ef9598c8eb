"""`--align`: the FFHQ crop square by hand, the alignment of a drawn face moved by a known similarity transform, the
landmark sources' mapping to the recipe's four points, and the one-line errors of `ffclip invert` and `ffclip edit`.

No landmark model can be run here (dlib and MediaPipe are optional extras and their model files are not at hand), so
the landmark sources appear as test doubles, each saying what it stands for and holding to the names the packages
declare.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import sys
import types
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
import torch
from cli_runner import run_cli as run
from PIL import Image

from ffclip.align import (
    LANDMARK_FORMATS,
    DlibLandmarks,
    FaceAligner,
    MediaPipeLandmarks,
    align_face,
    crop_quad,
    fill_outside,
    gaussian_blur,
    open_landmarks,
    points_from_68,
    points_from_mesh,
)
from ffclip.errors import CheckpointError, InputError
from ffclip.imaging import GAP, grid_tile
from ffclip.photos import read_photo
from test_cli import assert_user_error
from test_photo_cli import PRESET, StandInEncoder, stand_in  # noqa: F401 (stand_in is a fixture)

# Marks drawn at the four points: red, green, blue and yellow discs on a gray gradient.
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.float64)
# Where a mark's centre lands in the aligned picture, at most this far (in pixels of a 128 px output) from where the
# square's geometry puts it. Measured: 0.03 at most. Leaving out the recipe's half-pixel offset of the square's
# corners moves the marks by 0.27.
MARK_TOLERANCE = 0.1


@pytest.mark.parametrize(
    "points, quad",
    [
        # upright; the mouth sets the size: |e| = 60, |m| = 65, half-side max(120, 117) = 120, centre (160, 146.5)
        ([[130, 140], [190, 140], [137, 205], [183, 205]], [[40, 26.5], [40, 266.5], [280, 266.5], [280, 26.5]]),
        # wide-set eyes set the size: |e| = 100, |m| = 40, half-side 200, centre (150, 104)
        ([[100, 100], [200, 100], [130, 140], [170, 140]], [[-50, -96], [-50, 304], [350, 304], [350, -96]]),
        # a quarter turn (the head's top towards +x): right axis (0, 1), down axis (-1, 0), half-side 126,
        # centre (100, 130) + 0.1 (-70, 0)
        ([[100, 100], [100, 160], [30, 120], [30, 140]], [[219, 4], [-33, 4], [-33, 256], [219, 256]]),
    ],
)
def test_crop_quad_by_hand(points, quad):
    assert np.allclose(crop_quad(np.array(points, dtype=np.float64)), quad, atol=1e-12)


def test_crop_quad_moves_with_the_face():
    rng = np.random.default_rng(0)
    points = np.array([[130, 140], [190, 140], [137, 205], [183, 205]], dtype=np.float64) + rng.normal(0, 3, (4, 2))
    angle, scale, shift = 0.7, 1.9, np.array([-40.0, 310.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    assert np.allclose(crop_quad(points @ rotation.T + shift), crop_quad(points) @ rotation.T + shift, atol=1e-9)


def test_points_from_68_and_from_the_mesh():
    lm = np.zeros((68, 2))
    lm[36:42] = [[10, 20], [12, 18], [14, 18], [16, 20], [14, 22], [12, 22]]  # centre (13, 20)
    lm[42:48] = lm[36:42] + [30, 1]
    lm[48], lm[54] = [15, 50], [42, 51]
    assert np.allclose(points_from_68(lm), [[13, 20], [43, 21], [15, 50], [42, 51]])
    assert points_from_68(np.stack([lm, lm + 1])).shape == (2, 4, 2)

    mesh = np.zeros((478, 2))
    mesh[[33, 160, 158, 133, 153, 144]] = [[10, 20], [12, 18], [14, 18], [16, 20], [14, 22], [12, 22]]
    mesh[[362, 385, 387, 263, 373, 380]] = [[40, 21], [42, 19], [44, 19], [46, 21], [44, 23], [42, 23]]
    mesh[61], mesh[291] = [15, 50], [42, 51]
    assert np.allclose(points_from_mesh(mesh), [[13, 20], [43, 21], [15, 50], [42, 51]])


def test_gaussian_blur_is_a_mirrored_gaussian_sum():
    rng = np.random.default_rng(1)
    image = rng.random((9, 7, 2)).astype(np.float32)
    sigma = 1.3
    radius = int(4 * sigma + 0.5)
    weights = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    weights /= weights.sum()

    def mirror(i: int, n: int) -> int:  # ... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...
        while not 0 <= i < n:
            i = -i - 1 if i < 0 else 2 * n - 1 - i
        return i

    expected = np.zeros(image.shape)
    for r in range(9):
        for c in range(7):
            for a in range(-radius, radius + 1):
                for b in range(-radius, radius + 1):
                    weight = weights[a + radius] * weights[b + radius]
                    expected[r, c] += weight * image[mirror(r + a, 9), mirror(c + b, 7)]
    assert np.abs(gaussian_blur(image, sigma) - expected).max() < 1e-5
    assert np.array_equal(gaussian_blur(image, 0.1), image)


def test_fill_outside_mirrors_blurs_and_fades():
    image = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    left, top, right, bottom = 10, 12, 6, 8
    out = fill_outside(image, (left, top, right, bottom), qsize=100.0)  # blur sigma 2
    assert out.shape == (top + 40 + bottom, left + 50 + right, 3)
    # Untouched further in than a third of each pad; the outermost ring is the median colour.
    assert np.array_equal(out[top + 4:top + 40 - 3, left + 4:left + 50 - 2], image[4:-3, 4:-2])
    ring = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    assert (ring.max(0) - ring.min(0)).max() <= 1
    # Just outside the photo: the mirrored noise, blurred.
    band = out[top - 4:top, left:left + 50].astype(np.float64)
    assert band.std() < 0.3 * image.std()


def draw_face(height: int, width: int, points: np.ndarray, radius: float) -> np.ndarray:
    """A gray gradient with a disc of radius `radius` in each of `COLOURS` at `points` (pixel centres at integers),
    edges antialiased by 4x4 subsamples."""
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([80 + 60 * xx / width + 40 * yy / height] * 3, axis=-1)
    offsets = (np.arange(4) + 0.5) / 4 - 0.5
    for point, colour in zip(points, COLOURS):
        x0, y0 = int(point[0] - radius - 2), int(point[1] - radius - 2)
        x1, y1 = int(point[0] + radius + 3), int(point[1] + radius + 3)
        py, px = np.mgrid[y0:y1, x0:x1]
        sy = py[..., None, None] + offsets[:, None] - point[1]
        sx = px[..., None, None] + offsets[None, :] - point[0]
        cover = ((sx**2 + sy**2) <= radius**2).mean(axis=(-1, -2))[..., None]
        image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - cover) + colour * cover
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def mark_centres(image: np.ndarray) -> np.ndarray:
    """The centre `[4, 2]` (x, y) of each coloured mark, weighting every pixel by how much of that colour it holds
    beyond a quarter of full strength (below that lie the faint rings resampling leaves around a mark of the
    opposite colour: blue around yellow, yellow around blue)."""
    rgb = image.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    weights = [r - np.maximum(g, b), g - np.maximum(r, b), b - np.maximum(r, g), np.minimum(r, g) - b]
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    centres = []
    for w in weights:
        w = np.clip(w - 64, 0, None)
        centres.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(centres)


def test_alignment_follows_a_face_moved_by_a_similarity_transform():
    size = 128
    # The face upright: eyes 60 apart, mouth 65 below them; the square has half-side 120 and centre (160, 146.5)
    # and lies inside the photo, so only the crop runs.
    face = np.array([[130, 140], [190, 140], [137, 205], [183, 205]], dtype=np.float64)
    half, centre = 120.0, np.array([160.0, 146.5])
    # Where the marks belong in the output: the square's coordinates scaled to the output, pixel centres at integers.
    expected = (face - centre + half) * size / (2 * half) - 0.5

    upright = align_face(draw_face(300, 320, face, 5.0), face, size)
    assert upright.shape == (size, size, 3) and upright.dtype == np.uint8
    assert np.abs(mark_centres(upright) - expected).max() < MARK_TOLERANCE

    # The same face turned by 25 degrees, 2.7 times larger, near the photo's left edge: the photo is shrunk by 2
    # first (the square is 648 px for a 128 px output), and a corner of the square lies outside and is filled in.
    angle, scale, shrink = math.radians(25), 2.7, 2
    axes = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])  # columns: right, down
    shift = np.array([330.0, 400.0]) - centre @ (scale * axes).T
    moved = face @ (scale * axes).T + shift
    assert crop_quad(moved)[:, 0].min() < -50  # the square leaves the photo
    turned = align_face(draw_face(800, 900, moved, 5.0 * scale), moved, size)
    # The recipe divides coordinates by the shrink factor, whereas the shrunk photo's pixel centres sit at
    # (p + 0.5) / 2 - 0.5: its content lies a quarter of a shrunk pixel up and left of where the square expects it.
    offset = np.full(2, -(shrink - 1) / (2 * shrink)) @ axes * size / (2 * half * scale / shrink)
    assert np.abs(mark_centres(turned) - (expected + offset)).max() < MARK_TOLERANCE
    assert turned[-10:, :10].min() > 40  # that corner, outside the photo, is filled (mirrored, faded), not black


class ListedFaces:
    """Stands for a landmark model: returns the faces it was given, whatever the photo."""

    name = "a list of faces"

    def __init__(self, faces: list) -> None:
        self.faces = np.array(faces, dtype=np.float64).reshape(-1, 4, 2)
        self.seen: list[tuple[int, ...]] = []

    def __call__(self, photo: np.ndarray) -> np.ndarray:
        self.seen.append(photo.shape)
        return self.faces


SMALL = [[130, 140], [190, 140], [137, 205], [183, 205]]
LARGE = [[100, 120], [200, 125], [110, 230], [190, 232]]


def test_the_aligner_takes_the_largest_face_and_says_so():
    photo = draw_face(300, 320, np.array(SMALL, dtype=np.float64), 5.0)
    notes = []
    aligned = FaceAligner(ListedFaces([SMALL, LARGE]), notes.append)(photo, 64, "group.png")
    assert np.array_equal(aligned, align_face(photo, np.array(LARGE, dtype=np.float64), 64))
    assert notes == ["group.png: 2 faces found; aligning the largest"]
    with pytest.raises(InputError, match="nobody.png: no face found") as caught:
        FaceAligner(ListedFaces([]))(photo, 64, "nobody.png")
    assert "leave --align out" in str(caught.value)
    with pytest.raises(InputError, match="blur.png: the landmarks .* place no crop square"):
        FaceAligner(ListedFaces([[[5, 5]] * 4]))(photo, 64, "blur.png")


def test_landmark_model_files_are_checked(tmp_path, monkeypatch):
    cases = [(tmp_path / "landmarks.onnx", b"x", "a file ending in '.onnx'"),
             (tmp_path / "missing.dat", None, "no such file"),
             (tmp_path / "empty.task", b"", "an empty file"),
             (tmp_path / "face_landmarker.task", b"not a zip", "a file that is not a MediaPipe task bundle")]
    for path, content, found in cases:
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(CheckpointError) as caught:
            open_landmarks(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: found {found}") and message.endswith(LANDMARK_FORMATS), message

    monkeypatch.setitem(sys.modules, "dlib", None)  # importing dlib now fails, as when it is not installed
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    (tmp_path / "shape_predictor_68_face_landmarks.dat").write_bytes(b"\x00" * 16)
    with zipfile.ZipFile(tmp_path / "face_landmarker.task", "w") as bundle:
        bundle.writestr("face_landmarks_detector.tflite", b"\x00" * 16)
    for name, extra in [("shape_predictor_68_face_landmarks.dat", "align-dlib"),
                        ("face_landmarker.task", "align-mediapipe")]:
        with pytest.raises(InputError, match=rf"pip install 'ffclip\[{extra}\]'"):
            open_landmarks(tmp_path / name)


# What ffclip.align uses of each landmark package, as the package documents its Python API (dlib.net/python;
# MediaPipe's mp.* Python reference, 0.10): each key is a path from the package, and the names an object there has;
# for a key ending in "()", the keyword arguments calling it takes. The stand-ins below have and take these names
# only, so a misspelt name in ffclip.align fails here; test_the_recorded_api_is_the_installed_packages holds the
# record against each package that is installed.
DLIB_API = {
    "": ("shape_predictor", "get_frontal_face_detector", "full_object_detection", "point"),
    "full_object_detection": ("num_parts", "parts"),
    "point": ("x", "y"),
}
MEDIAPIPE_API = {
    "": ("Image", "ImageFormat", "tasks"),
    "Image()": ("image_format", "data"),
    "ImageFormat": ("SRGB", "SRGBA", "GRAY8"),
    "tasks": ("BaseOptions", "vision"),
    "tasks.BaseOptions()": ("model_asset_path", "model_asset_buffer", "delegate"),
    "tasks.vision": ("FaceLandmarker", "FaceLandmarkerOptions", "FaceLandmarkerResult", "RunningMode"),
    "tasks.vision.FaceLandmarker": ("create_from_options", "detect"),
    "tasks.vision.FaceLandmarkerOptions()": (
        "base_options", "running_mode", "num_faces", "min_face_detection_confidence", "min_face_presence_confidence",
        "min_tracking_confidence", "output_face_blendshapes", "output_facial_transformation_matrixes",
        "result_callback",
    ),
    "tasks.vision.FaceLandmarkerResult": ("face_landmarks", "face_blendshapes", "facial_transformation_matrixes"),
    "tasks.vision.RunningMode": ("IMAGE", "VIDEO", "LIVE_STREAM"),
    "tasks.components.containers.NormalizedLandmark": ("x", "y", "z", "visibility", "presence"),
}


def stand_in_for(api: dict[str, tuple[str, ...]], path: str, **members: object) -> types.SimpleNamespace:
    """A stand-in for the object at `path` in a package holding `members`, each a name the package declares there."""
    undeclared = sorted(set(members) - set(api[path]))
    assert not undeclared, f"{path or 'the package'} declares no {undeclared}"
    return types.SimpleNamespace(**members)


def call_stand_in_for(api: dict[str, tuple[str, ...]], path: str) -> Callable[..., types.SimpleNamespace]:
    """A stand-in for calling `path` (its keyword arguments as attributes of what it returns); a keyword the package
    does not declare raises TypeError, as the package's own would."""

    def call(**kwargs: object) -> types.SimpleNamespace:
        undeclared = sorted(set(kwargs) - set(api[f"{path}()"]))
        if undeclared:
            raise TypeError(f"{path}() got unexpected keyword arguments {undeclared}")
        return types.SimpleNamespace(**kwargs)

    return call


def _declared_names(obj: object, call: bool) -> set[str]:
    """The keyword arguments calling `obj` takes (`call`), or the names `obj` has (a dataclass: its fields too)."""
    if dataclasses.is_dataclass(obj):
        fields = {f.name for f in dataclasses.fields(obj)}
        return fields if call else fields | set(dir(obj))
    if not call:
        return set(dir(obj))
    try:
        return set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):  # a compiled class (pybind11) writes its signatures into its docstring instead
        return set(re.findall(r"(\w+): ", obj.__init__.__doc__ or ""))


@pytest.mark.parametrize("package, api", [("dlib", DLIB_API), ("mediapipe", MEDIAPIPE_API)])
def test_the_recorded_api_is_the_installed_packages(package, api):
    module = pytest.importorskip(package)
    for key, names in api.items():
        path = key.removesuffix("()")
        obj = functools.reduce(getattr, filter(None, path.split(".")), module)
        missing = sorted(set(names) - _declared_names(obj, key.endswith("()")))
        assert not missing, f"{package}.{path} declares no {missing}"


def fake_dlib(parts: list[list[list[int]]], loads: bool = True) -> types.SimpleNamespace:
    """Stands for the dlib package as `DlibLandmarks` uses it: a detector giving one box per face and a shape
    predictor giving each face's `parts` (or failing to load, as dlib does on a damaged file)."""

    def shape(points: list[list[int]]) -> types.SimpleNamespace:
        return stand_in_for(DLIB_API, "full_object_detection", num_parts=len(points),
                            parts=lambda: [stand_in_for(DLIB_API, "point", x=x, y=y) for x, y in points])

    def shape_predictor(path):
        if not loads:
            raise RuntimeError("Unexpected version found while deserializing dlib::shape_predictor.")
        return lambda photo, box: shape(parts[box])

    return stand_in_for(DLIB_API, "", shape_predictor=shape_predictor,
                        get_frontal_face_detector=lambda: lambda photo, upsample: list(range(len(parts))))


def test_dlib_source_gives_the_four_points(tmp_path, monkeypatch):
    path = tmp_path / "shape_predictor_68_face_landmarks.dat"
    path.write_bytes(b"\x00" * 16)
    lm = np.arange(136).reshape(68, 2)
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib([lm.tolist(), (lm + 5).tolist()]))
    source = open_landmarks(path)
    assert isinstance(source, DlibLandmarks)
    assert np.allclose(source(np.zeros((64, 64, 3), np.uint8)), points_from_68(np.stack([lm, lm + 5])))

    monkeypatch.setitem(sys.modules, "dlib", fake_dlib([[[0, 0]] * 5]))
    with pytest.raises(CheckpointError, match="a shape predictor with 5 points, not 68"):
        open_landmarks(path)(np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib([], loads=False))
    with pytest.raises(CheckpointError, match="a file dlib cannot read as a shape predictor"):
        open_landmarks(path)
    monkeypatch.setitem(sys.modules, "dlib", fake_dlib([]))
    assert open_landmarks(path)(np.zeros((64, 64, 3), np.uint8)).shape == (0, 4, 2)


def fake_mediapipe(meshes: list[np.ndarray], opens: bool = True) -> tuple[types.SimpleNamespace, list]:
    """Stands for the mediapipe package as `MediaPipeLandmarks` uses it: a face landmarker in image mode whose
    result holds `meshes` (normalised x, y per point), or that fails to open, as MediaPipe does on a damaged bundle.
    Returns the package and the list of the options each landmarker was created with."""
    api, created = MEDIAPIPE_API, []
    result = stand_in_for(api, "tasks.vision.FaceLandmarkerResult", face_landmarks=[
        [stand_in_for(api, "tasks.components.containers.NormalizedLandmark", x=x, y=y) for x, y in mesh]
        for mesh in meshes])

    def create_from_options(options):
        if not opens:
            raise ValueError("Unable to open the model")
        created.append(options)
        return stand_in_for(api, "tasks.vision.FaceLandmarker", detect=lambda image: result)

    vision = stand_in_for(
        api, "tasks.vision", FaceLandmarkerOptions=call_stand_in_for(api, "tasks.vision.FaceLandmarkerOptions"),
        FaceLandmarker=stand_in_for(api, "tasks.vision.FaceLandmarker", create_from_options=create_from_options),
        RunningMode=stand_in_for(api, "tasks.vision.RunningMode", IMAGE="image"))
    tasks = stand_in_for(api, "tasks", vision=vision, BaseOptions=call_stand_in_for(api, "tasks.BaseOptions"))
    module = stand_in_for(api, "", tasks=tasks, Image=call_stand_in_for(api, "Image"),
                          ImageFormat=stand_in_for(api, "ImageFormat", SRGB="srgb"))
    return module, created


def test_mediapipe_source_gives_the_four_points_in_pixels(tmp_path, monkeypatch):
    path = tmp_path / "face_landmarker.task"
    with zipfile.ZipFile(path, "w") as bundle:
        bundle.writestr("face_landmarks_detector.tflite", b"\x00" * 16)
    mesh = np.random.default_rng(2).random((478, 2))
    module, created = fake_mediapipe([mesh])
    monkeypatch.setitem(sys.modules, "mediapipe", module)
    source = open_landmarks(path)
    assert isinstance(source, MediaPipeLandmarks)
    options = created[0]
    assert options.running_mode == "image" and options.num_faces > 1
    assert options.base_options.model_asset_path == str(path)
    pixels = mesh * [200, 100] - 0.5  # a 200 x 100 photo; normalised coordinates span it edge to edge
    assert np.allclose(source(np.zeros((100, 200, 3), np.uint8)), points_from_mesh(pixels)[None])

    monkeypatch.setitem(sys.modules, "mediapipe", fake_mediapipe([], opens=False)[0])
    with pytest.raises(CheckpointError, match="MediaPipe cannot open as a face landmarker"):
        open_landmarks(path)


@pytest.fixture
def landmarks(monkeypatch):
    """Puts a `ListedFaces` in place of the landmark model that --align names; returns a setter for its faces."""
    opened = []

    def use(faces: list) -> list:
        source = ListedFaces(faces)
        monkeypatch.setattr("ffclip.align.open_landmarks", lambda path: opened.append(path) or source)
        return opened

    return use


def write_portraits(folder, count: int = 2) -> list:
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(folder / f"portrait{i}.png")
        Image.fromarray(draw_face(300, 320, np.array(SMALL, dtype=np.float64), 5.0)).save(paths[-1])
    return paths


def test_invert_aligns_the_photos(monkeypatch, capsys, tmp_path, stand_in, landmarks):  # noqa: F811
    paths = write_portraits(tmp_path / "photos")
    model = tmp_path / "face_landmarker.task"
    opened = landmarks([SMALL, LARGE])
    out = tmp_path / "codes.npy"
    code, _, err = run(monkeypatch, capsys, "invert", "--images", tmp_path / "photos", "--encoder", stand_in,
                       "--align", model, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert opened == [model]
    assert f"note: {paths[1]}: 2 faces found; aligning the largest" in err
    aligned = [align_face(np.asarray(Image.open(p)), np.array(LARGE, dtype=np.float64), 256) for p in paths]
    photos = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in aligned])
    expected = StandInEncoder(PRESET.num_ws, PRESET.style_dim)(photos).detach().numpy()
    assert np.allclose(np.load(out), expected, atol=1e-5)
    assert not np.allclose(np.load(out)[0], StandInEncoder(PRESET.num_ws, PRESET.style_dim)(
        read_photo(paths[0])[None]).detach().numpy(), atol=1e-3)  # without --align the codes differ


def test_edit_aligns_the_photos_it_shows(monkeypatch, capsys, tmp_path, stand_in, landmarks):  # noqa: F811
    paths = write_portraits(tmp_path / "photos", 1)
    landmarks([SMALL])
    out = tmp_path / "grid.png"
    code, _, err = run(monkeypatch, capsys, "edit", "--image", paths[0], "--encoder", stand_in, "--align",
                       tmp_path / "m.dat", "--prompt", "blue", "--out", out, "--device", "cpu")
    assert code == 0, err
    res = PRESET.resolution
    grid = np.asarray(Image.open(out).convert("RGB"))
    aligned = align_face(np.asarray(Image.open(paths[0])), np.array(SMALL, dtype=np.float64), 256)
    shown = read_photo(paths[0], res, align=lambda photo, size, where: aligned)
    shown = ((shown + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    tile = grid_tile(res)
    shown = shown.repeat(tile // res, axis=0).repeat(tile // res, axis=1)
    left = grid.shape[1] - 3 * tile - 2 * GAP  # column 0 of photo, inversion and one prompt
    assert np.array_equal(grid[grid.shape[0] - tile:, left:left + tile], shown)


def test_align_errors_are_one_line_and_write_nothing(monkeypatch, capsys, tmp_path, stand_in, landmarks):  # noqa: F811
    paths = write_portraits(tmp_path / "photos")
    out = tmp_path / "codes.npy"
    invert = ["invert", "--images", tmp_path / "photos", "--encoder", stand_in, "--out", out, "--device", "cpu"]

    junk = tmp_path / "face_landmarker.task"
    junk.write_bytes(b"<html>not found</html>")
    code, _, err = run(monkeypatch, capsys, *invert, "--align", junk)
    assert_user_error(code, err, str(junk), "not a MediaPipe task bundle", ".dat dlib 68-point shape predictor")
    code, _, err = run(monkeypatch, capsys, *invert, "--align", tmp_path / "missing.dat")
    assert_user_error(code, err, "missing.dat: found no such file", ".task MediaPipe face landmarker")

    monkeypatch.setitem(sys.modules, "dlib", None)
    model = tmp_path / "shape_predictor_68_face_landmarks.dat"
    model.write_bytes(b"\x00" * 16)
    code, _, err = run(monkeypatch, capsys, "edit", "--image", paths[0], "--encoder", stand_in, "--align", model,
                       "--prompt", "x", "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, "the dlib package is not installed", "pip install 'ffclip[align-dlib]'")

    landmarks([])
    code, _, err = run(monkeypatch, capsys, *invert, "--align", model)
    assert_user_error(code, err, f"{paths[0]}: no face found")
    code, _, err = run(monkeypatch, capsys, "edit", "--image", paths[1], "--encoder", stand_in, "--align", model,
                       "--prompt", "x", "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(code, err, f"{paths[1]}: no face found")
    code, _, err = run(monkeypatch, capsys, "edit", "--align", model, "--prompt", "x", "--out", tmp_path / "g.png")
    assert_user_error(code, err, "--align aligns the --image photos")
    assert not out.exists() and not (tmp_path / "g.png").exists()
    assert not list(tmp_path.glob(".codes*")) and not list(tmp_path.glob(".g*"))
