"""Reading scenes back from pixels: the referee of the world's numbers (valid scenes, edit accuracy, preservation).

The judge never looks at a model. It finds the background from the corners and the object's colour from the pixels
that differ from it, then fits every shape and size of the specification at the object's measured centre and keeps
the best fit. A picture is a valid scene when both colours are close to the palette, the best fit overlaps the
object well, the centre lies within the jitter and the picture is close to the re-rendered scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scenes import Scene, _palette, coverage, max_offset, render, spec, values

COLOR_TOLERANCE = 48.0  # sRGB distance from a palette colour
MIN_IOU = 0.8  # overlap (intersection over union) of the object with the best-fitting spec shape
CENTRE_SLACK = 0.03  # image sides beyond the jitter
MAX_RESIDUAL = 12.0  # mean absolute sRGB difference to the re-rendered scene
CORNER = 4  # pixels of each corner patch read for the background


@dataclass(frozen=True)
class Judgement:
    """What the judge read: the scene (None when the picture is not a valid scene) and why not."""

    scene: Scene | None
    reason: str = ""
    iou: float = 0.0

    @property
    def valid(self) -> bool:
        return self.scene is not None


def as_pixels(images: torch.Tensor) -> torch.Tensor:
    """float32 sRGB 0-255 `[B, R, R, 3]` from uint8 `[B, R, R, 3]` or float `[B, 3, R, R]` in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float()
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).cpu()


def _nearest(colour: torch.Tensor, palette: torch.Tensor) -> tuple[int, float]:
    d = (palette - colour).norm(dim=-1)
    i = int(d.argmin())
    return i, float(d[i])


def judge_one(pixels: torch.Tensor) -> Judgement:
    """Judge one picture given as float sRGB `[R, R, 3]`."""
    r = pixels.shape[0]
    c = CORNER
    corners = torch.cat([pixels[:c, :c], pixels[:c, -c:], pixels[-c:, :c], pixels[-c:, -c:]]).reshape(-1, 3)
    bg_i, bg_d = _nearest(corners.median(dim=0).values, _palette("background"))
    if bg_d > COLOR_TOLERANCE:
        return Judgement(None, f"background colour off the palette by {bg_d:.0f}")
    bg = _palette("background")[bg_i]
    differs = (pixels - bg).norm(dim=-1) > 60
    if int(differs.sum()) < 40:
        return Judgement(None, "no object")
    fg_i, fg_d = _nearest(pixels[differs].median(dim=0).values, _palette("color"))
    if fg_d > COLOR_TOLERANCE:
        return Judgement(None, f"object colour off the palette by {fg_d:.0f}")
    fg = _palette("color")[fg_i]
    axis = fg - bg
    soft = (((pixels - bg) @ axis) / axis.dot(axis)).clamp(0, 1)
    hard = soft > 0.5
    rows, cols = hard.any(dim=1).nonzero().flatten(), hard.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return Judgement(None, "no object")
    cx = float(cols[0] + cols[-1] + 1) / (2 * r)
    cy = float(rows[0] + rows[-1] + 1) / (2 * r)
    shapes, sizes = values("shape"), values("size")
    candidates = [(si, zi) for si in range(len(shapes)) for zi in range(len(sizes))]
    fits = coverage(
        torch.tensor([si for si, _ in candidates]),
        torch.tensor([spec()["size"][sizes[zi]] for _, zi in candidates], dtype=torch.float32),
        torch.full((len(candidates),), cx),
        torch.full((len(candidates),), cy),
        r,
    )
    # overlap of the half-coverage outlines: an antialiased or slightly soft edge moves them by less than a pixel
    fits = fits > 0.5
    iou = (fits & hard).sum(dim=(1, 2)) / (fits | hard).sum(dim=(1, 2))
    best = int(iou.argmax())
    best_iou = float(iou[best])
    if best_iou < MIN_IOU:
        return Judgement(None, f"no spec shape fits (best overlap {best_iou:.2f})", best_iou)
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) > max_offset() + CENTRE_SLACK:
        return Judgement(None, f"object centre ({dx:+.2f}, {dy:+.2f}) beyond the jitter", best_iou)
    j = max_offset()
    scene = Scene(values("color")[fg_i], shapes[candidates[best][0]], sizes[candidates[best][1]],
                  values("background")[bg_i], dx=max(-j, min(j, dx)), dy=max(-j, min(j, dy)))
    residual = float((as_pixels(render([scene]))[0] - pixels).abs().mean())
    if residual > MAX_RESIDUAL:
        return Judgement(None, f"picture differs from the scene by {residual:.1f} per channel", best_iou)
    return Judgement(scene, "", best_iou)


def judge(images: torch.Tensor) -> list[Judgement]:
    """Judge a batch: uint8 `[B, R, R, 3]` or float `[B, 3, R, R]` in [-1, 1] (generator output)."""
    pixels = as_pixels(images)
    if pixels.ndim != 4 or pixels.shape[1] != pixels.shape[2] or pixels.shape[-1] != 3:
        raise ValueError(f"expected square RGB pictures, got a tensor of shape {list(images.shape)}")
    return [judge_one(p) for p in pixels]
