"""Stage 1: the world generator, trained supervised on a latent layout that FFCLIP's mapper can edit.

Each mapper block ends in a leaky ReLU (DESIGN §4), so the edit the mapper adds to `w+` is close to non-negative in
every channel. The layout is chosen for that: the channels of `w` are cut into one block per attribute value (a
"slot") and two blocks for the centre offset. A scene's code holds 1 on the slot of each of its values, 0 on the
other slots and the offset (in units of the jitter) on the offset blocks. Every `w` stands for a picture
(`picture_of`): per attribute, the values are weighted by a softmax of their slots' mean levels and the picture blends
them by those weights (the size by moving the object's side between the sizes'). Raising one slot above the others
switches that attribute alone, gradually: an edit is a non-negative push that depends on the words only, and the
picture changes all along the way.

A fixed map reads a scene out of the Gaussian `z` (`scene_from_z`). Training runs in two phases, each resumable and
each keeping only the network it trains:

1. synthesis: the synthesis network learns `w -> picture_of(w)` on the codes of uniformly drawn scenes as an edit
   may leave them (`training_codes`);
2. tied: the same, continued with every style affine made to read block means only (`tie_to_blocks` after every
   step). Trained deviations inside a block are small; a mapper's are not (a push of 2.6 whose channels deviated by
   7.5 drew off-palette colours), and tied affines cannot see them at all;
3. mapping: the mapping network regresses `z` onto the code of the scene `z` stands for, half of every batch drawn
   next to a digit's sign change, so that few `z` land on a blend of two values.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import GeneratorConfig
from ..factory import build_generator
from ..models import Generator, ops
from .scenes import ATTRIBUTES, Scene, max_offset, render_blend, sample_scene, values
from .stage import ResumableLoop, log

# Softmax gain on the slot levels, the same for every attribute: a clean code (levels 1 and 0) draws its value at
# 99.8 % or more. It sets how clean an edit ends: CLIP's loss flattens once a blend is mostly the asked value, so the
# latent loss stops a push where CLIP's slope meets its own, and what is left of the old value shrinks as the gain
# grows (at 4 to 5 the mapper's pushes stopped on blends the judge rejects).
GAIN = 8.0


def _bits(attribute: str) -> int:
    return max(1, math.ceil(math.log2(len(values(attribute)))))


def _read_z(z: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The value index of every attribute `[B]` and the centre offsets `[B, 2]` that `z [B, D]` stands for.

    After the mapping network's own pixel norm, each attribute reads the signs of its next few entries as binary
    digits (wrapped round when the values are fewer than the digits can count), and the two entries after them give
    the offsets through the normal distribution's CDF. Single sign steps are what an MLP learns sharply; several bins
    along one entry blur into blends near their edges."""
    zn = ops.pixel_norm(z)
    indices, k = [], 0
    for attribute in ATTRIBUTES:
        index = torch.zeros(z.shape[0], dtype=torch.long)
        for _ in range(_bits(attribute)):
            index = 2 * index + (zn[:, k] > 0).long()
            k += 1
        indices.append(index % len(values(attribute)))
    return indices, max_offset() * torch.erf(zn[:, k:k + 2] / math.sqrt(2))


def scene_from_z(z: torch.Tensor) -> list[Scene]:
    """The scene each row of `z [B, D]` stands for (see `_read_z`)."""
    indices, offsets = _read_z(z)
    names = [[values(a)[i] for i in index.tolist()] for a, index in zip(ATTRIBUTES, indices)]
    return [Scene(*attrs, dx=dx, dy=dy) for *attrs, (dx, dy) in zip(*names, offsets.tolist())]


def code_from_z(z: torch.Tensor, dim: int) -> torch.Tensor:
    """`scene_code(scene_from_z(z), dim)`, computed on tensors."""
    indices, offsets = _read_z(z)
    parts = [F.one_hot(index, len(values(a))).float() for a, index in zip(ATTRIBUTES, indices)]
    return _spread(torch.cat([*parts, offsets / max_offset()], dim=1), dim)


def near_a_digit_edge(z: torch.Tensor, gen: torch.Generator, fraction: float, width: float) -> torch.Tensor:
    """Copy of `z` where a random `fraction` of the rows has one of its attribute digits moved to within `width`
    (in units of the row's RMS) of its sign change: where the mapping network has to be sharp."""
    b = z.shape[0]
    digits = sum(_bits(a) for a in ATTRIBUTES)
    rows = (torch.rand(b, generator=gen) < fraction).nonzero().flatten()
    entry = torch.randint(0, digits, (len(rows),), generator=gen)
    out = z.clone()
    rms = z[rows].square().mean(dim=1).sqrt()
    out[rows, entry] = width * (2 * torch.rand(len(rows), generator=gen) - 1) * rms
    return out


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
        weights[attribute] = torch.softmax(GAIN * levels[:, start:start + n], dim=1)
        start += n
    dx, dy = (max_offset() * levels[:, -2:].clamp(-1, 1)).unbind(1)
    return render_blend(weights, dx, dy)


