"""Labels of a PNG grid: full column titles wrapped over a few lines, row labels, small tiles enlarged; a long prompt
costs a few measurements per line."""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ffclip.imaging import MAX_TITLE_LINES, MIN_TILE, _fit, _wrap, save_grid


class CountingDraw:
    """Text measurements that are counted."""

    def __init__(self):
        self.draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
        self.font = ImageFont.load_default(size=13)
        self.calls = 0

    def __call__(self, text: str) -> float:
        self.calls += 1
        return self.draw.textlength(text, font=self.font)


def test_a_long_title_costs_a_logarithmic_number_of_measurements():
    measure = CountingDraw()
    title = "blond hair " * 3000
    shown = _fit(title, 248, measure)
    assert measure.calls <= 2 + len(title).bit_length()
    assert shown.endswith("...") and title.startswith(shown[:-3])
    assert measure(shown) <= 248 < measure(title[:len(shown) - 2] + "...")


def test_titles_that_fit_are_kept_and_an_empty_start_is_possible():
    measure = CountingDraw()
    assert _fit("smile", 248, measure) == "smile"
    assert _fit("W" * 50, 2, measure) == "..."


def test_a_title_wraps_at_spaces_and_is_kept_whole_when_the_lines_allow():
    measure = CountingDraw()
    title = "turn the small red circle into a large blue triangle on a gray background"
    lines = _wrap(title, 120, measure, MAX_TITLE_LINES)
    assert 1 < len(lines) < MAX_TITLE_LINES
    assert " ".join(lines) == title
    assert all(measure(line) <= 120 for line in lines)
    assert _wrap("smile", 120, measure, MAX_TITLE_LINES) == ["smile"]
    assert "".join(_wrap("x" * 60, 120, measure, MAX_TITLE_LINES)) == "x" * 60


def test_the_lines_of_a_very_long_title_are_capped_and_cost_a_few_measurements_each():
    measure = CountingDraw()
    title = "blond hair " * 3000
    lines = _wrap(title, 120, measure, MAX_TITLE_LINES)
    assert len(lines) == MAX_TITLE_LINES and lines[-1].endswith("...")
    assert title.startswith(" ".join(lines)[:-3])
    assert measure.calls <= MAX_TITLE_LINES * (2 + len(title).bit_length())


def _grid(tmp_path, titles, res=64, rows=2, labels=None):
    column = torch.zeros(rows, res, res, 3, dtype=torch.uint8)
    return Image.open(save_grid(tmp_path / "grid.png", [column] * len(titles), titles, labels)).convert("L")


def test_small_tiles_are_enlarged_and_rows_are_labelled(tmp_path):
    column = torch.tensor([0, 120, 200], dtype=torch.uint8).repeat(2, 64, 64, 1)
    column[0, 10, 20] = 255
    picture = np.asarray(Image.open(save_grid(tmp_path / "grid.png", [column], ["original"])).convert("RGB"))
    tiles = picture[..., 2].astype(int) - picture[..., 0] == 200  # the labels are gray, never this blue
    assert tiles.any(1).sum() == 2 * MIN_TILE and tiles.any(0).sum() == MIN_TILE  # 64-px tiles drawn at 128 px
    rows, cols = np.nonzero((picture == 255).all(-1) & tiles.any(1)[:, None] & tiles.any(0)[None, :])
    assert len(rows) == 4 and np.ptp(rows) == 1 and np.ptp(cols) == 1  # one pixel became a 2x2 block
    left = int(tiles.any(0).argmax())
    assert (picture[:, :left] < 100).all(-1).any()  # the labels "#1", "#2" stand in a margin left of the tiles
    named = _grid(tmp_path, ["original"], labels=["a_rather_long_photo_name.png", "b.png"])
    assert named.width > picture.shape[1]


def test_the_header_grows_with_the_title_lines_and_stops_at_the_cap(tmp_path):
    short = _grid(tmp_path, ["original", "make it red"])
    longer = _grid(tmp_path, ["original", "turn the small red circle into a large blue triangle on a gray background"])
    start = time.perf_counter()
    longest = _grid(tmp_path, ["original", "a" * 100_000])
    endless = _grid(tmp_path, ["original", "blond hair " * 3000])
    assert time.perf_counter() - start < 5
    assert short.width == longer.width == longest.width == endless.width
    assert short.height < longer.height < longest.height == endless.height
    line = (longer.height - short.height) / 2  # at least two more lines
    assert endless.height - short.height <= (MAX_TITLE_LINES - 1) * line * 1.01 + 1
