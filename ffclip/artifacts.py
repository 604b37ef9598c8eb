"""The artifact contract (DESIGN §1, §8): stage names and tensors, and `manifest.json`.

The exporter writes folders through this module; engines and `ffclip.runtime` read them through it. It imports
torch and the project's small leaf modules only, never models, the exporter or engines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch

from ffclip.atomic import atomic_file, recover_dir
from ffclip.backends import EXPORT_PRECISIONS
from ffclip.errors import FfclipError, InputError, summarize

if TYPE_CHECKING:
    from torch import nn

    from ffclip.models import Generator, Mapper, TextEncoder

STAGES = ("text_encoder", "mapper", "generator")
# Stages a folder may hold beside the three of every edit: the photo encoder that inverts photos to W+ (DESIGN §1).
OPTIONAL_STAGES = ("encoder",)
PHOTO_SIZE = 256  # the released e4e encoder's input, in pixels on a side
# tensor dtypes as the manifest names them
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}

MANIFEST = "manifest.json"
FORMAT = "ffclip-artifacts"
FORMAT_VERSION = 1


class ArtifactError(FfclipError):
    """An artifact folder that is missing, incomplete, changed since export or of an unknown format."""


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


def check_stages_fit(text_encoder: TextEncoder, mapper: Mapper, generator: Generator) -> None:
    """Raise `InputError` unless the mapper edits as many style layers as the generator has, and the text embedding,
    the mapper and the generator's styles have one width."""
    if mapper.num_ws != generator.num_ws:
        raise InputError(f"the mapper edits {mapper.num_ws} style layers but the generator has {generator.num_ws} "
                         f"({generator.resolution} px); use a mapper trained for this generator")
    if mapper.config.dim != generator.config.style_dim:
        raise InputError(f"the mapper is {mapper.config.dim} wide but the generator's styles are "
                         f"{generator.config.style_dim} wide; use a mapper trained for this generator")
    if text_encoder.embed_dim != mapper.config.dim:
        raise InputError(f"the text encoder gives {text_encoder.embed_dim}-wide embeddings but the mapper expects "
                         f"{mapper.config.dim}; use the CLIP model the mapper was trained with")


def check_encoder_fits(encoder: nn.Module, num_ws: int, dim: int, where: str = "the encoder") -> None:
    """Raise `InputError` unless the photo encoder (`where` names it) gives latents of `num_ws` style layers of
    width `dim`, the generator's, as its average latent `[L, D]` shows."""
    layers, width = encoder.latent_avg.shape
    if (layers, width) != (num_ws, dim):
        raise InputError(f"{where} gives latents [B, {layers}, {width}] but the generator takes [B, {num_ws}, {dim}]; "
                         "use the encoder trained for this generator (its resolution and style width)")


def model_facts(text_encoder: TextEncoder, generator: Generator, photo_size: int | None = None) -> dict[str, int]:
    """The sizes the manifest records under "model" (and `stage_tensors` reads); `photo_size`, the encoder stage's
    input size, only for a folder with that stage."""
    facts = {
        "num_ws": generator.num_ws,
        "resolution": generator.resolution,
        "embed_dim": text_encoder.embed_dim,
        "context_length": text_encoder.tokenizer.context_length,
    }
    return facts if photo_size is None else {**facts, "photo_size": photo_size}


def stage_tensors(model: dict[str, int]) -> dict[str, tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]]:
    """(inputs, outputs) of each stage (DESIGN §1) for the sizes of `model_facts`; the encoder's when the sizes
    include its `photo_size`."""
    num_ws, dim, res = model["num_ws"], model["embed_dim"], model["resolution"]

    def f32(name: str, *shape: int) -> TensorInfo:
        return TensorInfo(name, "float32", ("batch", *shape))

    tensors = {
        "text_encoder": ((TensorInfo("tokens", "int64", ("batch", model["context_length"])),), (f32("embedding", dim),)),
        "mapper": ((f32("w", num_ws, dim), f32("embedding", dim)), (f32("w_edit", num_ws, dim),)),
        "generator": ((f32("w", num_ws, dim),), (f32("image", 3, res, res),)),
    }
    if "photo_size" in model:
        size = model["photo_size"]
        tensors["encoder"] = ((f32("images", 3, size, size),), (f32("w", num_ws, dim),))
    return tensors


