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
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from ..config import TextConfig
from ..factory import build_text_encoder
from ..models import TextEncoder
from ..training import ClipImageEmbedder
from .captions import caption
from .scenes import ATTRIBUTES, max_offset, render, render_uint8, sample_scene, sample_scenes, values
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


def sibling(scene, mentioned: frozenset[str], rng: random.Random):
    """`scene` with one attribute its caption leaves open set to another value, or, when the caption names all four,
    moved to another place: a picture the caption fits exactly as well."""
    open_ = [a for a in ATTRIBUTES if a not in mentioned]
    if not open_:
        j = max_offset()
        return scene.replace(dx=rng.uniform(-j, j), dy=rng.uniform(-j, j))
    attribute = rng.choice(open_)
    return scene.replace(**{attribute: rng.choice([v for v in values(attribute) if v != getattr(scene, attribute)])})


def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of `-log` of the softmax mass on the row's positives."""
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).mean()


def train_clip(config: TextConfig, training: ClipTraining, folder: str | os.PathLike) -> TextEncoder:
    """Train (or resume) the world CLIP in `folder`; returns it with its image tower, in eval mode."""
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
    total = training.steps + training.invariance_steps
    loop = ResumableLoop("clip", folder, total, training.save_every, state, restore, rng, torch_rng)

    def learning_rate(i: int) -> float:
        first = i < training.steps
        lr, start, steps = ((training.lr, 0, training.steps) if first
                            else (training.invariance_lr, training.steps, training.invariance_steps))
        j = i - start
        return lr * min(1.0, (j + 1) / max(1, steps // 20)) * (0.1 if j >= 0.8 * steps else 1.0)

    def step(i: int) -> dict[str, float]:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(i)
        if rng.random() < training.hard_fraction:
            group = groups[rng.randrange(len(groups))]
            picked = group[torch.randint(0, len(group), (training.batch_size,), generator=torch_rng)]
        else:
            picked = torch.randint(0, len(pool), (training.batch_size,), generator=torch_rng)
        scenes = [pool[i] for i in picked.tolist()]
        texts, mentioned = zip(*(caption(s, rng) for s in scenes))
        tokens = encoder.tokenize(list(texts))
        noisy = torch.rand(len(texts), generator=torch_rng) < training.noisy_fraction
        tokens = insert_random_tokens(tokens, noisy, torch_rng)
        images = pool_images[picked].permute(0, 3, 1, 2).float() / 127.5 - 1
        invariant = i >= training.steps
        if invariant:
            siblings = render_uint8([sibling(s, m, rng) for s, m in zip(scenes, mentioned)])
            images = torch.cat([images, siblings.permute(0, 3, 1, 2).float() / 127.5 - 1])
        images = images + training.image_noise * torch.randn(images.shape, generator=torch_rng)
        image_emb = torch.nn.functional.normalize(embedder(images), dim=-1)
        text_emb = torch.nn.functional.normalize(encoder(tokens), dim=-1)
        scale = encoder.clip.logit_scale.exp().clamp(max=100)
        b = len(scenes)
        logits = scale * image_emb[:b] @ text_emb.T
        positive = fits(scenes, list(mentioned), scenes)  # [image, caption]
        loss = (multi_positive_loss(logits, positive) + multi_positive_loss(logits.T, positive.T)) / 2
        if invariant:
            # a caption must not prefer one of the pictures it fits: that preference is what an edit would exploit
            gap = logits.diagonal() - scale * (image_emb[b:] * text_emb).sum(dim=-1)
            loss = loss + training.invariance * gap.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    loop.run(step)
    _recalibrate_batch_norm(embedder, pool_images, torch_rng)
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
        embedder(pool_images[picked].permute(0, 3, 1, 2).float() / 127.5 - 1)
    for m in norms:
        m.momentum = 0.1
    embedder.eval()


@torch.no_grad()
def attribute_accuracy(encoder: TextEncoder, split: str, num: int = 128, seed: int = 1) -> dict[str, float]:
    """Zero-shot accuracy of `encoder` per attribute: each picture against one prompt per value, phrased in `split`."""
    from .captions import edit_prompt

    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(num)]
    image_emb = torch.nn.functional.normalize(ClipImageEmbedder(encoder)(render(scenes)), dim=-1)
    out = {}
    for attribute in ATTRIBUTES:
        prompts = [[edit_prompt(attribute, v, rng, split) for v in values(attribute)] for _ in scenes]
        text = torch.nn.functional.normalize(encoder.encode([p for row in prompts for p in row]), dim=-1)
        text = text.view(num, len(values(attribute)), -1)
        picked = (text @ image_emb[:, :, None]).squeeze(-1).argmax(dim=1)
        truth = torch.tensor([values(attribute).index(getattr(s, attribute)) for s in scenes])
        out[attribute] = float((picked == truth).float().mean())
    return out
