"""Stage 1: the world generator, trained supervised in three phases.

A fixed map reads a scene out of the Gaussian `z`: one entry per attribute, cut into equally likely bins, and a
squashed pair for the centre offset. Decoding it and drawing at once learns slowly, so the work is split:

1. synthesis: the synthesis network learns to draw scenes from a learned scene code (one vector per attribute value,
   summed, plus the offset along two vectors), against the exact rendering;
2. mapping: the mapping network learns to regress `z` onto the code of the scene `z` stands for (cheap steps);
3. joint: mapping and synthesis are tuned together from `z` to pixels; half the codes are moved part of the way (less
   than half) towards the code of a scene that differs in one attribute, and must still draw their own scene, so
   that the way from one scene to its one-attribute edit stays on valid pictures.

In phases 1 and 3 half the batches mix two codes across the layers (geometry from the coarse layers, colours from
the fine ones) and a quarter of the codes are truncated towards the mean, so that edited and truncated `w+` still
draw valid scenes.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GeneratorConfig
from ..factory import build_generator
from ..models import Generator, ops
from .scenes import ATTRIBUTES, Scene, max_offset, render, values
from .stage import ResumableLoop, log

GEOMETRY = ("shape", "size")  # with the centre offset: read from the coarse layers when codes are mixed


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


def mix(coarse: Scene, fine: Scene) -> Scene:
    """The scene of a mixed code: geometry and position from the coarse layers' code, colours from the fine ones'."""
    return fine.replace(**{a: getattr(coarse, a) for a in GEOMETRY}, dx=coarse.dx, dy=coarse.dy)


class SceneCode(nn.Module):
    """A learned `w` per scene: the sum of one vector per attribute value, plus the offset along two vectors."""

    def __init__(self, dim: int):
        super().__init__()
        self.tables = nn.ParameterDict({a: nn.Parameter(torch.randn(len(values(a)), dim)) for a in ATTRIBUTES})
        self.offset = nn.Parameter(torch.randn(2, dim))

    def forward(self, scenes: list[Scene]) -> torch.Tensor:
        out = sum(self.tables[a][torch.tensor([values(a).index(getattr(s, a)) for s in scenes])] for a in ATTRIBUTES)
        offsets = torch.tensor([[s.dx, s.dy] for s in scenes]) / max_offset()
        return out + offsets @ self.offset

    def mean(self) -> torch.Tensor:
        return sum(t.mean(0) for t in self.tables.values())


@dataclass(frozen=True)
class GeneratorTraining:
    synthesis_steps: int = 2500
    mapping_steps: int = 8000
    joint_steps: int = 2400
    batch_size: int = 16
    mapping_batch_size: int = 256
    lr: float = 3e-3
    mapping_lr: float = 6e-2
    mix_probability: float = 0.5
    truncated_fraction: float = 0.25
    min_truncation: float = 0.6
    split_layer: int = 4  # layers [0, split) are the coarse ones
    stepped_fraction: float = 0.5
    max_step_towards: float = 0.45
    save_every: int = 100
    seed: int = 0


def _w_plus(w1: torch.Tensor, w2: torch.Tensor, mixed: torch.Tensor, split: int, layers: int) -> torch.Tensor:
    fine = torch.where(mixed[:, None], w2, w1)
    return torch.cat([w1[:, None].expand(-1, split, -1), fine[:, None].expand(-1, layers - split, -1)], dim=1)


def _truncate(w: torch.Tensor, mean: torch.Tensor, t: GeneratorTraining, gen: torch.Generator) -> torch.Tensor:
    psi = torch.ones(w.shape[0], 1)
    cut = torch.rand(w.shape[0], generator=gen) < t.truncated_fraction
    psi[cut] = t.min_truncation + (1 - t.min_truncation) * torch.rand(int(cut.sum()), 1, generator=gen)
    return mean + psi * (w - mean)


def _image_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(images, targets) + F.mse_loss(images, targets)


def train_generator(config: GeneratorConfig, t: GeneratorTraining, folder: str | os.PathLike) -> Generator:
    """Train (or resume) the world generator in `folder`; returns it with `w_avg` estimated, in eval mode."""
    folder = Path(folder)
    generator = build_generator(config, t.seed).train().requires_grad_(True)
    code = SceneCode(config.style_dim)
    b, d, layers = t.batch_size, config.style_dim, config.num_ws

    def phase(name: str, steps: int, params, lr: float, step_fn) -> None:
        optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))

        def state() -> dict:
            return {"generator": generator.state_dict(), "code": code.state_dict(), "optimizer": optimizer.state_dict()}

        def restore(saved: dict) -> None:
            generator.load_state_dict(saved["generator"])
            code.load_state_dict(saved["code"])
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

    def synthesis_step(gen: torch.Generator) -> torch.Tensor:
        z1, z2 = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
        s1, s2 = scene_from_z(z1), scene_from_z(z2)
        mean = code.mean()
        w1, w2 = (_truncate(code(s), mean, t, gen) for s in (s1, s2))
        mixed = torch.rand(b, generator=gen) < t.mix_probability
        targets = render([mix(a, c) if m else a for a, c, m in zip(s1, s2, mixed.tolist())])
        return _image_loss(generator.synthesis(_w_plus(w1, w2, mixed, t.split_layer, layers)), targets)

    def mapping_step(gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(t.mapping_batch_size, d, generator=gen)
        with torch.no_grad():
            target = code(scene_from_z(z))
        return F.mse_loss(generator.mapping_network(z), target)

    def joint_step(gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(2 * b, d, generator=gen)
        scenes = scene_from_z(z)
        # part of the way towards a code whose entry for one attribute was drawn again: still the first scene
        other = z.clone()
        rows = torch.arange(2 * b)
        other[rows, torch.randint(0, len(ATTRIBUTES), (2 * b,), generator=gen)] = torch.randn(2 * b, generator=gen)
        w, w_other = generator.mapping_network(torch.cat([z, other])).chunk(2)
        step = t.max_step_towards * torch.rand(2 * b, 1, generator=gen)
        step[torch.rand(2 * b, generator=gen) >= t.stepped_fraction] = 0
        w = w + step * (w_other - w)
        w = _truncate(w, w.detach().mean(0), t, gen)
        mixed = torch.rand(b, generator=gen) < t.mix_probability
        targets = render([mix(a, c) if m else a for a, c, m in zip(scenes[:b], scenes[b:], mixed.tolist())])
        return _image_loss(generator.synthesis(_w_plus(w[:b], w[b:], mixed, t.split_layer, layers)), targets)

    synthesis_params = list(generator.synthesis_network.parameters()) + list(code.parameters())
    phase("synthesis", t.synthesis_steps, synthesis_params, t.lr, synthesis_step)
    phase("mapping", t.mapping_steps, generator.mapping_network.parameters(), t.mapping_lr, mapping_step)
    phase("joint", t.joint_steps, generator.parameters(), t.lr / 3, joint_step)
    generator.eval().requires_grad_(False)
    generator.estimate_w_avg(seed=t.seed)
    log("[generator] done")
    return generator