@dataclass(frozen=True)
class StageInfo:
    """What the manifest says about one stage: its tensors, its file per format and the batch range it was built for."""

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

    def file(self, folder: Path, fmt: str) -> Path:
        """The artifact of this stage in format `fmt`; `ArtifactError` when the export did not build it."""
        if fmt not in self.files:
            raise ArtifactError(
                f"{folder}: no {fmt} artifact for the {self.name} stage; re-export with --formats including {fmt}"
            )
        return folder / confined_name(folder, self.files[fmt], f"stage {self.name!r} ({fmt})")

    def read(self, folder: Path, fmt: str) -> bytes:
        """The bytes of the artifact in format `fmt`, read once and checked against the manifest's sha256."""
        self.file(folder, fmt)
        return self.read_listed(folder, self.files[fmt])

    def read_listed(self, folder: Path, name: str) -> bytes:
        """The checked bytes of `name`, a path relative to `folder` that the manifest lists (and so hashes)."""
        confined_name(folder, name, f"the {self.name} stage")
        if self.hashes is not None and name not in self.hashes:
            raise ArtifactError(f"{folder / name}: opened by the {self.name} stage but not listed (hashed) in "
                                f"{MANIFEST}; {_reexport(folder)}")
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
    def checked_file(self, folder: Path, fmt: str) -> Iterator[Path]:
        """The artifact in format `fmt` as a private copy of its checked bytes (see `private_copy`)."""
        self.file(folder, fmt)
        with self.private_copy(folder, [self.files[fmt]]) as tmp:
            yield tmp / self.files[fmt]


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of bytes in memory."""
    return hashlib.sha256(data).hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, keyed by POSIX relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Hash the folder's files into `manifest["files"]` and write `manifest.json` atomically."""
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": hash_folder(folder)}
    path = folder / MANIFEST
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _reexport(folder: Path) -> str:
    return f"re-export with ffclip-export --out {folder}"


