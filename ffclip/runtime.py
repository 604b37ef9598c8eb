"""`Runtime`: serve FFCLIP edits from an artifact folder written by `ffclip-export`, on any backend.

The runtime checks the folder against its manifest, validates inputs, splits batches into chunks that an engine
takes and that fit a memory budget, caches text embeddings per prompt and may be called from many threads at once.
Images (`synthesize`, `edit`) are uint8 `[B, R, R, 3]` on the CPU, or with `as_float=True` the generator's float32
`[B, 3, R, R]`, roughly in [-1, 1], on the runtime's device; latents and embeddings are float32 on the device. This is the one edit
path: `ffclip.pipeline.EditPipeline` is a `Runtime` over eager engines of in-memory modules. A folder exported with
the photo encoder (or a runtime given one with `use_encoder`) also inverts photos to latents (`invert`), so a service
goes from a photo to its edits through one runtime.

Engines load only bytes that were read once and checked against the manifest. A folder is pinned by passing the
sha256 of its `manifest.json` (printed by `ffclip-export`); for a folder that is not pinned, `backend="auto"` chooses
only among backends whose artifacts are data (`Backend.data_only`), never TorchScript archives or TensorRT plans,
which are programs.
"""

from __future__ import annotations

import math
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from .artifacts import (
    OPTIONAL_STAGES,
    PHOTO_SIZE,
    STAGES,
    ArtifactError,
    StageInfo,
    TensorInfo,
    check_encoder_fits,
    read_manifest,
    stage_tensors,
    verify_files,
)
from .backends import BACKENDS, EAGER_ARTIFACT, REGISTRY, compute_precision
from .checkpoints.bundle import load_latent_mapping
from .devices import resolve_device
from .engines import EngineUnavailable, StageEngine, engine_class
from .engines.eager import EagerEngine
from .errors import InputError
from .imaging import to_uint8
from .inputs import as_prompts, check_embeddings
from .latents import check_latents, sample_latents
from .models.text_encoder import tokenize
from .photos import photo_batch
from .strength import apply_strength, check_strength

# One engine call gets at most as many rows as fit this budget, counting a row's working memory as
# WORKING_MEMORY_FACTOR times its input and output bytes (measured on the 256-px random preset, then named demo, on the CPU: about 117 times for
# the mapper, 48 for the generator, less for the text encoder).
DEFAULT_MEMORY_BUDGET_MIB = 4096
WORKING_MEMORY_FACTOR = 128