@dataclass(frozen=True)
class GeneratorTraining:
    synthesis_steps: int = 6000
    mapping_steps: int = 16000
    batch_size: int = 16
    mapping_batch_size: int = 256
    lr: float = 3e-3
    mapping_lr: float = 6e-2
    edge_fraction: float = 0.5
    edge_width: float = 0.1
    pushed_fraction: float = 0.6
    max_push: float = 3.0
    spill_fraction: float = 0.3
    max_spill: float = 0.4
    noise: float = 0.1
    block_noise: float = 0.5
    tied_steps: int = 2000
    tied_lr: float = 1e-3
    save_every: int = 100
    seed: int = 0


def training_codes(scenes: list[Scene], dim: int, t: GeneratorTraining, gen: torch.Generator) -> torch.Tensor:
    """Codes of `scenes` as an edit may leave them: a push on one random block (a slot or an offset) for
    `pushed_fraction` of them, small pushes on every block for `spill_fraction`, Gaussian noise on every channel, and
    Gaussian deviations of `block_noise` that average to zero within each block. The target picture reads block means
    only, so the synthesis learns to ignore how a push is spread inside a block, and an offset pushed past the jitter
    leaves the object at its edge: what a mapper adds there beside its edit costs the picture nothing."""
    b, blocks = len(scenes), len(slots()) + 2
    push = torch.zeros(b, blocks)
    pushed = (torch.rand(b, generator=gen) < t.pushed_fraction).float()
    chosen = torch.randint(0, blocks, (b,), generator=gen)
    push[torch.arange(b), chosen] = pushed * t.max_push * torch.rand(b, generator=gen)
    spilled = (torch.rand(b, 1, generator=gen) < t.spill_fraction).float()
    push += spilled * t.max_spill * torch.rand(b, blocks, generator=gen)
    code = scene_code(scenes, dim) + _spread(push, dim)
    deviation = torch.randn(b, dim, generator=gen)
    deviation -= _spread(levels_of(deviation), dim)
    return code + t.noise * torch.randn(b, dim, generator=gen) + t.block_noise * deviation


@torch.no_grad()
def tie_to_blocks(synthesis: torch.nn.Module) -> None:
    """Make every style affine of `synthesis` read block means only: each weight column becomes its block's mean
    column, and the channels past the last block are dropped."""
    for name, weight in synthesis.named_parameters():
        if name.endswith("affine.weight"):
            k = block_size(weight.shape[1])
            used = k * (len(slots()) + 2)
            blocks = weight[:, :used].unflatten(1, (-1, k))
            weight[:, :used] = blocks.mean(dim=2, keepdim=True).expand_as(blocks).flatten(1)
            weight[:, used:] = 0


def _image_loss(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(images, targets) + F.mse_loss(images, targets)


def train_generator(config: GeneratorConfig, t: GeneratorTraining, folder: str | os.PathLike) -> Generator:
    """Train (or resume) the world generator in `folder`; returns it with `w_avg` estimated, in eval mode."""
    folder = Path(folder)
    generator = build_generator(config, t.seed).train().requires_grad_(True)
    b, d, layers = t.batch_size, config.style_dim, config.num_ws
    block_size(d)

    def phase(name: str, steps: int, module: torch.nn.Module, lr: float, step_fn,
              after_step: Callable[[], None] | None = None) -> None:
        if after_step is not None:
            after_step()
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
            loss = step_fn(rng, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            return {"loss": loss.item()}

        loop.run(step)

    def draw(w: torch.Tensor) -> torch.Tensor:
        return generator.synthesis(w[:, None].expand(-1, layers, -1))

    def synthesis_step(rng: random.Random, gen: torch.Generator) -> torch.Tensor:
        codes = training_codes([sample_scene(rng) for _ in range(b)], d, t, gen)
        return _image_loss(draw(codes), picture_of(codes))

    def mapping_step(rng: random.Random, gen: torch.Generator) -> torch.Tensor:
        z = near_a_digit_edge(torch.randn(t.mapping_batch_size, d, generator=gen), gen, t.edge_fraction, t.edge_width)
        return F.mse_loss(generator.mapping_network(z), code_from_z(z, d))

    phase("synthesis", t.synthesis_steps, generator.synthesis_network, t.lr, synthesis_step)
    phase("tied", t.tied_steps, generator.synthesis_network, t.tied_lr, synthesis_step,
          lambda: tie_to_blocks(generator.synthesis_network))
    phase("mapping", t.mapping_steps, generator.mapping_network, t.mapping_lr, mapping_step)
    generator.eval().requires_grad_(False)
    generator.estimate_w_avg(seed=t.seed)
    log("[generator] done")
    return generator
