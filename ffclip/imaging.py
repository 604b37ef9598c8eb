"""Turning generator output into pictures: uint8 conversion and labelled PNG grids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .atomic import atomic_file


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images `[B,3,R,R]` in [-1, 1] to uint8 `[B,R,R,3]` (clamped, rounded)."""
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def save_grid(
    path: str | os.PathLike,
    rows: list[torch.Tensor],
    column_titles: list[str],
) -> Path:
    """Write a PNG grid atomically: one row per sample, one column per image kind (e.g. original, each prompt).

    `rows[c]` holds column `c` as uint8 `[B,R,R,3]`; titles are drawn above the columns.
    """
    if len(rows) != len(column_titles):
        raise ValueError("one title per column is needed")
    n, res = rows[0].shape[0], rows[0].shape[1]
    header = max(14, res // 12)
    canvas = Image.new("RGB", (res * len(rows), header + res * n), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (column, title) in enumerate(zip(rows, column_titles)):
        draw.text((c * res + 4, 2), _fit(title, res, draw), fill="black")
        for r in range(n):
            canvas.paste(Image.fromarray(np.asarray(column[r])), (c * res, header + r * res))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw) -> str:
    """`text`, or its longest start that fits in `width` pixels with an ellipsis after it; a binary search, as the
    drawn width grows with the length, so a long prompt costs a few dozen measurements."""
    room = width - 8
    if draw.textlength(text) <= room:
        return text
    fits, fails = 0, len(text)  # the longest start known to fit, the shortest known not to
    while fails - fits > 1:
        middle = (fits + fails) // 2
        if draw.textlength(text[:middle] + "...") <= room:
            fits = middle
        else:
            fails = middle
    return text[:fits] + "..."
