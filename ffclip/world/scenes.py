"""The shapes world of `spec.json`: scenes (four attributes plus the centre offset) and their exact rendering."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

ATTRIBUTES = ("color", "shape", "size", "background")


@lru_cache(maxsize=1)
def spec() -> dict[str, Any]:
    """The world's specification, read from the package's `spec.json`."""
    return json.loads(resources.files("ffclip.world").joinpath("spec.json").read_text())


def values(attribute: str) -> tuple[str, ...]:
    """The values `attribute` takes, in the specification's order."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; the attributes are {', '.join(ATTRIBUTES)}")
    return tuple(spec()[attribute])


def resolution() -> int:
    return int(spec()["resolution"])


def max_offset() -> float:
    """The largest centre offset from the image centre, as a fraction of the image side."""
    return float(spec()["center_jitter"])


@dataclass(frozen=True)
class Scene:
    """One picture of the world. `dx`, `dy`: the bounding box centre's offset from the image centre (image sides)."""

    color: str
    shape: str
    size: str
    background: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        for attribute in ATTRIBUTES:
            if getattr(self, attribute) not in values(attribute):
                raise ValueError(f"{getattr(self, attribute)!r} is not a {attribute}; use one of {values(attribute)}")
        limit = max_offset() + 1e-9
        if abs(self.dx) > limit or abs(self.dy) > limit:
            raise ValueError(f"centre offset ({self.dx}, {self.dy}) is beyond the jitter of {max_offset()}")

    @property
    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def replace(self, **changes: Any) -> "Scene":
        return Scene(**{**self.__dict__, **changes})


def sample_scene(rng: random.Random) -> Scene:
    """A uniformly drawn scene: each attribute uniform over its values, the offsets uniform over the jitter."""
    j = max_offset()
    return Scene(*(rng.choice(values(a)) for a in ATTRIBUTES), dx=rng.uniform(-j, j), dy=rng.uniform(-j, j))


def sample_scenes(num: int, seed: int = 0) -> list[Scene]:
    """`num` scenes drawn with `sample_scene` from a generator seeded with `seed`."""
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(num)]


def coverage(
    shapes: torch.Tensor, sides: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: int, supersample: int = 4
) -> torch.Tensor:
    """The fraction of each pixel `[B, size, size]` that the object covers, from `supersample`^2 points per pixel.

    `shapes` holds indices into `values("shape")`; `sides` the bounding box side and `cx, cy` its centre, all as
    fractions of the image side, with y growing downwards.
    """
    s = supersample
    t = (torch.arange(size * s, dtype=torch.float32) + 0.5) / (size * s)
    v, u = t[:, None], t[None, :]
    h = (sides / 2)[:, None, None]
    du, dv = u - cx[:, None, None], v - cy[:, None, None]
    inside_box = (du.abs() <= h) & (dv.abs() <= h)
    circle = du.square() + dv.square() <= h.square()
    # upright isosceles triangle: apex at the top centre, base along the bottom edge of the box
    triangle = inside_box & (du.abs() <= (dv + h) / 2)
    names = values("shape")
    masks = {"circle": circle, "square": inside_box, "triangle": triangle}
    out = torch.zeros(shapes.shape[0], size * s, size * s)
    for i, name in enumerate(names):
        out = torch.where((shapes == i)[:, None, None], masks[name].float(), out)
    return out.view(-1, size, s, size, s).mean(dim=(2, 4))


def _palette(attribute: str) -> torch.Tensor:
    return torch.tensor([spec()[attribute][v] for v in values(attribute)], dtype=torch.float32)


def render_blend(
    weights: dict[str, torch.Tensor], dx: torch.Tensor, dy: torch.Tensor, supersample: int = 4
) -> torch.Tensor:
    """Pictures whose attributes are blends of their values: `weights[a] [B, len(values(a))]` (rows summing to 1)
    mix the colours and the shapes' outlines, and set the object's side between the sizes' sides (so a growing weight
    on one size grows or shrinks the object); `dx, dy [B]` are the centre offsets. float32 `[B, 3, R, R]` in [-1, 1];
    one-hot weights draw the scenes exactly."""
    r = resolution()
    cx, cy = 0.5 + dx.float(), 0.5 + dy.float()
    sides = weights["size"] @ torch.tensor([float(spec()["size"][v]) for v in values("size")])
    cov = torch.zeros(dx.shape[0], r, r)
    for i in range(len(values("shape"))):
        weight = weights["shape"][:, i]
        rows = (weight > 0).nonzero().flatten()
        if len(rows):
            drawn = coverage(torch.full((len(rows),), i), sides[rows], cx[rows], cy[rows], r, supersample)
            cov = cov.index_add(0, rows, weight[rows, None, None] * drawn)
    fg = (weights["color"] @ _palette("color"))[:, :, None, None]
    bg = (weights["background"] @ _palette("background"))[:, :, None, None]
    return (bg + (fg - bg) * cov[:, None]) / 127.5 - 1


def render(scenes: list[Scene], supersample: int = 4) -> torch.Tensor:
    """Pictures of `scenes`: float32 `[B, 3, R, R]` in [-1, 1] (sRGB 0-255 mapped linearly), antialiased edges."""
    if not scenes:
        raise ValueError("no scenes to render")
    dx, dy = torch.tensor([[sc.dx, sc.dy] for sc in scenes], dtype=torch.float32).unbind(1)
    return render_blend(value_weights(scenes), dx, dy, supersample)


def value_weights(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """The one-hot weights `{attribute: [B, len(values(attribute))]}` that `render_blend` draws `scenes` from."""
    return {a: torch.nn.functional.one_hot(torch.tensor([values(a).index(getattr(sc, a)) for sc in scenes]),
                                           len(values(a))).float() for a in ATTRIBUTES}


def render_uint8(scenes: list[Scene]) -> torch.Tensor:
    """Pictures of `scenes` as uint8 `[B, R, R, 3]`."""
    return ((render(scenes) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
