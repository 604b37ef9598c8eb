"""One replica's work: open the stages once, then turn batches of `EditRequest`s into PNG pictures."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..stages import StageSources, open_stages, serves_world_text_encoder
from .requests import EditRequest


@dataclass(frozen=True)
class ServeConfig:
    """What one service serves and how: an artifact folder, or else `sources` (checkpoints, or the preset's default
    weights), and the limits of each replica."""

    sources: StageSources = StageSources()
    artifacts: Path | None = None
    expected_sha256: str | None = None  # the pin of `artifacts` (`Runtime.load`)
    backend: str = "auto"
    device: str = "cpu"
    replicas: int = 1
    max_batch: int = 8
    batch_wait_s: float = 0.005
    queue: int = 32
    num_cpus: float = 1.0
    threads: int | None = None  # None: what Ray gives the replica (its num_cpus)
    cache_size: int = 1024
    retry_after_s: int = 1
    edit_timeout_s: float = 60.0
    health_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    max_uploads: int = 256

    @property
    def editor_slots(self) -> int:
        """Requests one editor replica holds at once: a batch running and a batch gathering."""
        return 2 * self.max_batch

    @property
    def world_text_encoder(self) -> bool:
        """Whether the text encoder served is the world's, trained on a known vocabulary."""
        return serves_world_text_encoder(self.sources, self.artifacts)


class Editor:
    """The stages of one replica (their embedding cache is shared by all its requests) and the batch edit."""

    def __init__(self, config: ServeConfig):
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.stages = open_stages(config.sources, config.device, config.artifacts, config.backend,
                                  config.expected_sha256, cache_size=config.cache_size)
        self.source = (str(config.artifacts) if config.artifacts is not None
                       else f"checkpoints ({config.sources.preset} preset for any stage not given)")
        self.backend = self.stages.backend

    def info(self) -> dict:
        """What is served: source, backend, resolution, and the number and width of the style layers."""
        return {"source": self.source, "backend": self.backend, "resolution": self.stages.resolution,
                "num_ws": self.stages.num_ws, "latent_dim": self.stages.embed_dim}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """CLIP embeddings `[P, D]` on the CPU, computed once per prompt string while it stays in the cache."""
        return self.stages.encode_text(prompts).cpu()

    def latents(self, requests: list[EditRequest]) -> torch.Tensor:
        """`w+ [B, L, D]`: each request's own latents, or its seed through the mapping network."""
        return torch.stack([
            r.latents if r.latents is not None else self.stages.sample_latents(1, r.seed, r.truncation)[0]
            for r in requests
        ])

    def edit(self, requests: list[EditRequest]) -> list[bytes]:
        """One PNG per request, the whole batch through each stage at once."""
        images = self.stages.edit(self.latents(requests), [r.prompt for r in requests],
                                  [r.strength for r in requests])
        return [png(image) for image in images.numpy()]


class BatchRunner:
    """Runs `work` (a list of items -> one result per item) in a worker thread, one call at a time and on at most
    `max_batch` items per call; items submitted while a call runs are taken together by the next call, first come
    first served. Each item's future gets `(result, size of the call it ran in)`."""

    def __init__(self, work: Callable[[list], list], max_batch: int):
        self._work = work
        self._max_batch = max_batch
        self._waiting: list[tuple[object, asyncio.Future]] = []
        self._drain: asyncio.Task | None = None

    def submit(self, items: Sequence) -> list[asyncio.Future]:
        """Queue `items`; call from the event loop that will await the futures."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._waiting.extend(zip(items, futures))
        if self._drain is None or self._drain.done():
            self._drain = loop.create_task(self._run_all())
        return futures

    async def _run_all(self) -> None:
        while self._waiting:
            taken, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            try:
                results = await asyncio.to_thread(self._work, [item for item, _ in taken])
            except Exception as exc:
                for _, future in taken:
                    future.set_exception(exc)
            else:
                for (_, future), result in zip(taken, results):
                    future.set_result((result, len(taken)))


def png(image: np.ndarray) -> bytes:
    """PNG bytes of one uint8 `[R, R, 3]` picture."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=3)
    return out.getvalue()
