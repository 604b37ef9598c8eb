"""Aligning a portrait the way FFHQ was aligned, from face landmarks (`--align`; DESIGN §1).

The FFHQ recipe reads four points of a face: the two eye centres and the two mouth corners. From them it builds an
oriented square around the face (`crop_quad`), and `align_face` cuts that square out of the photo: it shrinks very
large photos first, crops to the square plus a border, fills the part of the square that lies outside the photo by
mirroring the photo with a blur and a fade to its median colour, and maps the square onto the output with 4x
supersampling and an antialiased downscale. Everything here is numpy, PIL and torch.

The points come from a landmark model the user holds (`open_landmarks`, chosen by the file's suffix):

- `.dat`: a dlib 68-point shape predictor (`shape_predictor_68_face_landmarks.dat`, what FFHQ's alignment used)
  behind dlib's frontal face detector; optional extra `ffclip[align-dlib]`.
- `.task`: a MediaPipe face landmarker (`face_landmarker.task`), whose 478-point mesh is mapped to the same four
  points; optional extra `ffclip[align-mediapipe]`.

Points are `[x, y]` in the photo's pixel coordinates, pixel centres at integers (dlib's convention, which the recipe
assumes), ordered `POINT_NAMES`: left and right as seen in the photo.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import CheckpointError, InputError, summarize

POINT_NAMES = ("eye_left", "eye_right", "mouth_left", "mouth_right")
SUPERSAMPLE = 4  # the square is resampled at 4x the output size, then scaled down with antialiasing, as FFHQ did
LANDMARK_FORMATS = (
    "--align reads a landmark model: a .dat dlib 68-point shape predictor (shape_predictor_68_face_landmarks.dat) "
    "or a .task MediaPipe face landmarker (face_landmarker.task)"
)

# dlib's 68-point layout: the eye on the photo's left is 36-41, the other 42-47; the mouth's outer corners 48 and 54.
DLIB_EYE_LEFT = tuple(range(36, 42))
DLIB_EYE_RIGHT = tuple(range(42, 48))
DLIB_MOUTH_LEFT, DLIB_MOUTH_RIGHT = 48, 54
# The MediaPipe mesh points at the places of dlib's six points around each eye (the eye centre is their mean) and at
# its mouth corners. The mesh names sides from the subject, so its "right eye" (33, 133, ...) is on the photo's left.
MESH_EYE_LEFT = (33, 160, 158, 133, 153, 144)
MESH_EYE_RIGHT = (362, 385, 387, 263, 373, 380)
MESH_MOUTH_LEFT, MESH_MOUTH_RIGHT = 61, 291


class LandmarkSource(Protocol):
    """Finds faces in a photo: RGB uint8 `[H, W, 3]` in, float64 `[N, 4, 2]` points out (`POINT_NAMES` per face);
    no face is `N == 0`."""

    name: str

    def __call__(self, photo: np.ndarray) -> np.ndarray: ...


def points_from_68(landmarks: np.ndarray) -> np.ndarray:
    """The recipe's four points `[..., 4, 2]` from dlib-layout landmarks `[..., 68, 2]`: each eye centre is the mean
    of its six points, the mouth corners are points 48 and 54."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[..., DLIB_EYE_LEFT, :].mean(-2), lm[..., DLIB_EYE_RIGHT, :].mean(-2),
                     lm[..., DLIB_MOUTH_LEFT, :], lm[..., DLIB_MOUTH_RIGHT, :]], axis=-2)


def points_from_mesh(mesh: np.ndarray) -> np.ndarray:
    """The recipe's four points `[..., 4, 2]` from MediaPipe face-mesh points `[..., 468 or 478, 2]`, in the same
    pixel coordinates as the mesh."""
    m = np.asarray(mesh, dtype=np.float64)
    return np.stack([m[..., MESH_EYE_LEFT, :].mean(-2), m[..., MESH_EYE_RIGHT, :].mean(-2),
                     m[..., MESH_MOUTH_LEFT, :], m[..., MESH_MOUTH_RIGHT, :]], axis=-2)


