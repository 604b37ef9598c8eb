"""Turning generator output into pictures: uint8 conversion and labelled PNG grids."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_file

# tiles smaller than this are enlarged by a whole factor (nearest neighbour), so that labels stay legible beside them
MIN_TILE = 128
MAX_TITLE_LINES = 6
GAP = 2
PAD = 4


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images `[B,3,R,R]` in [-1, 1] to uint8 `[B,R,R,3]` (clamped, rounded)."""
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def save_grid(
    path: str | os.PathLike,
    columns: Sequence[torch.Tensor],
    column_titles: Sequence[str],
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid atomically: one column per image kind (e.g. original, each prompt), one row per sample.

    `columns[c]` holds column `c` as uint8 `[B,R,R,3]`. Each title is drawn in full above its column, wrapped over as
    many lines as it needs (at most `MAX_TITLE_LINES`, the last ending in "..." when even those do not hold it). Each
    row is labelled on the left: `row_labels[r]` (a photo's name, say), or "#1", "#2", ... without them. Tiles under
    `MIN_TILE` pixels are enlarged by a whole factor with nearest-neighbour sampling, so every pixel stays a block.
    """
    if len(columns) != len(column_titles):
        raise ValueError("one title per column is needed")
    count, res = columns[0].shape[0], columns[0].shape[1]
    if any(tuple(column.shape[:3]) != (count, res, res) for column in columns):
        raise ValueError("every column needs the same number of images of the same size")
    labels = [f"#{r + 1}" for r in range(count)] if row_labels is None else list(row_labels)
    if len(labels) != count:
        raise ValueError(f"{len(labels)} row labels for {count} rows")
    tile = grid_tile(res)
    font = ImageFont.load_default(size=max(13, tile // 24))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(text: str) -> float:
        return draw.textlength(text, font=font)

    ascent, descent = font.getmetrics()
    line_height = ascent + descent + 2
    titles = [_wrap(" ".join(title.split()), tile - 2 * PAD, measure, MAX_TITLE_LINES) for title in column_titles]
    labels = [_fit(" ".join(label.split()), tile, measure) for label in labels]
    margin = math.ceil(max(measure(label) for label in labels)) + 2 * PAD
    header = max(len(lines) for lines in titles) * line_height + 2 * PAD
    step = tile + GAP
    canvas = Image.new("RGB", (margin + step * len(columns) - GAP, header + step * count - GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (column, lines) in enumerate(zip(columns, titles)):
        left = margin + c * step
        for i, line in enumerate(lines):
            draw.text((left + PAD, PAD + i * line_height), line, fill="black", font=font)
        for r in range(count):
            picture = Image.fromarray(np.asarray(column[r]))
            if tile != res:
                picture = picture.resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(picture, (left, header + r * step))
    for r, label in enumerate(labels):
        draw.text((PAD, header + r * step + tile // 2), label, fill="black", font=font, anchor="lm")
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def grid_tile(res: int) -> int:
    """The side of a grid tile for pictures of `res` pixels: `res`, enlarged by a whole factor to at least
    `MIN_TILE`."""
    return res * math.ceil(MIN_TILE / res) if res < MIN_TILE else res


def _longest_start(text: str, room: float, measure: Callable[[str], float], suffix: str = "") -> int:
    """The largest `n` for which `text[:n] + suffix` measures at most `room` pixels (0 when none does): a binary
    search, as the width grows with the length, so a long text costs a few dozen measurements. No glyph is narrower
    than a pixel, so a start longer than `room` characters is taken not to fit without measuring it."""
    fits, fails = 0, min(len(text), int(room)) + 1  # the longest start known to fit, the shortest taken not to
    while fails - fits > 1:
        middle = (fits + fails) // 2
        if measure(text[:middle] + suffix) <= room:
            fits = middle
        else:
            fails = middle
    return fits


def _fit(text: str, room: float, measure: Callable[[str], float]) -> str:
    """`text` when it measures at most `room` pixels, else its longest start that fits with an ellipsis after it."""
    if len(text) <= room and measure(text) <= room:
        return text
    return text[:_longest_start(text, room, measure, "...")] + "..."


def _wrap(text: str, room: float, measure: Callable[[str], float], max_lines: int) -> list[str]:
    """`text` as lines of at most `room` pixels, broken after the last space that fits (inside a word only when no
    space does); at most `max_lines` of them, the last shortened with an ellipsis when text is left over."""
    lines: list[str] = []
    rest = text
    while len(lines) < max_lines - 1:
        n = _longest_start(rest, room, measure)
        if n == len(rest):
            break
        space = rest.rfind(" ", 0, n + 1)
        end = space if space > 0 else max(n, 1)
        lines.append(rest[:end])
        rest = rest[end:].lstrip(" ")
    return [*lines, _fit(rest, room, measure)]
