"""Training a mapper with FFCLIP's recipe (DESIGN §4): generator and CLIP frozen, only the mapper learns.

Losses: CLIP cosine distance between the edited image and its prompt; L1 between `w'` and `w`; L1 between the CLIP
image embeddings of the original and the edited image. FFCLIP's identity (ArcFace) and background (face parser)
losses need networks this project does not ship; they are not part of this loop.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .artifacts import check_stages_fit
from .atomic import atomic_file
from .checkpoints.bundle import save_module
from .checkpoints.safe_pickle import load_torch_file
from .config import MapperConfig, from_dict, to_dict
from .errors import InputError, summarize
from .models import Generator, Mapper, TextEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_PROMPTS = (
    "blond hair", "black hair", "red hair", "grey hair", "purple hair", "curly hair", "straight hair",
    "afro hairstyle", "bob cut", "bangs", "a bald head", "a mohawk", "long hair", "short hair",
    "a child", "a teenager", "an old person", "a young adult",
    "a happy face", "a sad face", "an angry face", "a surprised face", "a smiling face", "a calm face",
    "heavy makeup", "red lipstick", "eye shadow", "pale skin", "tanned skin",
    "wearing glasses", "wearing sunglasses", "a beard", "a moustache", "a goatee",
)


TRAIN_STATE_FORMAT = "ffclip-train-state-2"


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults follow FFCLIP's recipe where it states them (Adam 5e-4, batch 8, clip 5)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 5e-4
    grad_clip: float = 5.0
    decay_at: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
    decay_factor: float = 0.5
    lambda_clip: float = 1.0
    lambda_latent: float = 0.8
    lambda_embedding: float = 0.5
    save_every: int = 200
    seed: int = 0
    truncation: float = 0.7
    prompts: tuple[str, ...] = field(default_factory=lambda: DEFAULT_PROMPTS)


class ClipImageEmbedder(torch.nn.Module):
    """Generator images in [-1, 1] -> CLIP image embeddings, with CLIP's resizing and normalisation."""

    def __init__(self, text_encoder: TextEncoder):
        super().__init__()
        if not text_encoder.has_vision:
            raise InputError("training needs CLIP's image tower; load the CLIP weights with the vision tower kept")
        self.visual = text_encoder.clip.visual
        size = self.visual.image_size
        self.size = size if isinstance(size, int) else size[0]
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.visual((x - self.mean) / self.std)


def step_decay(step: int, total: int, decay_at: Sequence[float], factor: float) -> float:
    """Learning-rate multiplier at `step`: `factor` to the power of the decay points already passed."""
    return factor ** sum(step >= math.ceil(p * total) for p in decay_at)


@dataclass
class StepLosses:
    clip: float
    latent: float
    embedding: float
    total: float


