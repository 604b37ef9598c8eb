"""Stage 1: the world generator, trained supervised on a latent layout that FFCLIP's mapper can edit.

Each mapper block ends in a leaky ReLU (DESIGN §4), so the edit the mapper adds to `w+` is close to non-negative in
every channel. The layout is chosen for that: the channels of `w` are cut into one block per attribute value (a
"slot") and two blocks for the centre offset. A scene's code holds 1 on the slot of each of its values, 0 on the
other slots and the offset (in units of the jitter) on the offset blocks. Every `w` stands for a picture
(`picture_of`): per attribute, the values are weighted by a softmax of their slots' mean levels and the picture blends
them by those weights. Raising one slot above the others switches that attribute alone, gradually: an edit is a
non-negative push that depends on the words only, and the picture changes all along the way.

A fixed map reads a scene out of the Gaussian `z` (`scene_from_z`). Training runs in two phases, each resumable and
each keeping only the network it trains:

1. synthesis: the synthesis network learns `w -> picture_of(w)` on scene codes with a push on one random slot (from
   nothing to well past the switch), small pushes on all slots and noise;
2. mapping: the mapping network regresses `z` onto the code of the scene `z` stands for.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import GeneratorConfig
from ..factory import build_generator
from ..models import Generator, ops
from .scenes import ATTRIBUTES, Scene, max_offset, render_blend, values
from .stage import ResumableLoop, log

# softmax gain on slot levels: a clean code (levels 1 and 0) draws its colour at 90 % (the rest spread over six
# others, within the judge's tolerance) and its other values at 96 % or more; a push on a block at level 0 already
# changes the picture a little, so an edit's CLIP loss has a gradient from its start
SHARPNESS = 4.0


def scene_from_z(z: torch.Tensor) -> list[Scene]:
    """The scene each row of `z [B, D]` stands for: after the mapping network's own pixel norm, entry i (one per
    attribute, then two for the offset) is cut into equally likely bins of the normal distribution."""
    u = 0.5 * (1 + torch.erf(ops.pixel_norm(z)[:, : len(ATTRIBUTES) + 2] / math.sqrt(2)))
    names = []
    for k, attribute in enumerate(ATTRIBUTES):
        n = len(values(attribute))
        names.append([values(attribute)[i] for i in (u[:, k] * n).long().clamp(max=n - 1).tolist()])
    offset = (max_offset() * (2 * u[:, len(ATTRIBUTES):] - 1)).tolist()
    return [Scene(*attrs, dx=dx, dy=dy) for *attrs, (dx, dy) in zip(*names, offset)]


@lru_cache(maxsize=1)
def slots() -> tuple[tuple[str, str], ...]:
    """Every (attribute, value), in the order of their blocks in `w`; the two offset blocks follow."""
    return tuple((a, v) for a in ATTRIBUTES for v in values(a))


def block_size(dim: int) -> int:
    """Channels per block in a `w` of `dim` channels (the channels left over stay 0)."""
    groups = len(slots()) + 2
    if dim < groups:
        raise ValueError(f"the world's latent layout needs style_dim >= {groups}, got {dim}")
    return dim // groups


def slot(attribute: str, value: str) -> int:
    """Index of the block of `attribute = value`."""
    return slots().index((attribute, value))


def _spread(levels: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-block levels `[B, blocks]` -> `w [B, dim]`, each level repeated over its block's channels."""
    w = levels.repeat_interleave(block_size(dim), dim=1)
    return F.pad(w, (0, dim - w.shape[1]))


def levels_of(w: torch.Tensor) -> torch.Tensor:
    """`w [B, dim]` -> the mean level of every block `[B, slots + 2]`."""
    blocks = len(slots()) + 2
    k = block_size(w.shape[-1])
    return w[:, : k * blocks].reshape(w.shape[0], blocks, k).mean(dim=-1)


def scene_code(scenes: list[Scene], dim: int) -> torch.Tensor:
    """The code `[B, dim]` of each scene: 1 on its values' slots, its offset over the jitter on the offset blocks."""
    levels = torch.zeros(len(scenes), len(slots()) + 2)
    for i, scene in enumerate(scenes):
        for attribute in ATTRIBUTES:
            levels[i, slot(attribute, getattr(scene, attribute))] = 1.0
        levels[i, -2:] = torch.tensor([scene.dx, scene.dy]) / max_offset()
    return _spread(levels, dim)


