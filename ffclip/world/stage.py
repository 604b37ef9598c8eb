"""What every world training stage shares: a resumable loop that checkpoints in pieces and reports progress."""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic import atomic_file


def log(message: str) -> None:
    """One progress line on stderr, flushed (readable without a terminal)."""
    print(message, file=sys.stderr, flush=True)


class ResumableLoop:
    """Run `step(i) -> {name: value}` until `total`, saving `state()` to `folder/state.pt` every `save_every` steps.

    `state()` and `restore(state)` carry the models and optimisers; the loop adds the step, the random streams and
    the CPU seconds spent so far, so a re-run continues where the last save left off.
    """

    def __init__(self, name: str, folder: str | os.PathLike, total: int, save_every: int,
                 state: Callable[[], dict], restore: Callable[[dict], None], rng: random.Random,
                 torch_rng: torch.Generator):
        self.name, self.folder, self.total, self.save_every = name, Path(folder), total, save_every
        self._state, self._restore, self.rng, self.torch_rng = state, restore, rng, torch_rng
        self.step = 0
        self.cpu_seconds = 0.0
        path = self.folder / "state.pt"
        if path.exists():
            saved = torch.load(path, map_location="cpu", weights_only=False)
            self._restore(saved["model"])
            self.step, self.cpu_seconds = int(saved["step"]), float(saved["cpu_seconds"])
            self.rng.setstate(saved["rng"])
            self.torch_rng.set_state(saved["torch_rng"])
            log(f"[{name}] resumed at step {self.step}/{total} ({self.cpu_seconds / 60:.1f} CPU min so far)")

    def save(self) -> None:
        saved = {"model": self._state(), "step": self.step, "cpu_seconds": self.cpu_seconds,
                 "rng": self.rng.getstate(), "torch_rng": self.torch_rng.get_state()}
        with atomic_file(self.folder / "state.pt") as tmp:
            torch.save(saved, tmp)

    def run(self, step: Callable[[int], dict[str, float]], report_every: int = 50) -> float:
        """Train to the end; returns the stage's total CPU seconds (this process, all runs together)."""
        wall, cpu = time.time(), time.process_time()
        start_step, running = self.step, {}
        while self.step < self.total:
            values = step(self.step)
            for k, v in values.items():
                running[k] = 0.9 * running.get(k, v) + 0.1 * v
            self.step += 1
            if self.step % report_every == 0 or self.step == self.total:
                spent = self.cpu_seconds + time.process_time() - cpu
                rate = (time.time() - wall) / (self.step - start_step)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in running.items())
                log(f"[{self.name}] step {self.step}/{self.total}  {shown}  "
                    f"{spent / 60:.1f} CPU min, about {rate * (self.total - self.step) / 60:.1f} min left")
            if self.step % self.save_every == 0 or self.step == self.total:
                self.cpu_seconds += time.process_time() - cpu
                cpu = time.process_time()
                self.save()
        return self.cpu_seconds