def crop_quad(points: np.ndarray) -> np.ndarray:
    """FFHQ's oriented crop square for one face's points `[4, 2]`: its corners `[4, 2]` in the order upper-left,
    lower-left, lower-right, upper-right (as the output sees them).

    With `e` the vector from the left to the right eye and `m` from the eyes' midpoint to the mouth's, the square's
    "right" axis is `e` turned towards `m` rotated a quarter turn back (`e - (-m_y, m_x)`, which levels the eyes and
    upright the face at once), its half-side is the larger of `2 |e|` and `1.8 |m|`, its "down" axis is the right axis
    turned a quarter, and its centre lies a tenth of `m` below the eyes' midpoint.
    """
    p = np.asarray(points, dtype=np.float64)
    eye_avg = (p[0] + p[1]) / 2
    eye_to_eye = p[1] - p[0]
    eye_to_mouth = (p[2] + p[3]) / 2 - eye_avg
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    norm = math.hypot(*x)
    if not norm > 0:
        raise ValueError("the eye and mouth points give no direction; no square can be placed")
    x *= max(math.hypot(*eye_to_eye) * 2.0, math.hypot(*eye_to_mouth) * 1.8) / norm
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def quad_side(quad: np.ndarray) -> float:
    """The side length of a crop square from `crop_quad`."""
    return float(np.hypot(*(quad[1] - quad[0])))


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """`image` float32 `[H, W, C]` blurred by a Gaussian of `sigma` pixels along both axes: kernel radius
    `round(4 sigma)`, edges mirrored with the edge pixel repeated (as scipy.ndimage's default, which FFHQ used)."""
    radius = int(4.0 * sigma + 0.5)
    if radius < 1:
        return image.copy()
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel = torch.from_numpy((kernel / kernel.sum()).astype(np.float32))
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[:, None]  # [C, 1, H + 2r, W + 2r]
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x[:, 0].permute(1, 2, 0).numpy()


def fill_outside(image: np.ndarray, pad: tuple[int, int, int, int], qsize: float) -> np.ndarray:
    """`image` uint8 `[H, W, 3]` grown by `pad` (left, top, right, bottom) mirrored pixels, which are blurred and
    faded towards the median colour the further they lie outside, as FFHQ fills a square that leaves the photo."""
    left, top, right, bottom = pad
    img = np.pad(image.astype(np.float32), ((top, bottom), (left, right), (0, 0)), mode="reflect")
    h, w, _ = img.shape
    y, x = np.ogrid[:h, :w]
    x, y = x.astype(np.float32)[..., None], y.astype(np.float32)[..., None]
    outside = np.maximum(1.0 - np.minimum(x / max(left, 1), (w - 1 - x) / max(right, 1)),
                         1.0 - np.minimum(y / max(top, 1), (h - 1 - y) / max(bottom, 1)))
    img += (gaussian_blur(img, qsize * 0.02) - img) * np.clip(outside * 3.0 + 1.0, 0.0, 1.0)
    img += (np.median(img, axis=(0, 1)) - img) * np.clip(outside, 0.0, 1.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def align_face(photo: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """The face at `points` `[4, 2]` in `photo` (RGB uint8 `[H, W, 3]`) aligned as FFHQ's faces are: uint8
    `[size, size, 3]`."""
    quad = crop_quad(points)
    qsize = quad_side(quad)
    img = Image.fromarray(np.ascontiguousarray(photo, dtype=np.uint8), "RGB")

    # A square at least four times the output size: scale the photo down by a whole factor first (antialiased).
    shrink = int(math.floor(qsize / size * 0.5))
    if shrink > 1:
        shrunk = (int(np.rint(img.width / shrink)), int(np.rint(img.height / shrink)))
        img = img.resize(shrunk, Image.Resampling.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink

    # Crop to the square's bounding box with a border.
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    box = (max(lo[0] - border, 0), max(lo[1] - border, 0),
           min(hi[0] + border, img.width), min(hi[1] + border, img.height))
    if box[2] - box[0] < img.width or box[3] - box[1] < img.height:
        img = img.crop(box)
        quad = quad - np.array(box[:2], dtype=np.float64)

    # Where the square (with its border) leaves the photo, fill it in.
    lo, hi = np.floor(quad.min(0)).astype(int), np.ceil(quad.max(0)).astype(int)
    pad = (max(border - lo[0], 0), max(border - lo[1], 0), max(hi[0] - img.width + border, 0),
           max(hi[1] - img.height + border, 0))
    if max(pad) > border - 4:
        least = int(np.rint(qsize * 0.3))
        pad = tuple(max(p, least) for p in pad)
        img = Image.fromarray(fill_outside(np.asarray(img), pad, qsize), "RGB")
        quad = quad + np.array(pad[:2], dtype=np.float64)

    # Map the square onto the output, supersampled, then scale down. The points count pixel centres as integers;
    # PIL counts pixel edges, hence the half pixel.
    big = size * SUPERSAMPLE
    img = img.transform((big, big), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR)
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))


def _side_or_zero(points: np.ndarray) -> float:
    try:
        return quad_side(crop_quad(points))
    except ValueError:
        return 0.0


@dataclass
class FaceAligner:
    """Aligns photos with the faces `source` finds; `note` hears when a photo holds several (the largest is used)."""

    source: LandmarkSource
    note: Callable[[str], None] = lambda message: None

    def __call__(self, photo: np.ndarray, size: int, where: str) -> np.ndarray:
        """`photo` RGB uint8 `[H, W, 3]` aligned to `[size, size, 3]`; `InputError` naming `where` if no face is
        found."""
        faces = np.asarray(self.source(photo), dtype=np.float64).reshape(-1, 4, 2)
        if len(faces) == 0:
            raise InputError(f"{where}: no face found (landmarks: {self.source.name}); give a photo with a face, or "
                             "leave --align out if the photo is already aligned")
        sides = [_side_or_zero(face) for face in faces]
        largest = int(np.argmax(sides))
        if not sides[largest] > 0:
            raise InputError(f"{where}: the landmarks ({self.source.name}) place no crop square (the eye and mouth "
                             "points give no direction); give a photo with a clearer face")
        if len(faces) > 1:
            self.note(f"{where}: {len(faces)} faces found; aligning the largest")
        return align_face(photo, faces[largest], size)


def _missing_package(extra: str, package: str, path: str | os.PathLike) -> InputError:
    return InputError(f"--align {path}: the {package} package is not installed; install it with "
                      f"pip install 'ffclip[{extra}]'")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: found {'no such file' if not path.exists() else 'not a regular file'}; "
                              f"{LANDMARK_FORMATS}")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"{path}: found an unreadable file ({exc.strerror}); {LANDMARK_FORMATS}") from None
    if size == 0:
        raise CheckpointError(f"{path}: found an empty file; {LANDMARK_FORMATS}")


