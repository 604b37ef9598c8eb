"""Reading pickles without running anything they name.

`RestrictedUnpickler` resolves only an allowlist of globals: the torch tensor rebuild functions (replaced by local
equivalents), `collections.OrderedDict`, a few builtins and torch dtypes. Callers add what their format needs
(NVIDIA's persistence hook, TorchScript's module classes). Modules pickled with their state come back as
`ModuleRecord`s that hold only tensors, submodules and plain scalar attributes. Configuration objects that some
checkpoints carry (argparse, OmegaConf, dnnlib, numpy scalars) become inert `Opaque` stand-ins.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

# Top-level modules whose classes may appear in checkpoint metadata (options, training kwargs, numpy scalars);
# they are never imported or called, only replaced by `Opaque` stand-ins.
CONFIG_MODULES = frozenset({"argparse", "omegaconf", "dnnlib", "numpy", "pathlib", "typing", "enum"})


class Opaque:
    """An inert stand-in for a class or function named by a file; it records its arguments and state only."""

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = super().__new__(cls)
        obj.args = args
        obj.items = {}
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.items[len(self.items)] = value

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<{self.qualified_name}>"


@functools.lru_cache(maxsize=None)
def opaque(qualified_name: str) -> type[Opaque]:
    """The `Opaque` subclass standing in for the global `qualified_name`."""
    return type(qualified_name.rsplit(".", 1)[-1], (Opaque,), {"qualified_name": qualified_name})


_SCALARS = (bool, int, float, str, type(None))


class ModuleRecord:
    """A pickled module reduced to its tensors (`tensors`), submodules (`children`) and scalar attributes."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ModuleRecord:
        obj = super().__new__(cls)
        obj.class_name = ""
        obj.tensors = {}
        obj.children = {}
        obj.attributes = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0] or {}
        if not isinstance(state, Mapping):
            raise pickle.UnpicklingError(f"a module whose state is a {type(state).__name__}, not a dictionary")
        if "_parameters" in state:  # an nn.Module's __dict__
            entries = {**state.get("_parameters", {}), **state.get("_buffers", {}), **state.get("_modules", {})}
            entries.update((k, v) for k, v in state.items() if isinstance(v, _SCALARS))
        else:  # a TorchScript module: every attribute at the top level
            entries = dict(state)
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                self.tensors[name] = value
            elif isinstance(value, ModuleRecord):
                self.children[name] = value
            elif isinstance(value, _SCALARS):
                self.attributes[name] = value

    def flat_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every tensor in the tree, keyed by its dotted path."""
        out = {f"{prefix}{k}": v for k, v in self.tensors.items()}
        for name, child in self.children.items():
            out.update(child.flat_tensors(f"{prefix}{name}."))
        return out

    def walk(self, prefix: str = "") -> Iterator[tuple[str, ModuleRecord]]:
        """Yield `(dotted path, record)` for this record and every submodule."""
        yield prefix.rstrip("."), self
        for name, child in self.children.items():
            yield from child.walk(f"{prefix}{name}.")


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    # Storages arrive as flat 1-D tensors (see `_storage_from_bytes` and the zip readers).
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _rebuild_from_type(func: Callable, new_type: Any, args: tuple, state: Any) -> Any:
    return func(*args)


def _storage_from_bytes(data: bytes) -> torch.Tensor:
    """A storage pickled by `TypedStorage.__reduce__` (legacy `torch.save` bytes), read with `weights_only=True`."""
    storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(storage, torch.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor storage holding a {type(storage).__name__}")
    return torch.empty(0, dtype=storage.dtype).set_(storage)


def _identity(value: Any, *_: Any) -> Any:
    return value


_BASE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): opaque("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): opaque("torch.nn.parameter.Parameter"),
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
}


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that resolves only allowlisted globals; anything else raises `UnpicklingError`.

    `extra` adds `(module, name) -> object` entries; `module_prefixes` maps any global under those module prefixes
    to `ModuleRecord`; `storage` resolves persistent ids (zip archives keep tensor bytes outside the pickle).
    """

    def __init__(
        self,
        file: io.BufferedIOBase,
        *,
        extra: Mapping[tuple[str, str], Any] | None = None,
        module_prefixes: tuple[str, ...] = (),
        storage: Callable[[Any], Any] | None = None,
    ):
        super().__init__(file)
        self._globals = {**_BASE_GLOBALS, **(extra or {})}
        self._module_prefixes = module_prefixes
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module.startswith(self._module_prefixes):
            return ModuleRecord
        if module.split(".")[0] in CONFIG_MODULES:
            return opaque(f"{module}.{name}")
        raise pickle.UnpicklingError(f"the global {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._storage(pid)


# Legacy typed storage class names (`torch.FloatStorage`...) as TorchScript archives name them, with their dtypes.
STORAGE_DTYPES = {
    f"{prefix}Storage": dtype
    for prefix, dtype in {
        "Double": torch.float64, "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
        "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
        "Bool": torch.bool,
    }.items()
}


def torch_load(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)` on the CPU, with configuration objects named in the file as `Opaque`s."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(opaque(n), n) for n in names if n.split(".")[0] in CONFIG_MODULES]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)
