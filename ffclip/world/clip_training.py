"""Stage 2: the world CLIP, an open_clip model trained contrastively on rendered scenes and their captions.

A caption may leave attributes open ("a red circle" fits a red circle on either background), so the loss counts
every caption in the batch that fits a picture as a positive of it, in both directions. Pictures come from a pool
rendered once (the world has few distinct pictures); captions are drawn afresh every step. Colours are the easiest to
tell apart, so half the batches hold pictures of one colour on one background only: there, captions must be told
apart by shape, size and wording. A quarter of the captions get a few random tokens inserted, so that words outside
the training templates are taken as noise, not as meaning.

A second phase makes the model fit to steer edits. FFCLIP's mapper lowers `1 - cos(picture, prompt)`, so whatever a
prompt's similarity prefers among the pictures it fits (a red circle over a red square for "make it red"), an edit
will also change. Every caption therefore gets a sibling of its picture with one attribute it leaves open changed, and
a penalty on the difference of the two logits.

A third phase trains what the mapper reads: the similarity of a picture to an edit prompt, in cosine, not in
softmax rank. Each prompt asks one attribute for one value; it is compared with its scene drawn in every value of that
attribute and must beat each wrong one by a margin (close colours, red and magenta, otherwise differ by less than a
hundredth, and an edit stops on a blend of the two), while siblings of the asked picture (another attribute changed
or blended part way, or the object moved) must score the same. An edit passes through blends, so they count on both
sides: a blend of two wrong values is one more wrong picture, and a blend of the asked value with a wrong one must
trail by the wrong one's share of the margin. Contrastive batches continue beside it, and batch norm keeps the
statistics of the end of the second phase, measured on uniform batches (the phase's batches are anything but).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import TextConfig
from ..factory import build_text_encoder
from ..models import TextEncoder
from ..training import ClipImageEmbedder
from .captions import caption, edit_prompt
from .scenes import (ATTRIBUTES, Scene, max_offset, render, render_blend, render_uint8, sample_scene,
                     sample_scenes, value_weights, values)
from .stage import ResumableLoop

EOT_TOKEN = 49407  # open_clip finds the end of a text as the largest token id


@dataclass(frozen=True)
class ClipTraining:
    steps: int = 2200
    invariance_steps: int = 600
    batch_size: int = 64
    pool_size: int = 12000
    lr: float = 2e-3
    weight_decay: float = 0.05
    noisy_fraction: float = 0.25
    hard_fraction: float = 0.5
    image_noise: float = 0.03
    invariance: float = 0.1
    invariance_lr: float = 5e-4
    edit_steps: int = 600
    edit_batch_size: int = 24
    edit_lr: float = 1e-3
    edit_margin: float = 0.3
    edit_leak: float = 5.0
    edit_contrastive: float = 0.5
    edit_siblings: int = 2
    edit_moves: float = 0.25
    save_every: int = 100
    seed: int = 0


def insert_random_tokens(tokens: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Copy of `tokens [B, 77]` with one to three random vocabulary tokens inserted at random places in `rows`."""
    out = tokens.clone()
    for i in rows.nonzero().flatten().tolist():
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            end = int((out[i] == EOT_TOKEN).nonzero()[0])
            if end + 1 >= out.shape[1]:
                break
            at = int(torch.randint(1, end + 1, (1,), generator=gen))
            out[i, at + 1:end + 2] = out[i, at:end + 1].clone()
            out[i, at] = int(torch.randint(256, EOT_TOKEN - 2, (1,), generator=gen))
    return out


def fits(scenes: list, mentioned: list[frozenset[str]], subjects: list) -> torch.Tensor:
    """`[len(subjects), len(scenes)]`: True where caption j (of `scenes[j]`, naming `mentioned[j]`) fits subject i."""
    return torch.tensor([[all(getattr(s, a) == getattr(c, a) for a in m) for c, m in zip(scenes, mentioned)]
                         for s in subjects])


def _other(attribute: str, value: str, rng: random.Random) -> str:
    return rng.choice([v for v in values(attribute) if v != value])


