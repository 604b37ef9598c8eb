"""Column titles of a PNG grid: a long prompt is shortened with a few measurements, to what fits."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from ffclip.imaging import _fit, save_grid


class CountingDraw:
    """A draw whose text measurements are counted."""

    def __init__(self):
        self.draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
        self.calls = 0

    def textlength(self, text: str) -> float:
        self.calls += 1
        return self.draw.textlength(text)


def test_a_long_title_costs_a_logarithmic_number_of_measurements():
    draw = CountingDraw()
    title = "blond hair " * 3000
    shown = _fit(title, 256, draw)
    assert draw.calls <= 2 + len(title).bit_length()
    assert shown.endswith("...") and title.startswith(shown[:-3])
    assert draw.textlength(shown) <= 248 < draw.textlength(title[:len(shown) - 2] + "...")


def test_titles_that_fit_are_kept_and_an_empty_start_is_possible():
    draw = CountingDraw()
    assert _fit("smile", 256, draw) == "smile"
    assert _fit("W" * 50, 10, draw) == "..."


def test_a_grid_with_a_very_long_prompt_is_written(tmp_path):
    column = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    path = save_grid(tmp_path / "grid.png", [column, column], ["original", "a" * 100_000])
    assert Image.open(path).size == (64, 14 + 32)
