"""Training a mapper with FFCLIP's recipe (DESIGN §4): generator and CLIP frozen, only the mapper learns.

Losses: CLIP cosine distance between the edited image and its prompt; L1 between `w'` and `w`; L1 between the CLIP
image embeddings of the original and the edited image; and, when their networks are given, FFCLIP's identity loss
(ArcFace) and background loss (face parser) from `ffclip.photo_losses`. Weights and optimiser follow the released
configuration. Under `torchrun` each process takes its share of every batch and DDP averages the gradients, so a run
on N processes follows the single-process run of the same global batch.

`python -m ffclip.training` is `ffclip-train`, the form `torchrun -m` needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .artifacts import check_stages_fit
from .atomic import atomic_file
from .checkpoints.bundle import save_module
from .checkpoints.safe_pickle import load_torch_file
from .config import MapperConfig, from_dict, to_dict
from .errors import FfclipError, InputError, summarize
from .models import Generator, Mapper, TextEncoder
from .photo_losses import background_loss, identity_loss

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PROMPT_SETS = ("faces", "released", "world")
EMBEDDING_RESIZES = ("bicubic", "antialiased")
TRAIN_DTYPES = ("float32", "float64")
TRAIN_STATE_FORMAT = "ffclip-train-state-2"
LOCK_FILE = ".train.lock"


class Diverged(FfclipError):
    """The loss or the mapper's weights stopped being finite; nothing of the diverged steps was saved."""


