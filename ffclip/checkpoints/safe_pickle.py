"""Reading pickles without running anything they name.

`RestrictedUnpickler` resolves only an allowlist of globals: the torch tensor rebuild functions (replaced by local
equivalents), `collections.OrderedDict`, a few builtins and torch dtypes. Callers add what their format needs
(NVIDIA's persistence hook, TorchScript's module classes). Modules pickled with their state come back as
`ModuleRecord`s that hold only tensors, submodules and plain scalar attributes. Configuration objects that some
checkpoints carry (argparse, OmegaConf, dnnlib, numpy scalars) become inert `Opaque` stand-ins.

`torch.save` files of both layouts (the zip archive and the legacy stream of pickles) and TorchScript archives are
read here with that unpickler. Tensor bytes are read only after their size is checked against what the file holds:
a zip entry must hold exactly the bytes its tensor needs and may not inflate past `INFLATE_FLOOR` or `INFLATE_RATIO`
times its stored size; the storages of a legacy file may not add up to more than the file.
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import re
import struct
import zipfile
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
    """A storage pickled by `TypedStorage.__reduce__` (legacy `torch.save` bytes), as a flat tensor."""
    storage = _load_legacy(io.BytesIO(data), len(data), {}, ())
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise pickle.UnpicklingError(f"a tensor storage holding a {type(storage).__name__}")
    return storage


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


# A compressed zip entry may inflate to at most this many bytes, or `INFLATE_RATIO` times its stored size if more;
# torch.save stores entries uncompressed, and weights deflate by a few percent.
INFLATE_FLOOR = 16 * 2**20
INFLATE_RATIO = 16
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def load_torch_file(
    path: str | os.PathLike, *, extra: Mapping[tuple[str, str], Any] | None = None, module_prefixes: tuple[str, ...] = ()
) -> Any:
    """The object in a `torch.save` file (zip or legacy) or in a TorchScript archive's `data.pkl`, on the CPU,
    rebuilt by `RestrictedUnpickler`. Refused or damaged files raise (`UnpicklingError`, `BadZipFile`, ...)."""
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            f.seek(0)
            return _load_zip(f, extra or {}, module_prefixes)
        f.seek(0)
        return _load_legacy(f, os.fstat(f.fileno()).st_size, extra or {}, module_prefixes)


def _tensor_spec(pid: Any) -> tuple[torch.dtype, str, int]:
    """`(dtype, key, numel)` of a storage persistent id `('storage', dtype, key, location, numel, ...)`."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:60]}")
    _, dtype, key, _, numel = pid[:5]
    if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
        raise pickle.UnpicklingError(f"a tensor storage of {str(numel)[:20]} {dtype!r} elements")
    return dtype, str(key), numel


def _read_entry(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The bytes of one entry, after checking that it inflates to no more than the archive allows."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(INFLATE_FLOOR, INFLATE_RATIO * info.compress_size):
        raise pickle.UnpicklingError(
            f"entry {info.filename} inflates to {info.file_size} bytes from {info.compress_size}, past the limit"
        )
    with z.open(info) as f:
        data = f.read(info.file_size)
    if len(data) != info.file_size:
        raise pickle.UnpicklingError(f"entry {info.filename} is truncated")
    return data


def _swapped(flat: torch.Tensor, big_endian: bool) -> torch.Tensor:
    if not big_endian or flat.element_size() == 1:
        return flat
    return flat.view(torch.uint8).view(-1, flat.element_size()).flip(1).contiguous().view(flat.dtype).view(-1)


def _load_zip(file: io.BufferedIOBase, extra: Mapping, module_prefixes: tuple[str, ...]) -> Any:
    with zipfile.ZipFile(file) as z:
        infos = {info.filename: info for info in z.infolist()}
        data_pkl = next((n for n in infos if re.fullmatch(r"[^/]+/data\.pkl", n)), None)
        if data_pkl is None:
            raise pickle.UnpicklingError("a zip archive without data.pkl")
        root = data_pkl.split("/")[0]
        order = infos.get(f"{root}/byteorder")
        big_endian = order is not None and _read_entry(z, order).strip() == b"big"
        storages: dict[str, torch.Tensor] = {}

        def storage(pid: Any) -> torch.Tensor:
            dtype, key, numel = _tensor_spec(pid)
            if key not in storages:
                info = infos.get(f"{root}/data/{key}")
                if info is None:
                    raise pickle.UnpicklingError(f"the tensor data entry data/{key} is missing")
                need = numel * dtype.itemsize
                if info.file_size != need:
                    relation = "more" if info.file_size > need else "less"
                    raise pickle.UnpicklingError(
                        f"entry {info.filename} holds {info.file_size} bytes, {relation} than its tensor needs ({need})"
                    )
                flat = torch.frombuffer(bytearray(_read_entry(z, info)), dtype=dtype) if need else torch.empty(0, dtype=dtype)
                storages[key] = _swapped(flat, big_endian)
            return storages[key]

        pickled = io.BytesIO(_read_entry(z, infos[data_pkl]))
        return RestrictedUnpickler(pickled, extra=extra, module_prefixes=module_prefixes, storage=storage).load()


def _load_legacy(file: io.BufferedIOBase, size: int, extra: Mapping, module_prefixes: tuple[str, ...]) -> Any:
    """The legacy layout: pickles of the magic number, the protocol and system info, the object (storages by
    persistent id), the list of storage keys, then each storage as an int64 element count and its bytes."""
    if RestrictedUnpickler(file).load() != _LEGACY_MAGIC or RestrictedUnpickler(file).load() != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("not a legacy torch.save stream")
    info = RestrictedUnpickler(file).load()
    big_endian = isinstance(info, Mapping) and info.get("little_endian") is False
    storages: dict[str, torch.Tensor] = {}
    declared = 0

    def storage(pid: Any) -> torch.Tensor:
        nonlocal declared
        dtype, key, numel = _tensor_spec(pid)
        if key not in storages:
            declared += numel * dtype.itemsize
            if declared > size:
                raise pickle.UnpicklingError(f"tensor storages of {declared} bytes, more than the file holds ({size})")
            storages[key] = torch.empty(numel, dtype=dtype)
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # (view key, offset, size), in elements of the root storage
            return storages[key][view[1]:view[1] + view[2]]
        return storages[key]

    obj = RestrictedUnpickler(file, extra=extra, module_prefixes=module_prefixes, storage=storage).load()
    keys = RestrictedUnpickler(file).load()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
        raise pickle.UnpicklingError("the storage list does not match the storages the object uses")
    for key in map(str, keys):
        flat = storages[key]
        head = file.read(8)
        if len(head) != 8:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
        (count,) = struct.unpack(">q" if big_endian else "<q", head)
        if count != flat.numel():
            raise pickle.UnpicklingError(f"storage {key} holds {count} elements where {flat.numel()} were declared")
        raw = flat.view(torch.uint8).numpy()
        if file.readinto(memoryview(raw)) != raw.size:
            raise pickle.UnpicklingError(f"storage {key} is truncated")
        if big_endian:
            flat.copy_(_swapped(flat, big_endian))
    return obj