class Runtime:
    """Three stage engines of one backend, and optionally the photo encoder's. Use `Runtime.load` for an artifact
    folder.

    `model` holds the sizes of `ffclip.artifacts.model_facts`; `mapping` gives, when first needed, the module whose
    mapping network `sample_latents` runs (the generator); `no_encoder` is the error `invert` gives without an
    encoder stage (what to do instead)."""

    def __init__(self, engines: dict[str, StageEngine], model: dict[str, int], mapping: Callable[[], nn.Module],
                 backend: str, device: torch.device, max_batch: int | None = None, cache_size: int = 1024,
                 memory_budget_mib: float | None = DEFAULT_MEMORY_BUDGET_MIB,
                 no_encoder: str = "this runtime has no encoder stage; give it one with use_encoder"):
        self.model = model
        self._no_encoder = no_encoder
        self._engines = engines
        self._backend = backend
        self._device = device
        self._max_batch = max_batch
        self._memory_budget_mib = memory_budget_mib
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._load_mapping = mapping
        self._mapping: nn.Module | None = None
        self._tokenizer = SimpleTokenizer(context_length=model["context_length"])

    @classmethod
    def load(cls, folder: str | Path, backend: str = "auto", device: str | torch.device | None = None,
             max_batch: int | None = None, cache_size: int = 1024, expected_sha256: str | None = None,
             memory_budget_mib: float | None = DEFAULT_MEMORY_BUDGET_MIB) -> "Runtime":
        """Open an artifact folder. `backend` is a name of `ffclip.backends.BACKENDS`, or "auto": the first backend
        of `REGISTRY` that may run on this device type, was built for every stage and opens (on the CPU: openvino,
        onnxruntime, torchscript, eager; on CUDA tensorrt first). `expected_sha256` pins the folder: the sha256 of
        its manifest.json, as `ffclip-export` prints it; without it, auto uses only backends whose artifacts are data. `max_batch` caps the rows per engine call, and so does
        `memory_budget_mib` (None: no budget; see `DEFAULT_MEMORY_BUDGET_MIB`)."""
        folder = Path(folder)
        dev = resolve_device(device)
        manifest = read_manifest(folder, verify=False, expected_sha256=expected_sha256)
        infos = {name: StageInfo.from_manifest(manifest, name) for name in (*STAGES, *OPTIONAL_STAGES)
                 if name in manifest["stages"]}
        candidates = [backend] if backend != "auto" else _candidates(infos, dev, pinned=expected_sha256 is not None)
        # every listed file is checked, once: those the first backend's engines read when they read them
        first = BACKENDS.get(candidates[0]) if candidates else None
        verify_files(folder, manifest, {i.files[first.artifact] for i in infos.values()
                                        if first is not None and first.artifact in i.files})

        def mapping() -> nn.Module:
            with infos["generator"].checked_file(folder, EAGER_ARTIFACT) as path:
                return load_latent_mapping(path)

        options = (manifest["model"], mapping)
        no_encoder = (f"{folder}: no encoder stage, so photos cannot be inverted; re-export the folder with "
                      "ffclip-export --encoder e4e_ffhq_encode.pt, or give the e4e checkpoint itself (--encoder of "
                      "ffclip edit and ffclip invert, Runtime.use_encoder)")
        limits = (max_batch, cache_size, memory_budget_mib, no_encoder)
        if backend != "auto":
            if expected_sha256 is None and backend in BACKENDS and not BACKENDS[backend].data_only:
                warnings.warn(f"{folder} is not pinned, yet the {backend} backend runs the code its files hold; pin it "
                              "with --expect-sha256 (Runtime.load's expected_sha256), the manifest sha256 that "
                              "ffclip-export printed", stacklevel=2)
            return cls(_open_engines(folder, infos, backend, dev), *options, backend, dev, *limits)
        reasons = []
        for candidate in candidates:
            try:
                engines = _open_engines(folder, infos, candidate, dev)
            except (EngineUnavailable, ArtifactError) as exc:  # e.g. an engine built for another GPU: fall back
                reasons.append(f"{candidate}: {exc}")
                continue
            return cls(engines, *options, candidate, dev, *limits)
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
        return int(self.model["num_ws"])

    @property
    def resolution(self) -> int:
        return int(self.model["resolution"])

    @property
    def embed_dim(self) -> int:
        return int(self.model["embed_dim"])

    def sample_latents(self, num: int, seed: int = 0, truncation: float = 1.0) -> torch.Tensor:
        """`w+ [num, L, D]` (CPU, float32) from seeded `z` through the generator's mapping network, truncated towards
        `w_avg`."""
        with self._cache_lock:
            if self._mapping is None:
                self._mapping = self._load_mapping()
        return sample_latents(self._mapping, num, seed, truncation)

    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Raw CLIP text embeddings, float32 `[B, embed_dim]`, one row per prompt (a string is one prompt; cached per
        prompt string)."""
        prompts = as_prompts(prompts)
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
        """Edited latents `[B, L, D]` from `latents [B, L, D]` (or `[B, D]`) and `embeddings [B, D]` (or `[D]` /
        `[1, D]` for one embedding shared by all)."""
        w = check_latents(latents, self.num_ws, self.embed_dim).to(self._device)
        return self._modulate(w, check_embeddings(embeddings, w.shape[0], self.embed_dim))

    def _modulate(self, w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self._run("mapper", {"w": w, "embedding": e})["w_edit"]

    def synthesize(self, latents: torch.Tensor, *, as_float: bool = False) -> torch.Tensor:
        """Images uint8 `[B, R, R, 3]` (CPU) from latents `[B, L, D]` (or `[B, D]`); with `as_float`, the generator's
        float32 `[B, 3, R, R]`, roughly in [-1, 1], on the device."""
        images = self._synthesize(check_latents(latents, self.num_ws, self.embed_dim).to(self._device))
        return images if as_float else to_uint8(images)

    def _synthesize(self, w: torch.Tensor) -> torch.Tensor:
        return self._run("generator", {"w": w})["image"]

    @property
    def has_encoder(self) -> bool:
        """Whether `invert` can run: the folder has the encoder stage, or one was given with `use_encoder`."""
        return "encoder" in self._engines

    def use_encoder(self, encoder: nn.Module, precision: str = "fp32", where: str = "the encoder") -> None:
        """Invert photos with the in-memory `encoder` (eager, computing in `precision`) from now on, in place of the
        folder's encoder stage; `InputError` naming `where` unless its latents fit the generator."""
        check_encoder_fits(encoder, self.num_ws, self.embed_dim, where)
        tensors = stage_tensors({**self.model, "photo_size": PHOTO_SIZE})["encoder"]
        old, self._engines["encoder"] = self._engines.get("encoder"), eager_engine("encoder", tensors, encoder,
                                                                                    self._device, precision)
        if old is not None:
            old.close()

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """W+ latents float32 `[B, L, D]` on the device from aligned face photos `[B, 3, H, W]`, uint8 or float in
        [-1, 1], resized to the encoder's input as `ffclip.photos.photo_batch` does; the average latent is included,
        so the result edits and synthesizes directly."""
        if self._engines and not self.has_encoder:
            raise InputError(self._no_encoder)
        size = self._engine("encoder").stage.inputs[0].shape[-1]
        return self._run("encoder", {"images": photo_batch(images, int(size))})["w"]

    def edit(self, latents: torch.Tensor, prompts: str | Sequence[str],
             strength: float | Sequence[float] | torch.Tensor = 1.0, *, as_float: bool = False) -> torch.Tensor:
        """Edited images, as `synthesize` gives them: uint8 `[B, R, R, 3]` (CPU), or float with `as_float`. `prompts`
        is one prompt applied to every latent, or a list of exactly one prompt per latent; `strength` (one, or one
        per latent) scales the edit (`ffclip.strength`)."""
        return self.edit_with_latents(latents, prompts, strength, as_float=as_float)[0]

    def edit_with_latents(self, latents: torch.Tensor, prompts: str | Sequence[str],
                          strength: float | Sequence[float] | torch.Tensor = 1.0, *, as_float: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of `edit` and the edited latents they were synthesized from, float32 `[B, L, D]` on the
        device (the mapper's output with `strength` applied)."""
        # chunk by chunk, so without `as_float` only the uint8 images of the whole batch are held
        chunks = [(w, images if as_float else to_uint8(images))
                  for w, images in self._edit_chunks(*self._edit_inputs(latents, prompts, strength))]
        return torch.cat([images for _, images in chunks]), torch.cat([w for w, _ in chunks])

    def edited(self, latents: torch.Tensor, prompts: str | Sequence[str],
               strength: float | Sequence[float] | torch.Tensor = 1.0) -> Iterator[torch.Tensor]:
        """The images of `edit` as float32 `[b, 3, R, R]` on the device, one chunk of rows at a time; the inputs are
        checked before the first chunk is computed."""
        return (images for _, images in self._edit_chunks(*self._edit_inputs(latents, prompts, strength)))

    def _edit_inputs(self, latents: torch.Tensor, prompts: str | Sequence[str],
                     strength: float | Sequence[float] | torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        w = check_latents(latents, self.num_ws, self.embed_dim).to(self._device)
        prompts = as_prompts(prompts)
        if len(prompts) not in (1, w.shape[0]):
            raise InputError(f"{len(prompts)} prompts for {w.shape[0]} latents; give one prompt, or one per latent")
        s = check_strength(strength, w.shape[0])
        return w, self.encode_text(prompts), s

    def _edit_chunks(self, w: torch.Tensor, e: torch.Tensor,
                     s: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(edited latents, images) one chunk of rows at a time."""
        step = min(self.chunk_rows("mapper"), self.chunk_rows("generator"))
        for i in range(0, w.shape[0], step):
            wi = w[i : i + step]
            ei = e.expand(wi.shape[0], -1) if e.shape[0] == 1 else e[i : i + step]
            w_edit = self._modulate(wi, ei)
            if s is not None:
                w_edit = apply_strength(wi, w_edit, s[i : i + step])
            yield w_edit, self._synthesize(w_edit)

    def chunk_rows(self, stage: str) -> int:
        """The most rows one call of `stage`'s engine gets: the engine's own limit, `max_batch`, and the rows whose
        estimated working memory fits the memory budget (at least one)."""
        engine = self._engine(stage)
        limits = [m for m in (engine.max_batch, self._max_batch) if m is not None]
        if self._memory_budget_mib is not None:
            tensors = (*engine.stage.inputs, *engine.stage.outputs)
            row = sum(math.prod(t.concrete_shape(1)) * t.torch_dtype.itemsize for t in tensors)
            limits.append(max(1, int(self._memory_budget_mib * 2**20 // (WORKING_MEMORY_FACTOR * row))))
        return min(limits, default=sys.maxsize)

    def _run(self, stage: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one engine, in chunks of at most `chunk_rows(stage)` rows."""
        engine = self._engine(stage)
        batch = next(iter(inputs.values())).shape[0]
        step = self.chunk_rows(stage)
        parts = [engine.run({k: v[i : i + step] for k, v in inputs.items()}) for i in range(0, batch, step)]
        return {k: torch.cat([p[k] for p in parts]).to(self._device) for k in parts[0]}

    def _engine(self, stage: str) -> StageEngine:
        engine = self._engines.get(stage)
        if engine is None:
            raise EngineUnavailable("this runtime is closed")
        return engine

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


def eager_engine(name: str, tensors: tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]], module: nn.Module,
                 device: torch.device, precision: str) -> EagerEngine:
    """An eager engine of stage `name` over the in-memory `module`, computing as an export at `precision` would
    (`ffclip.backends.compute_precision`)."""
    info = StageInfo(name, *tensors, files={}, min_batch=1, opt_batch=1, max_batch=sys.maxsize, precision=precision,
                     entry={"compute_precision": {"eager": compute_precision(name, "eager", precision, device)}})
    return EagerEngine(None, info, device, module=module)


def _candidates(infos: dict[str, StageInfo], device: torch.device, pinned: bool) -> list[str]:
    """The backends `auto` may use on `device`, best first (`REGISTRY` order), whose artifacts exist and fit `device`
    for every stage; for a folder that is not `pinned`, only those whose artifacts are data."""
    found = []
    for record in REGISTRY:
        if device.type not in record.auto_on or not (pinned or record.data_only):
            continue
        try:
            cls = engine_class(record.name)
        except EngineUnavailable:
            continue
        if (all(record.artifact in i.files and cls.fits(i, device) is None for i in infos.values())
                and cls.availability(device) is None):
            found.append(record.name)
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

