"""Real photos in: reading face photos and inverting them to W+ latents with the e4e encoder (DESIGN §1).

A photo is turned upright from its EXIF orientation and converted to RGB. It is taken as already aligned the way
FFHQ was (face centred, eyes level) unless an aligner is given (`ffclip.align.FaceAligner`, `--align`), which cuts
the face out as FFHQ did, straight at the size the photo is read at. Then it is scaled to [-1, 1] and resized to the
encoder's 256 x 256 input as e4e's test transform does (bilinear, no crop; antialiased like PIL's filter when
shrinking). `photo_batch` is that one conversion, for files and for tensors given to `Runtime.invert` alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .artifacts import PHOTO_SIZE
from .errors import InputError, summarize
from .imaging import to_uint8

MIN_PHOTO_SIZE = 64  # below this a face has too few pixels for an inversion worth having
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError)
# An aligner: (upright RGB uint8 [H, W, 3] photo, output size, the photo's name for errors) -> uint8 [size, size, 3].
Align = Callable[[np.ndarray, int, str], np.ndarray]


def open_photo(path: str | os.PathLike) -> Image.Image:
    """The photo at `path`, open but not decoded (the caller closes it); not an image, or smaller than
    `MIN_PHOTO_SIZE` on a side: `InputError`."""
    try:
        image = Image.open(path)
    except _UNREADABLE as exc:
        raise InputError(f"{path}: not an image that can be read ({summarize(exc)}); give a PNG or JPEG photo") from None
    if min(image.size) < MIN_PHOTO_SIZE:
        raise InputError(f"{path}: the photo is {image.size[0]}x{image.size[1]} pixels, too small to invert; give one "
                         f"of at least {MIN_PHOTO_SIZE} pixels on each side (256 or more is best)")
    return image


def check_photo(path: str | os.PathLike) -> None:
    """Raise `InputError` unless `path` is an image at least `MIN_PHOTO_SIZE` pixels on each side."""
    open_photo(path).close()


def photo_pixels(path: str | os.PathLike, align: Align | None = None, size: int = PHOTO_SIZE) -> torch.Tensor:
    """The photo at `path` upright and RGB, as uint8 `[3, H, W]`; with `align`, its face aligned to `size` x `size`."""
    try:
        with open_photo(path) as image:
            pixels = np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    except _UNREADABLE as exc:
        raise InputError(f"{path}: the image cannot be decoded ({summarize(exc)}); give an undamaged PNG or JPEG "
                         "photo") from None
    if align is not None:
        pixels = align(pixels, size, str(path))
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def read_photo(path: str | os.PathLike, size: int = PHOTO_SIZE, align: Align | None = None) -> torch.Tensor:
    """The photo at `path` upright, RGB (its face aligned by `align` if given), resized to `size` x `size`: float32
    `[3, size, size]` in [-1, 1]."""
    return photo_batch(photo_pixels(path, align, size)[None], size, str(path))[0]


def photo_batch(images: torch.Tensor, size: int, where: str = "images") -> torch.Tensor:
    """Photos `[B, 3, H, W]`, uint8 or float in [-1, 1], as float32 in [-1, 1] resized to `size` x `size` (bilinear,
    antialiased); `InputError` naming `where` for any other input."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{where}: photos must be a torch tensor, not {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0 or min(images.shape[2:]) < 1:
        raise InputError(f"{where}: photos of shape {list(images.shape)}; expected [B, 3, H, W] (RGB, channels first)")
    if images.dtype == torch.uint8:
        x = images.float() / 127.5 - 1
    elif images.is_floating_point():
        x = images.float()
        if not torch.isfinite(x).all() or x.min() < -1 or x.max() > 1:
            raise InputError(f"{where}: float photos must hold finite values in [-1, 1] (found "
                             f"{x.min().item():.3g} to {x.max().item():.3g}); scale 0-255 pixels as p / 127.5 - 1, "
                             "clamp, or pass uint8")
    else:
        raise InputError(f"{where}: photos of dtype {images.dtype}; pass uint8 pixels or floats in [-1, 1]")
    if tuple(x.shape[2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


def list_photos(folder: str | os.PathLike) -> list[Path]:
    """The photos in `folder` (by suffix, not in subfolders), sorted by name; each checked with `check_photo`."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if not paths:
        raise InputError(f"{folder}: no photos found (files ending in {', '.join(PHOTO_SUFFIXES)})")
    for path in paths:
        check_photo(path)
    return paths


def invert(
    encode: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[str | os.PathLike],
    batch_size: int = 8,
    report: Callable[[int, int], None] | None = None,
    align: Align | None = None,
) -> torch.Tensor:
    """W+ codes float32 `[len(paths), L, D]` on the CPU for the photos at `paths` (faces aligned by `align` if
    given), `batch_size` at a time through `encode` (`Runtime.invert`); `report(done, total)` is called after each
    batch."""
    codes = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([read_photo(p, align=align) for p in paths[start:start + batch_size]])
        codes.append(encode(batch).float().cpu())
        if report is not None:
            report(start + batch.shape[0], len(paths))
    return torch.cat(codes)


def photo_latents(
    encode: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[str | os.PathLike],
    resolution: int,
    align: Align | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For editing photos: their W+ codes through `encode` (`Runtime.invert`), and the photos themselves as uint8
    `[B, resolution, resolution, 3]`. Each photo is read (and its face aligned by `align`, at the larger of the two
    sizes) once."""
    size = max(PHOTO_SIZE, resolution)
    pixels = [photo_pixels(p, align, size)[None] for p in paths]
    inputs = torch.cat([photo_batch(x, PHOTO_SIZE, str(p)) for x, p in zip(pixels, paths)])
    codes = torch.cat([encode(batch).float().cpu() for batch in inputs.split(8)])
    shown = torch.cat([photo_batch(x, resolution, str(p)) for x, p in zip(pixels, paths)])
    return codes, to_uint8(shown)