def prompt_set(name: str) -> tuple[str, ...]:
    """A packaged prompt list: "faces" (the built-in face edits), "released" (FFCLIP's training descriptions, a
    repeated line weighting the draw as the released list does) or "world" (the shapes world's seen edit prompts,
    each attribute's to an equal share)."""
    if name not in PROMPT_SETS:
        raise InputError(f"unknown prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)}")
    if name == "world":
        from .world.captions import balanced_edit_prompts

        return tuple(balanced_edit_prompts())
    text = (Path(__file__).resolve().parent / "prompt_sets" / f"{name}.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@dataclass
class TrainConfig:
    """Hyper-parameters; defaults follow FFCLIP's released configuration. `batch_size` is the global batch, split
    over the processes of a distributed run. The identity and background weights apply when their networks are given.
    `val_every` > 0 validates on held-out latents that often and keeps the best mapper. `dtype` "float64" trains every
    stage in double precision, the reference for checking numerics."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 5e-4
    grad_clip: float = 5.0
    decay_at: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95)
    decay_factor: float = 0.5
    lambda_clip: float = 1.0
    lambda_latent: float = 1.6
    lambda_embedding: float = 1.0
    lambda_identity: float = 0.9
    lambda_background: float = 2.0
    embedding_resize: str = "bicubic"
    save_every: int = 200
    val_every: int = 0
    dtype: str = "float32"
    seed: int = 0
    truncation: float = 0.7
    prompts: tuple[str, ...] = field(default_factory=lambda: prompt_set("faces"))


class ClipImageEmbedder(torch.nn.Module):
    """Generator images in [-1, 1] -> CLIP image embeddings, with CLIP's normalisation. `resize` brings them to CLIP's
    input size: "antialiased" (bilinear with antialiasing) or "bicubic" (corners aligned, as FFCLIP's CLIP-embedding
    loss resizes)."""

    def __init__(self, text_encoder: TextEncoder, resize: str = "antialiased"):
        super().__init__()
        if not text_encoder.has_vision:
            raise InputError("training needs CLIP's image tower; load the CLIP weights with the vision tower kept")
        if resize not in EMBEDDING_RESIZES:
            raise InputError(f"unknown resize {resize!r}; choose one of {', '.join(EMBEDDING_RESIZES)}")
        self.resize = resize
        self.visual = text_encoder.clip.visual
        size = self.visual.image_size
        self.size = size if isinstance(size, int) else size[0]
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.clamp(-1, 1) + 1) / 2
        if self.resize == "bicubic":
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=True)
        else:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.visual((x - self.mean) / self.std)


def step_decay(step: int, total: int, decay_at: Sequence[float], factor: float) -> float:
    """Learning-rate multiplier at `step`: `factor` to the power of the decay points already passed."""
    return factor ** sum(step >= math.ceil(p * total) for p in decay_at)


@dataclass
class StepLosses:
    """One step's losses (unweighted, and the weighted total); identity and background are 0 when off."""

    clip: float
    latent: float
    embedding: float
    total: float
    identity: float = 0.0
    background: float = 0.0


def start_distributed(device: torch.device) -> torch.device:
    """Under `torchrun` (WORLD_SIZE > 1), join the process group: NCCL for CUDA, on the device LOCAL_RANK names,
    gloo otherwise. Returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _rank_and_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class MapperTrainer:
    """One optimiser over the mapper; `generator`, `text_encoder` (with its image tower) and the optional
    `identity_net` and `face_parser` stay frozen. In a process group (`start_distributed`) the mapper runs under DDP.
    `val_latents` are the held-out latents that validation (`config.val_every`) scores."""

    def __init__(
        self,
        mapper: Mapper,
        generator: Generator,
        text_encoder: TextEncoder,
        config: TrainConfig,
        latents: torch.Tensor | None = None,
        device: str | torch.device = "cpu",
        identity_net: torch.nn.Module | None = None,
        face_parser: torch.nn.Module | None = None,
        val_latents: torch.Tensor | None = None,
    ):
        if not config.prompts:
            raise InputError("no training prompts; give a prompts file with at least one line")
        check_stages_fit(text_encoder, mapper, generator)
        self.rank, self.world_size = _rank_and_size()
        if config.batch_size % self.world_size:
            raise InputError(f"--batch-size {config.batch_size} does not split over {self.world_size} processes; "
                             f"use a multiple of {self.world_size}")
        if config.val_every and (val_latents is None or len(val_latents) == 0):
            raise InputError("validation needs held-out latents; give --val-latents, or --latents to hold some out")
        if config.dtype not in TRAIN_DTYPES:
            raise InputError(f"unknown training dtype {config.dtype!r}; choose one of {', '.join(TRAIN_DTYPES)}")
        self.device = torch.device(device)
        self.dtype = getattr(torch, config.dtype)
        self.config = config
        self.mapper = mapper.to(self.device, self.dtype).train().requires_grad_(True)
        self.generator = _frozen(generator, self.device, self.dtype)
        self.text_encoder = _frozen(text_encoder, self.device, self.dtype)
        self.identity_net = _frozen(identity_net, self.device, self.dtype)
        self.face_parser = _frozen(face_parser, self.device, self.dtype)
        self.image_embedder = ClipImageEmbedder(text_encoder).to(self.device, self.dtype)
        self.embedding_embedder = (
            self.image_embedder if config.embedding_resize == self.image_embedder.resize
            else ClipImageEmbedder(text_encoder, config.embedding_resize).to(self.device, self.dtype)
        )
        self.model = self.mapper
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.mapper, device_ids=ids)
        self.latents = latents
        self.val_latents = val_latents
        self.optimizer = torch.optim.Adam(self.mapper.parameters(), lr=config.lr)
        self.step = 0
        self.history: list[StepLosses] = []
        self.validation: list[tuple[int, float]] = []
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
                w = self.generator.mapping(z.to(self.device, self.dtype), self.config.truncation)
        prompt_idx = torch.tensor([self._rng.randrange(len(self.config.prompts)) for _ in range(b)])
        return w.to(self.device, self.dtype), self._text_embeddings[prompt_idx.to(self._text_embeddings.device)]

    def _losses(self, w: torch.Tensor, e: torch.Tensor, mapper: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted total and the vector (clip, latent, embedding, total, identity, background) of one batch."""
        c = self.config
        with torch.no_grad():
            x = self.generator.synthesis(w)
            original = self.embedding_embedder(x)
        w_edit = mapper(w, e)
        x_hat = self.generator.synthesis(w_edit)
        edited = self.image_embedder(x_hat)
        same_resize = self.embedding_embedder is self.image_embedder
        edited_for_embedding = edited if same_resize else self.embedding_embedder(x_hat)
        zero = x_hat.new_zeros(())
        clip_loss = (1 - F.cosine_similarity(edited, e, dim=-1)).mean()
        latent_loss = (w_edit - w).abs().mean()
        embedding_loss = (edited_for_embedding - original).abs().mean()
        use_identity = self.identity_net is not None and c.lambda_identity > 0
        use_background = self.face_parser is not None and c.lambda_background > 0
        id_loss = identity_loss(self.identity_net, x_hat, x) if use_identity else zero
        bg_loss = background_loss(self.face_parser, x_hat, x) if use_background else zero
        total = (c.lambda_clip * clip_loss + c.lambda_latent * latent_loss + c.lambda_embedding * embedding_loss
                 + c.lambda_identity * id_loss + c.lambda_background * bg_loss)
        return total, torch.stack([clip_loss, latent_loss, embedding_loss, total, id_loss, bg_loss]).detach()

    def train_step(self) -> StepLosses:
        """One optimisation step on a fresh batch; in a distributed run, on this process's share of it, the losses
        reported being the whole batch's."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * step_decay(self.step, c.steps, c.decay_at, c.decay_factor)
        w, e = self._batch()
        share = c.batch_size // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        total, values = self._losses(w[mine], e[mine], self.model)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.mapper.parameters(), c.grad_clip)
        self.optimizer.step()
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        self.step += 1
        losses = StepLosses(*values.tolist())
        self.history.append(losses)
        return losses

    @torch.no_grad()
    def validate(self) -> float:
        """Mean weighted loss over the held-out latents, latent i paired with prompt i mod the number of prompts (the
        same pairs every time)."""
        if self.val_latents is None:
            raise InputError("no held-out latents to validate on; give val_latents")
        self.mapper.eval()
        n, b = len(self.val_latents), self.config.batch_size
        pairs = (torch.arange(n) % len(self.config.prompts)).to(self._text_embeddings.device)
        total = 0.0
        for start in range(0, n, b):
            w = self.val_latents[start:start + b].to(self.device, self.dtype)
            loss, _ = self._losses(w, self._text_embeddings[pairs[start:start + b]], self.mapper)
            total += loss.item() * len(w)
        self.mapper.train()
        return total / n

    @property
    def best_validation(self) -> tuple[int, float] | None:
        """(step, loss) of the best validation so far."""
        return min(self.validation, key=lambda v: v[1]) if self.validation else None

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
            "history": [[h.clip, h.latent, h.embedding, h.total, h.identity, h.background] for h in self.history],
            "validation": [list(v) for v in self.validation],
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

    def _keep_if_best(self, folder: Path) -> None:
        """Validate; when the loss is the lowest so far, write the mapper to `best_mapper.safetensors` (atomically)."""
        best = self.best_validation
        loss = self.validate()
        self.validation.append((self.step, loss))
        if best is None or loss < best[1]:
            save_module(folder / "best_mapper.safetensors", self.mapper,
                        extra={"trained_steps": self.step, "val_loss": loss,
                               "train_config": _jsonable(asdict(self.config))})

    def resume(self, folder: str | os.PathLike) -> None:
        """Continue from the `train_state.pt` that `save` wrote: mapper weights, optimiser state, step, loss history,
        validation record and random streams."""
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
            raise InputError(f"{path}: cannot resume from it ({summarize(exc)}); start again with --force instead of "
                             "--resume") from None
        if saved != self.mapper.config:
            raise InputError(f"{path}: the saved mapper has config {saved}, this run uses {self.mapper.config}")
        try:
            step = state["step"]
            if type(step) is not int or step < 0:
                raise ValueError(f"its step is {step!r}, not a count of steps")
            self.mapper.load_state_dict(state["mapper"])
            self.optimizer.load_state_dict(state["optimizer"])
            _check_optimizer_state(self.optimizer)
            self._torch_rng.set_state(state["torch_rng"])
            self._rng.setstate((3, tuple(state["prompt_rng"]), None))
            history = [StepLosses(*h) for h in state["history"]]
            if len(history) != step:
                raise ValueError(f"its step is {step} but its loss history holds {len(history)} steps")
            validation = [(int(step), float(loss)) for step, loss in state.get("validation", [])]
        except Exception as exc:  # the same: any part of the state may be damaged
            raise InputError(f"{path}: cannot resume from it ({summarize(exc)}); start again with --force instead of "
                             "--resume") from None
        broken = _non_finite_weight(self.mapper)
        if broken is not None:
            raise InputError(f"{path}: cannot resume from it: the mapper weight {broken} holds NaN or infinity (a "
                             "diverged run); start again with --force instead of --resume, with a lower --lr")
        self.step = step
        self.history = history
        self.validation = validation

    def fit(self, out: str | os.PathLike, on_step: Callable[[int, StepLosses], None] | None = None) -> Path:
        """Train until `config.steps`, validating every `val_every` steps (and at the end) when asked and saving every
        `save_every` steps and at the end; returns the mapper file. Only the first process of a distributed run
        validates and writes."""
        c, out = self.config, Path(out)
        saved = False
        while self.step < c.steps:
            losses = self.train_step()
            self._check_finite(losses, out)
            if on_step is not None:
                on_step(self.step, losses)
            last = self.step == c.steps
            if self.rank == 0 and c.val_every and (self.step % c.val_every == 0 or last):
                self._keep_if_best(out)
            if self.rank == 0 and (self.step % c.save_every == 0 or last):
                self.save(out)
                saved = True
        if self.rank == 0 and not saved:
            self.save(out)
        return out / "mapper.safetensors"

    def _check_finite(self, losses: StepLosses, out: Path) -> None:
        """Raise `Diverged` when this step's losses or the mapper's weights are not all finite."""
        values = asdict(losses)
        bad_loss = next((name for name, value in values.items() if not math.isfinite(value)), None)
        bad_weight = _non_finite_weight(self.mapper)
        if bad_loss is None and bad_weight is None:
            return
        what = f"the {bad_loss} loss is {values[bad_loss]}" if bad_loss else f"the weight {bad_weight} is not finite"
        kept = (f"the files in {out} are from the last good save: lower --lr and start again, or --resume from them"
                if (Path(out) / "train_state.pt").is_file() else "no step was saved: lower --lr and start again")
        raise Diverged(f"training diverged at step {self.step} ({what}); nothing of it was saved; {kept}")


def _non_finite_weight(module: torch.nn.Module) -> str | None:
    """The name of the first parameter of `module` that holds NaN or infinity, or None."""
    return next((name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())), None)


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise `ValueError` unless every tensor of the optimiser's state is finite and, unless a scalar, of its
    parameter's shape (Adam's moments)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.dim() and value.shape != p.shape:
                    raise ValueError(f"the optimiser's {name} has shape {list(value.shape)} for a weight of shape "
                                     f"{list(p.shape)}")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"the optimiser's {name} holds NaN or infinity (a diverged run)")


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on a training folder (an exclusive `flock` on its `.train.lock`) for the block; a folder another
    run holds raises `InputError`."""
    path = Path(folder) / LOCK_FILE
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"--out {folder}: another training run is writing there (it holds {path}); wait for it "
                             "to end, or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def _frozen(module: torch.nn.Module | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    return None if module is None else module.to(device, dtype).eval().requires_grad_(False)


def plot_losses(
    history: Sequence[StepLosses], path: str | os.PathLike, validation: Sequence[tuple[int, float]] = ()
) -> Path:
    """A PNG of the loss curves (and the validation losses, as points), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(history) + 1)
    for name in ("total", "clip", "latent", "embedding", "identity", "background"):
        values = [getattr(h, name) for h in history]
        if any(values):
            ax.plot(steps, values, label=name)
    if validation:
        ax.plot(*zip(*validation), "o", label="validation (total)")
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


if __name__ == "__main__":
    # `torchrun -m` runs a module: this one hands over to the installed ffclip-train command
    from importlib.metadata import entry_points

    entry_points(group="console_scripts", name="ffclip-train")["ffclip-train"].load()()