def confined_name(folder: Path, name: object, where: str) -> str:
    """`name` as a POSIX path relative to `folder` that stays inside it (no absolute path, no `..`, no empty part);
    `ArtifactError` naming `where` otherwise."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or parts[0] == "/" or any(p in ("..", ".") for p in parts) or "\\" in name or name != "/".join(parts):
        raise ArtifactError(f"{folder / MANIFEST}: {where} names {name!r}, which is not a plain path inside the folder "
                            f"(outside it, absolute or not a string); {_reexport(folder)}")
    return name


def resolve_inside(folder: Path, name: str) -> Path:
    """The real path of `folder/name` once symlinks are resolved; `ArtifactError` when that leaves the folder."""
    real = (folder / name).resolve()
    if not real.is_relative_to(folder.resolve()):
        raise ArtifactError(f"{folder / name}: resolves to {real}, outside the artifact folder; {_reexport(folder)}")
    return real


def read_listed(folder: Path, name: str, digest: str | None) -> bytes:
    """The bytes of the listed file `name`, read once and checked against `digest` (None: a file this process has just
    written and not yet listed). Load from these bytes, never from the path again."""
    path = folder / name
    try:
        data = resolve_inside(folder, name).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: missing or unreadable ({summarize(exc)}); {_reexport(folder)}") from None
    if digest is not None and sha256_bytes(data) != digest:
        raise ArtifactError(f"{path}: changed since export (sha256 differs from {MANIFEST}); {_reexport(folder)}")
    return data


def read_manifest(folder: str | os.PathLike, verify: bool = True, expected_sha256: str | None = None) -> dict[str, Any]:
    """The folder's manifest, checked in form (every path inside the folder, every stage file listed and hashed).
    With `verify`, every listed file must exist with its recorded sha256; with `expected_sha256`, the manifest's own
    bytes must have that sha256 (a pinned folder)."""
    folder = Path(folder)
    recover_dir(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; {folder} is not an artifact folder (create one with ffclip-export)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: unreadable ({summarize(exc)}); {_reexport(folder)}") from None
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256.strip().lower():
        raise ArtifactError(f"{path}: sha256 {sha256_bytes(data)} is not the pinned {expected_sha256}; the folder is not "
                            "the one that was exported (or the pin is wrong)")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not UTF-8 text; {_reexport(folder)}") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not JSON ({summarize(exc)}); {_reexport(folder)}") from None
    except RecursionError:
        raise ArtifactError(f"{path}: JSON nested too deeply to read; {_reexport(folder)}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a JSON object but a {type(manifest).__name__}; {_reexport(folder)}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest; {_reexport(folder)}")
    _check_form(folder, manifest)
    if verify:
        verify_files(folder, manifest)
    return manifest


def _check_form(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose keys the runtime relies on are missing or of the wrong type, or whose paths leave the
    folder or name files that are not hashed."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ArtifactError(f"{folder / MANIFEST}: {what}; {_reexport(folder)}")

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    files = manifest.get("files")
    need(isinstance(files, dict), "'files' must be an object of path -> sha256")
    for name, digest in files.items():
        confined_name(folder, name, "'files'")
        need(isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
             f"'files' gives {name} no sha256")
    need(isinstance(manifest.get("model"), dict) and all(
        is_int(manifest["model"].get(k)) and manifest["model"][k] > 0
        for k in ("num_ws", "resolution", "embed_dim", "context_length")), "'model' needs positive integers num_ws, "
         "resolution, embed_dim and context_length")
    batch = manifest.get("batch")
    need(isinstance(batch, dict) and all(is_int(batch.get(k)) for k in ("min", "opt", "max"))
         and 1 <= batch["min"] <= batch["opt"] <= batch["max"], "'batch' needs integers 1 <= min <= opt <= max")
    need(isinstance(manifest.get("precision"), str), "'precision' must be a string")
    stages = manifest.get("stages")
    need(isinstance(stages, dict), "'stages' must be an object")
    need("encoder" not in stages or (is_int(manifest["model"].get("photo_size")) and manifest["model"]["photo_size"] > 0),
         "the encoder stage needs a positive integer 'model' photo_size")
    for stage, entry in stages.items():
        need(isinstance(entry, dict) and isinstance(entry.get("files"), dict), f"stage {stage!r} has no 'files' object")
        for fmt, name in entry["files"].items():
            confined_name(folder, name, f"stage {stage!r} ({fmt})")
            need(name in files, f"stage {stage!r} ({fmt}) names {name}, which is not listed (hashed) in 'files'")
        for key in ("inputs", "outputs"):
            tensors = entry.get(key)
            need(isinstance(tensors, list) and tensors and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
                and isinstance(t.get("shape"), list) and t["shape"][:1] == ["batch"]
                and all(is_int(d) and d > 0 for d in t["shape"][1:]) for t in tensors),
                 f"stage {stage!r} needs {key} with a name, a dtype and a shape ['batch', sizes...]")
            unknown = sorted({t["dtype"] for t in tensors if t["dtype"] not in DTYPES})
            need(not unknown, f"stage {stage!r} gives its {key} the dtype {', '.join(map(repr, unknown))}, which is "
                              f"none of {', '.join(DTYPES)}")
        _check_sections(stage, entry, need)
    missing = [s for s in STAGES if s not in stages]
    need(not missing, f"'stages' lacks {', '.join(missing)}")


def _check_sections(stage: str, entry: dict[str, Any], need: Callable[[bool, str], None]) -> None:
    """Refuse the per-format sections of a stage entry that engines read when they are not objects, a compute
    precision that is not one of `EXPORT_PRECISIONS`, or a TorchScript device that torch does not parse."""
    for key in ("compute_precision", *entry["files"]):
        need(isinstance(entry.get(key, {}), dict), f"stage {stage!r}: {key!r} must be an object")
    for fmt, precision in entry.get("compute_precision", {}).items():
        need(isinstance(precision, str) and precision in EXPORT_PRECISIONS,
             f"stage {stage!r} computes {fmt} in {precision!r}, which is none of {', '.join(EXPORT_PRECISIONS)}")
    if "torchscript" in entry["files"]:
        device = entry.get("torchscript", {}).get("device", "cpu")
        need(isinstance(device, str) and _parses_as_device(device),
             f"stage {stage!r}: the torchscript device {device!r} is not a device such as cpu or cuda")


def _parses_as_device(name: str) -> bool:
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


def verify_files(folder: Path, manifest: dict[str, Any], checked_when_read: Collection[str] = ()) -> None:
    """Refuse a folder where a listed file is missing, lies outside the folder or changed since export. Files in
    `checked_when_read` (those an engine is about to read, and check, from their bytes) are not hashed here."""
    for name, digest in manifest["files"].items():
        path = folder / name
        real = resolve_inside(folder, name)
        if not real.is_file():
            raise ArtifactError(f"{path}: missing from the artifact folder; {_reexport(folder)}")
        if name not in checked_when_read and sha256(real) != digest:
            raise ArtifactError(f"{path}: changed since export (sha256 differs from {MANIFEST}); {_reexport(folder)}")
