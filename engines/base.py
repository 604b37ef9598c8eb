"""The interface every backend implements: one exported stage, run on named torch tensors.

An engine is built from an artifact folder (or, for the eager backend, an in-memory module), the manifest's entry for
one stage (`ffclip.artifacts.StageInfo`) and a device. It takes a dict of named input tensors (any device; the engine
moves them) and returns a dict of named output tensors on its device.
Engines never validate values, nor cut a batch into the calls the caller sees: `ffclip.runtime.Runtime` does both once
for every backend (an engine may still spread one call over parallel requests internally, as OpenVINO's does).
"""

from __future__ import annotations

import abc
import threading
from pathlib import Path
from typing import ClassVar

import torch

from ffclip.artifacts import StageInfo
from ffclip.backends import BACKENDS
from ffclip.errors import FfclipError


def cuda_reason(device: torch.device) -> str | None:
    """Why `device` cannot be used here (a CUDA device without CUDA), or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available here"
    return None


class EngineUnavailable(FfclipError):
    """A backend that cannot run here, or an artifact that does not fit this machine; the message says what to do."""


class StageEngine(abc.ABC):
    """One stage of an artifact folder, served by one backend.

    Subclasses set `backend`, implement `availability`, `_run` and (when they hold resources) `_release`.
    Calls are serialised by a per-engine lock unless the subclass sets `thread_safe = True`.
    """

    backend: ClassVar[str]
    # the exported format this backend serves (a key of the manifest's per-stage "files"), from its record
    artifact: ClassVar[str]
    thread_safe: ClassVar[bool] = False

    def __init__(self, folder: Path | None, stage: StageInfo, device: torch.device):
        self.folder = None if folder is None else Path(folder)  # None: an engine over an in-memory module
        self.stage = stage
        self.device = torch.device(device)
        self._serial = threading.Lock()  # serialises calls unless `thread_safe`
        self._state = threading.Condition()  # guards `_closed` and `_active`
        self._closed = False
        self._active = 0

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "backend" in cls.__dict__:
            cls.artifact = BACKENDS[cls.backend].artifact

    @classmethod
    def fits(cls, stage: StageInfo, device: torch.device) -> str | None:
        """None when this stage's artifact can serve `device`, else why not (one line); what `auto` checks before
        choosing the backend."""
        return None

    @classmethod
    @abc.abstractmethod
    def availability(cls, device: torch.device) -> str | None:
        """None when this backend can run on `device` here, else the reason it cannot (one line)."""

    @classmethod
    def require(cls, device: torch.device) -> None:
        """Raise `EngineUnavailable` with the reason when the backend cannot run on `device`."""
        reason = cls.availability(torch.device(device))
        if reason is not None:
            raise EngineUnavailable(f"the {cls.backend} backend cannot run on {device}: {reason}")

    @property
    def max_batch(self) -> int | None:
        """The largest batch one call accepts; None when the backend has no limit."""
        return None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.stage.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.stage.outputs]

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the stage on named inputs; returns named outputs on this engine's device."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.stage.name}: missing inputs {missing}")
        with self._state:
            if self._closed:
                raise EngineUnavailable(f"the {self.backend} engine of the {self.stage.name} stage is closed")
            self._active += 1
        try:
            feeds = {t.name: inputs[t.name].to(self.device, t.torch_dtype).contiguous() for t in self.stage.inputs}
            if self.thread_safe:
                return self._run(feeds)
            with self._serial:
                return self._run(feeds)
        finally:
            with self._state:
                self._active -= 1
                self._state.notify_all()

    __call__ = run

    @abc.abstractmethod
    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on inputs already on the device with the manifest's dtypes."""

    def _release(self) -> None:
        """Free what the engine holds (sessions, modules, device memory)."""

    def close(self) -> None:
        """Free the engine's memory once the calls in progress have finished; later calls raise."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._state.wait_for(lambda: self._active == 0)
        self._release()

    def __enter__(self) -> "StageEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