def sibling(scene, mentioned: frozenset[str], rng: random.Random, moves: float = 0.0):
    """`scene` with one attribute its caption leaves open set to another value, or moved to another place (with
    probability `moves`, and always when the caption names all four): a picture the caption fits exactly as well."""
    open_ = [a for a in ATTRIBUTES if a not in mentioned]
    if not open_ or (moves and rng.random() < moves):
        j = max_offset()
        return scene.replace(dx=rng.uniform(-j, j), dy=rng.uniform(-j, j))
    attribute = rng.choice(open_)
    return scene.replace(**{attribute: _other(attribute, getattr(scene, attribute), rng)})


def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of `-log` of the softmax mass on the row's positives."""
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).mean()


def _pictures(images: torch.Tensor) -> torch.Tensor:
    """Rendered `uint8 [B, R, R, 3]` pictures as the image tower's input `[B, 3, R, R]` in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def _embed(encoder: TextEncoder, embedder: ClipImageEmbedder, images: torch.Tensor, texts: list[str],
           training: ClipTraining, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings of `images` with pixel noise added and of `texts`, a share of them with random tokens."""
    tokens = encoder.tokenize(texts)
    tokens = insert_random_tokens(tokens, torch.rand(len(texts), generator=gen) < training.noisy_fraction, gen)
    images = images + training.image_noise * torch.randn(images.shape, generator=gen)
    return F.normalize(embedder(images), dim=-1), F.normalize(encoder(tokens), dim=-1)


