"""Real photos in: reading face photos and inverting them to W+ latents with the e4e encoder (DESIGN §1).

A photo is turned upright from its EXIF orientation and converted to RGB. It is taken as already aligned the way
FFHQ was (face centred, eyes level) unless an aligner is given (`ffclip.align.FaceAligner`, `--align`), which cuts
the face out as FFHQ did, straight at the size the photo is read at. Then it is scaled to [-1, 1] and resized to the
encoder's 256 x 256 input as e4e's test transform does (bilinear, no crop; antialiased like PIL's filter when
shrinking). `photo_batch` is that one conversion, for files and for tensors given to `Runtime.invert` alike.
"""

from __future__ import annotations

import os
import re
import warnings
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
# Decoding costs about 30 bytes a pixel by the time the photo is resized; this bound keeps one photo under 2 GiB
# and is well above a phone camera's full-resolution shot (48-50 megapixels).
MAX_PHOTO_PIXELS = 64 * 2**20
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError)
# An aligner: (upright RGB uint8 [H, W, 3] photo, output size, the photo's name for errors) -> uint8 [size, size, 3].
Align = Callable[[np.ndarray, int, str], np.ndarray]


def open_photo(path: str | os.PathLike) -> Image.Image:
    """The photo at `path`, open but not decoded (the caller closes it); not an image, or smaller than
    `MIN_PHOTO_SIZE` on a side: `InputError`."""
    try:
        with warnings.catch_warnings():  # PIL warns past a bound above MAX_PHOTO_PIXELS: the refusal below says more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except _UNREADABLE as exc:
        raise InputError(f"{path}: not an image that can be read ({summarize(exc)}); give a PNG or JPEG photo") from None
    if min(image.size) < MIN_PHOTO_SIZE:
        image.close()
        raise InputError(f"{path}: the photo is {image.size[0]}x{image.size[1]} pixels, too small to invert; give one "
                         f"of at least {MIN_PHOTO_SIZE} pixels on each side (256 or more is best)")
    if image.size[0] * image.size[1] > MAX_PHOTO_PIXELS:
        image.close()
        raise InputError(f"{path}: the photo is {image.size[0]}x{image.size[1]} pixels "
                         f"({image.size[0] * image.size[1] / 1e6:.0f} megapixels), more than the "
                         f"{MAX_PHOTO_PIXELS / 1e6:.0f} megapixels a photo may have; scale it down first")
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
    antialiased, clamped to [-1, 1], which the filter overshoots by rounding); `InputError` naming `where` for any
    other input."""
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
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(-1, 1)
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


# A name list holds one photo name a line, as UTF-8. So that any name a file system allows fits on one line and reads
# back, a backslash is written as two, a byte that is not UTF-8 as \xNN, and a control character or line separator
# as \uNNNN (as is a lone surrogate); other names are written as they are.
_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_ESCAPED = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    if "\udc80" <= char <= "\udcff":  # an undecodable byte, as os.listdir gives it (surrogateescape)
        return f"\\x{ord(char) - 0xDC00:02x}"
    return f"\\u{ord(char):04x}"


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code == "\\":
        return "\\"
    return chr(0xDC00 + int(code[1:], 16)) if code[0] == "x" else chr(int(code[1:], 16))


def quote_name(name: str) -> str:
    """`name` as one line of a name list (see above); a name without backslashes or control characters is itself."""
    return _ESCAPE.sub(_escape, name)


def unquote_name(line: str) -> str:
    """The name that `quote_name` wrote as `line` (undecodable bytes as `os.fsdecode` gives them)."""
    return _ESCAPED.sub(_unescape, line)


def photo_names_text(paths: Sequence[str | os.PathLike]) -> str:
    """The name list of the photos at `paths`, one quoted name a line, in their order."""
    return "".join(f"{quote_name(Path(p).name)}\n" for p in paths)


def read_photo_names(path: str | os.PathLike) -> list[str]:
    """The photo names of a name list that `ffclip invert` wrote (`<codes>_files.txt`), in row order."""
    return [unquote_name(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
