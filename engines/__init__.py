"""Backends that run an exported stage, behind the `StageEngine` interface of `ffclip.engines.base`.

Each backend's engine is named by its record in `ffclip.backends.REGISTRY` and imported only when asked for, so
`tensorrt` or `triton` are never imported unless used.
"""

from __future__ import annotations

from ffclip.backends import BACKENDS
from ffclip.engines.base import EngineUnavailable, StageEngine


def engine_class(backend: str) -> type[StageEngine]:
    """The engine class of `backend`; `EngineUnavailable` for an unknown name or a backend whose module is absent."""
    if backend not in BACKENDS:
        raise EngineUnavailable(f"unknown backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    module_name = BACKENDS[backend].engine.split(":")[0]
    try:
        return BACKENDS[backend].engine_class()
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise EngineUnavailable(f"the {backend} backend is not part of this installation") from None


__all__ = ["EngineUnavailable", "StageEngine", "engine_class"]
