"""The interface every backend implements: one exported stage, run on named torch tensors.

An engine is built from an artifact folder, the manifest's entry for one stage and a device. It takes a dict of
named input tensors (any device; the engine moves them) and returns a dict of named output tensors on its device.
Engines never split batches or validate values; `ffclip.runtime.Runtime` does that once for every backend.
"""

from __future__ import annotations

import abc
import contextlib
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ffclip.errors import FfclipError
from ffclip.export.manifest import ArtifactError, confined_name, read_listed

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


def cuda_reason(device: torch.device) -> str | None:
    """Why `device` cannot be used here (a CUDA device without CUDA), or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available here"
    return None


class EngineUnavailable(FfclipError):
    """A backend that cannot run here, or an artifact that does not fit this machine; the message says what to do."""


@dataclass(frozen=True)
class TensorInfo:
    """One named input or output. `shape[0]` is the string "batch" (the dynamic axis); the rest are ints."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape with the batch axis set to `batch`."""
        return tuple(batch if isinstance(d, str) else int(d) for d in self.shape)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorInfo":
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StageInfo:
    """What the manifest says about one stage: its tensors, its file per backend and the batch range it was built for."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    files: dict[str, str]
    min_batch: int
    opt_batch: int
    max_batch: int
    precision: str
    entry: dict[str, Any]
    # sha256 of every file the manifest lists, by relative path; None while an export checks the files it just wrote
    hashes: dict[str, str] | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], name: str) -> "StageInfo":
        """The entry for stage `name` of a parsed `manifest.json`."""
        entry = manifest["stages"][name]
        batch = manifest["batch"]
        return cls(
            name=name,
            inputs=tuple(TensorInfo.from_dict(t) for t in entry["inputs"]),
            outputs=tuple(TensorInfo.from_dict(t) for t in entry["outputs"]),
            files=dict(entry["files"]),
            min_batch=int(batch["min"]),
            opt_batch=int(batch["opt"]),
            max_batch=int(batch["max"]),
            precision=manifest["precision"],
            entry=entry,
            hashes=dict(manifest["files"]),
        )

    def file(self, folder: Path, backend: str) -> Path:
        """The artifact of this stage for `backend`; `EngineUnavailable` when the export did not build it."""
        if backend not in self.files:
            raise EngineUnavailable(
                f"{folder}: no {backend} artifact for the {self.name} stage; re-export with --formats including {backend}"
            )
        return folder / confined_name(folder, self.files[backend], f"stage {self.name!r} ({backend})")

    def read(self, folder: Path, backend: str) -> bytes:
        """The bytes of the artifact for `backend`, read once and checked against the manifest's sha256."""
        self.file(folder, backend)
        return self.read_listed(folder, self.files[backend])

    def read_listed(self, folder: Path, name: str) -> bytes:
        """The checked bytes of `name`, a path relative to `folder` that the manifest lists (and so hashes)."""
        confined_name(folder, name, f"the {self.name} stage")
        if self.hashes is not None and name not in self.hashes:
            raise ArtifactError(f"{folder / name}: opened by the {self.name} stage but not listed (hashed) in "
                                f"manifest.json; re-export with ffclip-export --out {folder}")
        return read_listed(folder, name, None if self.hashes is None else self.hashes[name])

    @contextlib.contextmanager
    def private_copy(self, folder: Path, names: list[str]) -> Iterator[Path]:
        """A private temporary folder holding the checked bytes of the listed files `names` at their relative paths,
        for libraries that load only from files; removed on exit."""
        with tempfile.TemporaryDirectory(prefix="ffclip-checked-") as tmp:
            for name in names:
                target = Path(tmp) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.read_listed(folder, name))
            yield Path(tmp)

    @contextlib.contextmanager
    def checked_file(self, folder: Path, backend: str) -> Iterator[Path]:
        """The artifact for `backend` as a private copy of its checked bytes (see `private_copy`)."""
        self.file(folder, backend)
        with self.private_copy(folder, [self.files[backend]]) as tmp:
            yield tmp / self.files[backend]


class StageEngine(abc.ABC):
    """One stage of an artifact folder, served by one backend.

    Subclasses set `backend`, implement `availability`, `_run` and (when they hold resources) `_release`.
    Calls are serialised by a per-engine lock unless the subclass sets `thread_safe = True`.
    """

    backend: ClassVar[str]
    # the exported format this backend serves (a key of the manifest's per-stage "files")
    artifact: ClassVar[str]
    thread_safe: ClassVar[bool] = False

    def __init__(self, folder: Path, stage: StageInfo, device: torch.device):
        self.folder = Path(folder)
        self.stage = stage
        self.device = torch.device(device)
        self._serial = threading.Lock()  # serialises calls unless `thread_safe`
        self._state = threading.Condition()  # guards `_closed` and `_active`
        self._closed = False
        self._active = 0

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
