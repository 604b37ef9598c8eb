"""Backends that run an exported stage, behind the `StageEngine` interface of `ffclip.engines.base`.

The backend named `b` (one of `ffclip.artifacts.BACKENDS`) lives in `ffclip.engines.b`, imported only when asked for,
so `tensorrt` or `triton` are never imported unless used.
"""

from __future__ import annotations

import importlib

from ffclip.artifacts import BACKENDS
from ffclip.engines.base import EngineUnavailable, StageEngine


def engine_class(backend: str) -> type[StageEngine]:
    """The engine class of `backend`; `EngineUnavailable` for an unknown name or a backend whose module is absent."""
    if backend not in BACKENDS:
        raise EngineUnavailable(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    module_name = f"ffclip.engines.{backend}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise EngineUnavailable(f"the {backend} backend is not part of this installation") from None
    return next(c for c in vars(module).values()
                if isinstance(c, type) and issubclass(c, StageEngine) and c.__dict__.get("backend") == backend)


__all__ = ["EngineUnavailable", "StageEngine", "engine_class"]