class DlibLandmarks:
    """dlib's frontal face detector (the photo upsampled once, as FFHQ's landmarks were found) and a 68-point shape
    predictor."""

    name = "dlib 68-point shape predictor"

    def __init__(self, path: str | os.PathLike):
        try:
            import dlib
        except ImportError:
            raise _missing_package("align-dlib", "dlib", path) from None
        self.path = path
        try:
            self.predictor = dlib.shape_predictor(str(path))
        except Exception as exc:  # dlib raises RuntimeError for any file it cannot deserialise
            raise CheckpointError(f"{path}: found a file dlib cannot read as a shape predictor ({summarize(exc)}); "
                                  f"{LANDMARK_FORMATS}") from None
        self.detector = dlib.get_frontal_face_detector()

    def __call__(self, photo: np.ndarray) -> np.ndarray:
        photo = np.ascontiguousarray(photo, dtype=np.uint8)
        faces = []
        for box in self.detector(photo, 1):
            shape = self.predictor(photo, box)
            if shape.num_parts != 68:
                raise CheckpointError(f"{self.path}: found a shape predictor with {shape.num_parts} points, not 68; "
                                      f"{LANDMARK_FORMATS}")
            faces.append([[part.x, part.y] for part in shape.parts()])
        return points_from_68(np.array(faces, dtype=np.float64).reshape(-1, 68, 2))


class MediaPipeLandmarks:
    """MediaPipe's face landmarker (image mode, up to `MAX_FACES` faces), its mesh mapped to the recipe's points."""

    name = "MediaPipe face landmarker"
    MAX_FACES = 8

    def __init__(self, path: str | os.PathLike):
        if not zipfile.is_zipfile(path):  # a .task file is a zip bundle of models
            raise CheckpointError(f"{path}: found a file that is not a MediaPipe task bundle (not a zip archive); "
                                  f"{LANDMARK_FORMATS}")
        try:
            import mediapipe as mp
        except ImportError:
            raise _missing_package("align-mediapipe", "mediapipe", path) from None
        self.mp = mp
        vision = mp.tasks.vision
        options = vision.FaceLandmarkerOptions(base_options=mp.tasks.BaseOptions(model_asset_path=str(path)),
                                               running_mode=vision.RunningMode.IMAGE, num_faces=self.MAX_FACES)
        try:
            self.landmarker = vision.FaceLandmarker.create_from_options(options)
        except Exception as exc:  # ValueError or RuntimeError from the task runtime
            raise CheckpointError(f"{path}: found a task bundle MediaPipe cannot open as a face landmarker "
                                  f"({summarize(exc)}); {LANDMARK_FORMATS}") from None

    def __call__(self, photo: np.ndarray) -> np.ndarray:
        height, width = photo.shape[:2]
        image = self.mp.Image(image_format=self.mp.ImageFormat.SRGB, data=np.ascontiguousarray(photo, dtype=np.uint8))
        meshes = [[[p.x, p.y] for p in face] for face in self.landmarker.detect(image).face_landmarks]
        if not meshes:
            return np.zeros((0, 4, 2))
        # normalised coordinates (0 to 1 across the photo) to pixel coordinates with pixel centres at integers
        pixels = np.array(meshes, dtype=np.float64) * np.array([width, height]) - 0.5
        return points_from_mesh(pixels)


LANDMARK_SOURCES: dict[str, Callable[[str | os.PathLike], LandmarkSource]] = {
    ".dat": DlibLandmarks,
    ".task": MediaPipeLandmarks,
}


def open_landmarks(path: str | os.PathLike) -> LandmarkSource:
    """The landmark source for the model file at `path`, chosen by its suffix (`LANDMARK_SOURCES`); a file that is
    missing, of another kind or damaged raises `CheckpointError`, a package that is not installed `InputError`."""
    path = Path(path)
    opener = LANDMARK_SOURCES.get(path.suffix.lower())
    if opener is None:
        raise CheckpointError(f"{path}: found a file ending in '{path.suffix}'; {LANDMARK_FORMATS}")
    _check_file(path)
    return opener(path)