def _schedule(lr: float, step: int, steps: int) -> float:
    """`lr` warmed up over the first twentieth of a phase's `steps` and cut tenfold for its last fifth."""
    return lr * min(1.0, (step + 1) / max(1, steps // 20)) * (0.1 if step >= 0.8 * steps else 1.0)


Blend = tuple[str, str, float]  # (attribute, another value, its weight): a picture between two values


def _render_blends(pictures: list[tuple[Scene, Blend | None]]) -> torch.Tensor:
    """Pictures `[B, 3, R, R]` of scenes, each with at most one attribute blended toward another value as the world
    generator draws a partly pushed code, quantised as `render_uint8` quantises."""
    weights = value_weights([scene for scene, _ in pictures])
    for i, (_, blend) in enumerate(pictures):
        if blend is not None:
            attribute, value, u = blend
            weights[attribute][i] *= 1 - u
            weights[attribute][i, values(attribute).index(value)] += u
    dx, dy = torch.tensor([[scene.dx, scene.dy] for scene, _ in pictures], dtype=torch.float32).unbind(1)
    return ((render_blend(weights, dx, dy) + 1) * 127.5).round() / 127.5 - 1


def edit_loss(encoder: TextEncoder, embedder: ClipImageEmbedder, training: ClipTraining, rng: random.Random,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The third phase's two terms on a fresh batch of edit prompts.

    Margin: the mean hinge of how far the asked picture falls short of beating, by `edit_margin`, the scene in each
    wrong value and a blend of two wrong values, and a blend of the asked value with a wrong one by `edit_margin`
    times the wrong one's weight. Leak: the mean absolute cosine change from the asked picture to its siblings, whole
    (another attribute changed or the object moved) and partial (another attribute blended toward a second value):
    an edit passes through blends."""
    pictures, prompts, rows = [], [], []
    for _ in range(training.edit_batch_size):
        scene, attribute = sample_scene(rng), rng.choice(ATTRIBUTES)
        asked = scene.replace(**{attribute: rng.choice(values(attribute))})
        value = getattr(asked, attribute)
        prompts.append(edit_prompt(attribute, value, rng))
        wrong = [v for v in values(attribute) if v != value]
        u = rng.uniform(0.1, 0.9)
        negatives = [(asked.replace(**{attribute: v}), None) for v in wrong]
        needs = [training.edit_margin] * len(wrong)
        if len(wrong) > 1:
            first, second = rng.sample(wrong, 2)
            negatives.append((asked.replace(**{attribute: first}), (attribute, second, rng.uniform(0.1, 0.9))))
            needs.append(training.edit_margin)
        negatives.append((asked, (attribute, _other(attribute, value, rng), u)))
        needs.append(training.edit_margin * u)
        siblings = [(sibling(asked, frozenset({attribute}), rng, training.edit_moves), None)
                    for _ in range(training.edit_siblings)]
        for _ in range(training.edit_siblings):
            other = rng.choice([a for a in ATTRIBUTES if a != attribute])
            siblings.append((asked, (other, _other(other, getattr(asked, other), rng), rng.uniform(0.1, 0.9))))
        rows.append((len(pictures), torch.tensor(needs), len(siblings)))
        pictures += [(asked, None), *negatives, *siblings]
    image_emb, text_emb = _embed(encoder, embedder, _render_blends(pictures), prompts, training, gen)
    margin, leak = [], []
    for (start, needs, num_siblings), text in zip(rows, text_emb):
        cos = image_emb[start:start + 1 + len(needs) + num_siblings] @ text
        margin.append(F.relu(needs - (cos[0] - cos[1:1 + len(needs)])).mean())
        leak.append((cos[1 + len(needs):] - cos[0]).abs().mean())
    return torch.stack(margin).mean(), torch.stack(leak).mean()


def train_clip(config: TextConfig, training: ClipTraining, folder: str | os.PathLike) -> TextEncoder:
    """Train (or resume) the world CLIP in `folder` (the third phase in `folder/edit`); returns it with its image
    tower, in eval mode."""
    encoder = build_text_encoder(config, training.seed, vision=True).train().requires_grad_(True)
    embedder = ClipImageEmbedder(encoder)
    decay = [p for n, p in encoder.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in encoder.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": training.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=training.lr, betas=(0.9, 0.98))
    rng, torch_rng = random.Random(training.seed), torch.Generator().manual_seed(training.seed)

    def state() -> dict:
        return {"encoder": encoder.state_dict(), "optimizer": optimizer.state_dict()}

    def restore(saved: dict) -> None:
        encoder.load_state_dict(saved["encoder"])
        optimizer.load_state_dict(saved["optimizer"])

    pool = sample_scenes(training.pool_size, training.seed)
    pool_images = torch.cat([render_uint8(pool[i:i + 500]) for i in range(0, len(pool), 500)])
    by_colours: dict[tuple[str, str], list[int]] = {}
    for i, scene in enumerate(pool):
        by_colours.setdefault((scene.color, scene.background), []).append(i)
    groups = [torch.tensor(v) for v in by_colours.values()]

    def contrastive(picked: torch.Tensor, invariant: bool) -> torch.Tensor:
        scenes = [pool[i] for i in picked.tolist()]
        texts, mentioned = zip(*(caption(s, rng) for s in scenes))
        images = _pictures(pool_images[picked])
        if invariant:
            siblings = render_uint8([sibling(s, m, rng) for s, m in zip(scenes, mentioned)])
            images = torch.cat([images, _pictures(siblings)])
        image_emb, text_emb = _embed(encoder, embedder, images, list(texts), training, torch_rng)
        scale = encoder.clip.logit_scale.exp().clamp(max=100)
        b = len(scenes)
        logits = scale * image_emb[:b] @ text_emb.T
        positive = fits(scenes, list(mentioned), scenes)  # [image, caption]
        loss = (multi_positive_loss(logits, positive) + multi_positive_loss(logits.T, positive.T)) / 2
        if invariant:
            # a caption must not prefer one of the pictures it fits: that preference is what an edit would exploit
            gap = logits.diagonal() - scale * (image_emb[b:] * text_emb).sum(dim=-1)
            loss = loss + training.invariance * gap.square().mean()
        return loss

    def step(i: int) -> dict[str, float]:
        first = i < training.steps
        lr, j, steps = ((training.lr, i, training.steps) if first
                        else (training.invariance_lr, i - training.steps, training.invariance_steps))
        for group in optimizer.param_groups:
            group["lr"] = _schedule(lr, j, steps)
        if rng.random() < training.hard_fraction:
            group = groups[rng.randrange(len(groups))]
            picked = group[torch.randint(0, len(group), (training.batch_size,), generator=torch_rng)]
        else:
            picked = torch.randint(0, len(pool), (training.batch_size,), generator=torch_rng)
        loss = contrastive(picked, invariant=not first)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    ResumableLoop("clip", folder, training.steps + training.invariance_steps, training.save_every, state, restore,
                  rng, torch_rng).run(step)
    # a tower with batch norm is left in eval mode: the third phase keeps these statistics
    _recalibrate_batch_norm(embedder, pool_images, torch_rng)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=training.edit_lr, betas=(0.9, 0.98), weight_decay=0.0)

    def edit_step(i: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = _schedule(training.edit_lr, i, training.edit_steps)
        margin, leak = edit_loss(encoder, embedder, training, rng, torch_rng)
        picked = torch.randint(0, len(pool), (training.batch_size,), generator=torch_rng)
        loss = margin + training.edit_leak * leak + training.edit_contrastive * contrastive(picked, invariant=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"margin": margin.item(), "leak": leak.item(), "loss": loss.item()}

    ResumableLoop("clip edits", Path(folder) / "edit", training.edit_steps, training.save_every, state, restore,
                  rng, torch_rng).run(edit_step)
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def _recalibrate_batch_norm(embedder: ClipImageEmbedder, pool_images: torch.Tensor, gen: torch.Generator) -> None:
    """Reset batch-norm statistics (if the image tower has any) to averages over uniformly drawn batches: the
    one-colour batches of training would otherwise skew them."""
    norms = [m for m in embedder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches below
    embedder.train()
    for _ in range(32):
        picked = torch.randint(0, len(pool_images), (128,), generator=gen)
        embedder(_pictures(pool_images[picked]))
    for m in norms:
        m.momentum = 0.1
    embedder.eval()


@torch.no_grad()
def edit_margins(encoder: TextEncoder, split: str = "held-out", num: int = 24, prompts: int = 6,
                 seed: int = 11) -> dict[str, tuple[float, float]]:
    """What FFCLIP's CLIP loss shows a mapper, per attribute: `(margin, leak)` in cosine for `prompts` edit prompts
    per value, phrased in `split`, on `num` seeded scenes. Margin: how far the scene in the asked value beats it in
    the best wrong value, averaged. Leak: the largest, over the other attributes and the object's place, of the
    average spread of the asked picture's cosine as that one changes. An edit needs the margin well above the leak."""
    embedder = ClipImageEmbedder(encoder).eval()
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(num)]
    jitter = max_offset()

    def cosines(variants: list[list[Scene]], text: torch.Tensor) -> torch.Tensor:  # [variants, scenes, prompts]
        return torch.stack([F.normalize(embedder(render(v)), dim=-1) for v in variants]) @ text.T

    out = {}
    for attribute in ATTRIBUTES:
        margins, leaks = [], {}
        for i, value in enumerate(values(attribute)):
            text = F.normalize(encoder.encode([edit_prompt(attribute, value, rng, split) for _ in range(prompts)]),
                               dim=-1)
            cos = cosines([[s.replace(**{attribute: v}) for s in scenes] for v in values(attribute)], text)
            margins.append(float((cos[i] - torch.cat([cos[:i], cos[i + 1:]]).max(dim=0).values).mean()))
            asked = [s.replace(**{attribute: value}) for s in scenes]
            changes = {other: [[s.replace(**{other: v}) for s in asked] for v in values(other)]
                       for other in ATTRIBUTES if other != attribute}
            changes["place"] = [asked] + [[s.replace(dx=rng.uniform(-jitter, jitter), dy=rng.uniform(-jitter, jitter))
                                           for s in asked] for _ in range(2)]
            for other, variants in changes.items():
                c = cosines(variants, text)
                leaks.setdefault(other, []).append(float((c.max(dim=0).values - c.min(dim=0).values).mean()))
        out[attribute] = (sum(margins) / len(margins), max(sum(v) / len(v) for v in leaks.values()))
    return out
