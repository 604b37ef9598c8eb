"""Real photos in: reading face photos and inverting them to W+ latents with the e4e encoder (DESIGN §1).

A photo is taken as already aligned the way FFHQ was (face centred, eyes level): it is turned upright from its EXIF
orientation, converted to RGB and resized to the encoder's 256 x 256 input as e4e's test transform does (bilinear,
no crop), then scaled to [-1, 1].
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, summarize
from .imaging import to_uint8
from .latents import check_latents

PHOTO_SIZE = 256  # the e4e encoder's input
MIN_PHOTO_SIZE = 64  # below this a face has too few pixels for an inversion worth having
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError)


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


def read_photo(path: str | os.PathLike, size: int = PHOTO_SIZE) -> torch.Tensor:
    """The photo at `path` upright, RGB, resized to `size` x `size`: float32 `[3, size, size]` in [-1, 1]."""
    try:
        with open_photo(path) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
        pixels = np.asarray(upright.resize((size, size), Image.BILINEAR), dtype=np.float32)
    except _UNREADABLE as exc:
        raise InputError(f"{path}: the image cannot be decoded ({summarize(exc)}); give an undamaged PNG or JPEG "
                         "photo") from None
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def list_photos(folder: str | os.PathLike) -> list[Path]:
    """The photos in `folder` (by suffix, not in subfolders), sorted by name; each checked with `check_photo`."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if not paths:
        raise InputError(f"{folder}: no photos found (files ending in {', '.join(PHOTO_SUFFIXES)})")
    for path in paths:
        check_photo(path)
    return paths


@torch.no_grad()
def invert(
    encoder: torch.nn.Module,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 8,
    report: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """W+ codes float32 `[len(paths), L, 512]` on the CPU for the photos at `paths`, `batch_size` at a time on the
    encoder's device; `report(done, total)` is called after each batch."""
    device = next(encoder.parameters()).device
    codes = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([read_photo(p) for p in paths[start:start + batch_size]]).to(device)
        codes.append(encoder(batch).float().cpu())
        if report is not None:
            report(start + batch.shape[0], len(paths))
    return torch.cat(codes)


def photo_latents(
    encoder: torch.nn.Module, where: str, paths: Sequence[str | os.PathLike], num_ws: int, dim: int, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For editing photos: their W+ codes, checked against the generator's `num_ws` x `dim` (`where` names the
    encoder in errors), and the photos themselves as uint8 `[B, resolution, resolution, 3]`."""
    codes = check_latents(invert(encoder, paths), num_ws, dim, where=f"{where} (its codes for the photos)")
    return codes, to_uint8(torch.stack([read_photo(p, resolution) for p in paths]))