def picture_of(w: torch.Tensor) -> torch.Tensor:
    """The picture `[B, 3, R, R]` that `w [B, dim]` stands for: values blended by the softmax of their slot levels."""
    levels = levels_of(w.detach().float())
    weights, start = {}, 0
    for attribute in ATTRIBUTES:
        n = len(values(attribute))
        weights[attribute] = torch.softmax(SHARPNESS * levels[:, start:start + n], dim=1)
        start += n
    dx, dy = (max_offset() * levels[:, -2:].clamp(-1, 1)).unbind(1)
    return render_blend(weights, dx, dy)


@dataclass(frozen=True)
class GeneratorTraining:
    synthesis_steps: int = 2000
    mapping_steps: int = 8000
    batch_size: int = 16
    mapping_batch_size: int = 256
    lr: float = 3e-3
    mapping_lr: float = 6e-2
    pushed_fraction: float = 0.6
    max_push: float = 3.0
    spill_fraction: float = 0.3
    max_spill: float = 0.4
    noise: float = 0.1
    save_every: int = 100
    seed: int = 0


def training_codes(scenes: list[Scene], dim: int, t: GeneratorTraining, gen: torch.Generator) -> torch.Tensor:
    """Codes of `scenes` as an edit may leave them: a push on one random slot for `pushed_fraction` of them, small
    pushes on every slot for `spill_fraction`, and Gaussian noise on every channel."""
    b, blocks = len(scenes), len(slots()) + 2
    push = torch.zeros(b, blocks)
    pushed = (torch.rand(b, generator=gen) < t.pushed_fraction).float()
    chosen = torch.randint(0, len(slots()), (b,), generator=gen)
    push[torch.arange(b), chosen] = pushed * t.max_push * torch.rand(b, generator=gen)
    spilled = (torch.rand(b, 1, generator=gen) < t.spill_fraction).float()
    push[:, : len(slots())] += spilled * t.max_spill * torch.rand(b, len(slots()), generator=gen)
    code = scene_code(scenes, dim) + _spread(push, dim)
    return code + t.noise * torch.randn(b, dim, generator=gen)


def _image_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(images, targets) + F.mse_loss(images, targets)


def train_generator(config: GeneratorConfig, t: GeneratorTraining, folder: str | os.PathLike) -> Generator:
    """Train (or resume) the world generator in `folder`; returns it with `w_avg` estimated, in eval mode."""
    folder = Path(folder)
    generator = build_generator(config, t.seed).train().requires_grad_(True)
    b, d, layers = t.batch_size, config.style_dim, config.num_ws
    block_size(d)

    def phase(name: str, steps: int, module: torch.nn.Module, lr: float, step_fn) -> None:
        optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.99))

        def state() -> dict:
            return {"module": module.state_dict(), "optimizer": optimizer.state_dict()}

        def restore(saved: dict) -> None:
            module.load_state_dict(saved["module"])
            optimizer.load_state_dict(saved["optimizer"])

        rng, gen = random.Random(t.seed), torch.Generator().manual_seed(t.seed)
        loop = ResumableLoop(f"generator/{name}", folder / name, steps, t.save_every, state, restore, rng, gen)

        def step(i: int) -> dict[str, float]:
            for group in optimizer.param_groups:
                group["lr"] = lr * (0.1 if i >= 0.85 * steps else 1.0)
            loss = step_fn(gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        loop.run(step)

    def draw(w: torch.Tensor) -> torch.Tensor:
        return generator.synthesis(w[:, None].expand(-1, layers, -1))

    def synthesis_step(gen: torch.Generator) -> torch.Tensor:
        codes = training_codes(scene_from_z(torch.randn(b, d, generator=gen)), d, t, gen)
        return _image_loss(draw(codes), picture_of(codes))

    def mapping_step(gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(t.mapping_batch_size, d, generator=gen)
        return F.mse_loss(generator.mapping_network(z), scene_code(scene_from_z(z), d))

    phase("synthesis", t.synthesis_steps, generator.synthesis_network, t.lr, synthesis_step)
    phase("mapping", t.mapping_steps, generator.mapping_network, t.mapping_lr, mapping_step)
    generator.eval().requires_grad_(False)
    generator.estimate_w_avg(seed=t.seed)
    log("[generator] done")
    return generator
