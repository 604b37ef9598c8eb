"""What an export builds and for which batch range: `ExportOptions`, light enough for the command line to read its
defaults without importing the exporter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ffclip.artifacts import PHOTO_SIZE
from ffclip.backends import EXPORT_PRECISIONS, FORMATS, needed_artifacts
from ffclip.errors import InputError

DEFAULT_OPSET = 18
# inputs an int8 export calibrates each quantized stage on: enough for stable activation ranges on the world and
# random presets
DEFAULT_CALIBRATION_SAMPLES = 300


@dataclass(frozen=True)
class ExportOptions:
    """What to build and for which batch range."""

    precision: str = "fp32"
    formats: tuple[str, ...] = FORMATS
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 16
    opset: int = DEFAULT_OPSET
    device: torch.device = torch.device("cpu")
    # the encoder stage's input size; the released e4e encoder reads 256 px (smaller sizes keep tests quick)
    photo_size: int = PHOTO_SIZE
    # inputs an int8 export calibrates each quantized stage on (`ffclip.export.calibration`)
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES

    def __post_init__(self) -> None:
        if self.precision not in EXPORT_PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; use {', '.join(EXPORT_PRECISIONS)}")
        if self.calibration_samples < 1:
            raise InputError(f"calibration samples must be at least 1, got {self.calibration_samples}")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown or not self.formats:
            raise InputError(f"unknown formats {unknown or '(none given)'}; choose from {', '.join(FORMATS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(
                f"batch range must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        if self.photo_size < 16 or self.photo_size & (self.photo_size - 1):
            raise InputError(f"photo size {self.photo_size}: the encoder reads square photos of a power of two pixels, "
                             f"at least 16 ({PHOTO_SIZE} for the released e4e encoder)")

    @property
    def built_formats(self) -> tuple[str, ...]:
        """The requested formats and those they are built from, in `FORMATS` order."""
        wanted = {needed for f in self.formats for needed in needed_artifacts(f)}
        return tuple(f for f in FORMATS if f in wanted)

    @property
    def batch(self) -> tuple[int, int, int]:
        return self.min_batch, self.opt_batch, self.max_batch

    @property
    def parity_batches(self) -> tuple[int, ...]:
        """Two batch sizes in the range (one when the range is a single size)."""
        second = self.opt_batch if self.opt_batch != self.min_batch else self.max_batch
        return tuple(sorted({self.min_batch, second}))