class MapperTrainer:
    """One optimiser over the mapper; `generator` and `text_encoder` (with its image tower) stay frozen."""

    def __init__(
        self,
        mapper: Mapper,
        generator: Generator,
        text_encoder: TextEncoder,
        config: TrainConfig,
        latents: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
    ):
        if not config.prompts:
            raise InputError("no training prompts; give a prompts file with at least one line")
        check_stages_fit(text_encoder, mapper, generator)
        self.device = torch.device(device)
        self.config = config
        self.mapper = mapper.to(self.device).train().requires_grad_(True)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        self.image_embedder = ClipImageEmbedder(text_encoder).to(self.device)
        self.latents = latents
        self.optimizer = torch.optim.Adam(self.mapper.parameters(), lr=config.lr)
        self.step = 0
        self.history: list[StepLosses] = []
        self._rng = random.Random(config.seed)
        self._torch_rng = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            self._text_embeddings = self.text_encoder.encode(list(config.prompts))

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.config.batch_size
        if self.latents is not None:
            idx = torch.randint(0, self.latents.shape[0], (b,), generator=self._torch_rng)
            w = self.latents[idx]
        else:
            z = torch.randn(b, self.generator.config.style_dim, generator=self._torch_rng)
            with torch.no_grad():
                w = self.generator.mapping(z.to(self.device), self.config.truncation)
        prompt_idx = torch.tensor([self._rng.randrange(len(self.config.prompts)) for _ in range(b)])
        return w.to(self.device), self._text_embeddings[prompt_idx.to(self._text_embeddings.device)]

    def train_step(self) -> StepLosses:
        """One optimisation step on a fresh batch."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * step_decay(self.step, c.steps, c.decay_at, c.decay_factor)
        w, e = self._batch()
        with torch.no_grad():
            original = self.image_embedder(self.generator.synthesis(w))
        w_edit = self.mapper(w, e)
        edited = self.image_embedder(self.generator.synthesis(w_edit))
        clip_loss = (1 - F.cosine_similarity(edited, e, dim=-1)).mean()
        latent_loss = (w_edit - w).abs().mean()
        embedding_loss = (edited - original).abs().mean()
        total = c.lambda_clip * clip_loss + c.lambda_latent * latent_loss + c.lambda_embedding * embedding_loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.mapper.parameters(), c.grad_clip)
        self.optimizer.step()
        self.step += 1
        losses = StepLosses(clip_loss.item(), latent_loss.item(), embedding_loss.item(), total.item())
        self.history.append(losses)
        return losses

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `train_state.pt` (mapper weights, optimiser, step, losses, random streams) in one atomic write, then
        `mapper.safetensors` (the bundle that other commands read). A save cut short at any moment leaves the previous
        `train_state.pt` whole, so `resume` always finds one consistent step."""
        folder = Path(folder)
        state = {
            "format": TRAIN_STATE_FORMAT,
            "step": self.step,
            "mapper_config": to_dict(self.mapper.config),
            "mapper": self.mapper.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [[h.clip, h.latent, h.embedding, h.total] for h in self.history],
            "torch_rng": self._torch_rng.get_state(),
            "prompt_rng": list(self._rng.getstate()[1]),
        }
        with atomic_file(folder / "train_state.pt") as tmp:
            torch.save(state, tmp)
        return save_module(
            folder / "mapper.safetensors",
            self.mapper,
            extra={"trained_steps": self.step, "train_config": _jsonable(asdict(self.config))},
        )

    def resume(self, folder: str | os.PathLike) -> None:
        """Continue from the `train_state.pt` that `save` wrote: mapper weights, optimiser state, step, loss history
        and random streams."""
        path = Path(folder) / "train_state.pt"
        try:
            state = load_torch_file(path)
            if not isinstance(state, dict) or "optimizer" not in state:
                raise ValueError("it holds no ffclip training state")
            if "format" not in state:
                state.update(_mapper_of_an_earlier_save(Path(folder), state))
            elif state["format"] != TRAIN_STATE_FORMAT:
                raise ValueError(f"a training state of format {state['format']!r}, not {TRAIN_STATE_FORMAT!r}")
            saved = from_dict(MapperConfig, state["mapper_config"])
        except Exception as exc:  # a damaged, foreign or refused file can raise almost anything
            raise InputError(f"{path}: cannot resume from it ({summarize(exc)}); start again without --resume") from None
        if saved != self.mapper.config:
            raise InputError(f"{path}: the saved mapper has config {saved}, this run uses {self.mapper.config}")
        try:
            self.mapper.load_state_dict(state["mapper"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._torch_rng.set_state(state["torch_rng"])
            self._rng.setstate((3, tuple(state["prompt_rng"]), None))
            history = [StepLosses(*h) for h in state["history"]]
        except Exception as exc:  # the same: any part of the state may be damaged
            raise InputError(f"{path}: cannot resume from it ({summarize(exc)}); start again without --resume") from None
        self.step = int(state["step"])
        self.history = history

    def fit(self, out: str | os.PathLike, on_step: Callable[[int, StepLosses], None] | None = None) -> Path:
        """Train until `config.steps`, saving every `save_every` steps and at the end; returns the mapper file."""
        path = None
        while self.step < self.config.steps:
            losses = self.train_step()
            if on_step is not None:
                on_step(self.step, losses)
            if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                path = self.save(out)
        return path if path is not None else self.save(out)


def _mapper_of_an_earlier_save(folder: Path, state: dict) -> dict:
    """Earlier versions kept the mapper weights of a save only in `mapper.safetensors`, written before
    `train_state.pt`; the pair is usable when both files are from the same step."""
    from .checkpoints.bundle import load_bundle

    bundle = load_bundle(folder / "mapper.safetensors", expect_kind="mapper")
    if bundle.extra.get("trained_steps") != state.get("step"):
        raise ValueError(
            f"mapper.safetensors is from step {bundle.extra.get('trained_steps')} but train_state.pt from step "
            f"{state.get('step')} (a save that an earlier version left half-written)"
        )
    return {"mapper_config": bundle.config, "mapper": bundle.state_dict}


def plot_losses(history: Sequence[StepLosses], path: str | os.PathLike) -> Path:
    """A PNG of the loss curves, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(history) + 1)
    for name in ("total", "clip", "latent", "embedding"):
        ax.plot(steps, [getattr(h, name) for h in history], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def _jsonable(data: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
