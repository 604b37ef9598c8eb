"""`Runtime`: serve FFCLIP edits from an artifact folder written by `ffclip-export`, on any backend.

The runtime checks the folder against its manifest, validates inputs, splits batches larger than an engine takes,
caches text embeddings per prompt and may be called from many threads at once. Outputs are float32 tensors on the
runtime's device; `edit` returns uint8 images on the CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer

from .checkpoints.bundle import load_module
from .devices import resolve_device
from .engines import StageEngine, StageInfo, engine_class
from .engines.base import EngineUnavailable
from .errors import InputError
from .export.manifest import ArtifactError, read_manifest
from .export.stages import STAGES
from .imaging import to_uint8
from .latents import check_latents, sample_latents
from .models.text_encoder import tokenize
from .strength import apply_strength, check_strength

AUTO_ORDER = ("tensorrt", "openvino", "onnxruntime", "torchscript", "eager")


class Runtime:
    """Three stage engines of one backend over one artifact folder. Use `Runtime.load`."""

    def __init__(self, folder: Path, manifest: dict, engines: dict[str, StageEngine], backend: str, device: torch.device,
                 max_batch: int | None = None, cache_size: int = 1024):
        self.folder = folder
        self.manifest = manifest
        self._engines = engines
        self._backend = backend
        self._device = device
        self._max_batch = max_batch
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._mapping: torch.nn.Module | None = None
        self._tokenizer = SimpleTokenizer(context_length=manifest["model"]["context_length"])

    @classmethod
    def load(cls, folder: str | Path, backend: str = "auto", device: str | torch.device | None = None,
             max_batch: int | None = None, cache_size: int = 1024) -> "Runtime":
        """Open an artifact folder. `backend` is "auto" (tensorrt on CUDA when built, openvino on the CPU when
        built, else onnxruntime, torchscript, eager), or one of eager, torchscript, onnxruntime, tensorrt, triton,
        openvino. `max_batch` caps the rows per engine call."""
        folder = Path(folder)
        dev = resolve_device(device)
        manifest = read_manifest(folder)
        infos = {name: StageInfo.from_manifest(manifest, name) for name in STAGES}
        if backend != "auto":
            return cls(folder, manifest, _open_engines(folder, infos, backend, dev), backend, dev, max_batch, cache_size)
        reasons = []
        for candidate in _candidates(infos, dev):
            try:
                engines = _open_engines(folder, infos, candidate, dev)
            except EngineUnavailable as exc:  # e.g. a TensorRT engine built for another GPU: fall back
                reasons.append(f"{candidate}: {exc}")
                continue
            return cls(folder, manifest, engines, candidate, dev, max_batch, cache_size)
        raise ArtifactError(
            f"no backend can serve {folder} on {dev}" + (f" ({'; '.join(reasons)})" if reasons else "")
            + "; re-export it with ffclip-export"
        )

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_ws(self) -> int:
        return int(self.manifest["model"]["num_ws"])

    @property
    def resolution(self) -> int:
        return int(self.manifest["model"]["resolution"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["model"]["embed_dim"])

    def sample_latents(self, num: int, seed: int = 0, truncation: float = 1.0) -> torch.Tensor:
        """`w+ [num, L, 512]` through the mapping network of the generator bundle in the folder (CPU, float32)."""
        with self._cache_lock:
            if self._mapping is None:
                self._mapping = load_module(StageInfo.from_manifest(self.manifest, "generator").file(self.folder, "eager"))
        return sample_latents(self._mapping, num, seed, truncation)

    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Raw CLIP text embeddings, float32 `[B, embed_dim]`, one row per prompt (cached per prompt string)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = tokenize(self._tokenizer, prompts)
        unique = list(dict.fromkeys(prompts))
        with self._cache_lock:
            found = {p: self._cache[p] for p in unique if p in self._cache}
            for p in found:
                self._cache.move_to_end(p)
        missing = [p for p in unique if p not in found]
        if missing:
            fresh = self._run("text_encoder", {"tokens": tokens[[prompts.index(p) for p in missing]]})["embedding"]
            found.update(zip(missing, fresh))
            with self._cache_lock:
                self._cache.update(zip(missing, fresh))
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([found[p] for p in prompts]).to(self._device)

    def modulate(self, latents: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Edited latents `[B, num_ws, 512]` from `latents [B, num_ws, 512]` and `embeddings [B, 512]` (or `[512]` /
        `[1, 512]` for one embedding shared by all)."""
        w = check_latents(latents, self.num_ws, self.embed_dim).to(self._device)
        e = embeddings
        if isinstance(e, torch.Tensor) and (e.dim() == 1 or (e.dim() == 2 and e.shape[0] == 1)):
            e = e.reshape(1, -1).expand(w.shape[0], -1)
        e = self._check(e, "embeddings", (self.embed_dim,))
        if e.shape[0] != w.shape[0]:
            raise InputError(f"embeddings has {e.shape[0]} rows but latents has {w.shape[0]}; give one per latent or one")
        return self._run("mapper", {"w": w, "embedding": e})["w_edit"]

    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        """Images float32 `[B, 3, R, R]`, roughly in [-1, 1], from latents `[B, num_ws, 512]`."""
        w = check_latents(latents, self.num_ws, self.embed_dim).to(self._device)
        return self._run("generator", {"w": w})["image"]

    def edit(self, latents: torch.Tensor, prompts: str | Sequence[str],
             strength: float | Sequence[float] | torch.Tensor = 1.0) -> torch.Tensor:
        """Edited images uint8 `[B, R, R, 3]` (CPU). `prompts` is one prompt applied to every latent, or a list of
        exactly one prompt per latent; `strength` (one, or one per latent) scales the edit (`ffclip.strength`)."""
        w = check_latents(latents, self.num_ws, self.embed_dim).to(self._device)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) not in (1, w.shape[0]):
            raise InputError(f"{len(prompts)} prompts for {w.shape[0]} latents; give one prompt, or one per latent")
        check_strength(strength, w.shape[0])
        return to_uint8(self.synthesize(apply_strength(w, self.modulate(w, self.encode_text(prompts)), strength)))

    def _check(self, x: torch.Tensor, what: str, tail: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1 + len(tail) or tuple(x.shape[1:]) != tail or x.shape[0] == 0:
            want = ", ".join(["B", *map(str, tail)])
            raise InputError(f"{what} must have shape [{want}] with B >= 1, got {list(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"{what} must be a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise InputError(f"{what} contains NaN or Inf values")
        return x.float()

    def _run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one engine, in chunks no larger than it (or `max_batch`) accepts."""
        engine = self._engines.get(stage)
        if engine is None:
            raise EngineUnavailable("this runtime is closed")
        limits = [m for m in (engine.max_batch, self._max_batch) if m is not None]
        batch = next(iter(inputs.values())).shape[0]
        step = min(limits) if limits else batch
        parts = [engine.run({k: v[i : i + step] for k, v in inputs.items()}) for i in range(0, batch, step)]
        return {k: torch.cat([p[k] for p in parts]).to(self._device) for k in parts[0]}

    def close(self) -> None:
        """Free every engine and the embedding cache."""
        engines, self._engines = self._engines, {}
        for engine in engines.values():
            engine.close()
        with self._cache_lock:
            self._cache.clear()
            self._mapping = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _candidates(infos: dict[str, StageInfo], device: torch.device) -> list[str]:
    """The backends of `AUTO_ORDER`, best first, whose artifacts exist for every stage and that can run on `device`."""
    found = []
    for backend in AUTO_ORDER:
        try:
            cls = engine_class(backend)
        except EngineUnavailable:
            continue
        if all(cls.artifact in i.files for i in infos.values()):
            if cls.availability(device) is None and _traced_for(infos, backend, device):
                found.append(backend)
    return found


def _open_engines(folder: Path, infos: dict[str, StageInfo], backend: str, device: torch.device) -> dict[str, StageEngine]:
    """One engine of `backend` per stage; those already opened are closed again if a later one fails."""
    engine = engine_class(backend)
    engine.require(device)
    engines: dict[str, StageEngine] = {}
    try:
        for name, info in infos.items():
            engines[name] = engine(folder, info, device)
    except BaseException:
        for e in engines.values():
            e.close()
        raise
    return engines


def _traced_for(infos: dict[str, StageInfo], backend: str, device: torch.device) -> bool:
    if backend != "torchscript":
        return True
    return all(torch.device(i.entry.get("torchscript", {}).get("device", "cpu")).type == device.type for i in infos.values())
