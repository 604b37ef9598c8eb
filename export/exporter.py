"""The export of the three stages of an edit, and optionally the photo encoder, into one artifact folder, written
atomically with its manifest."""

from __future__ import annotations

import contextlib
import copy
import functools
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffclip.artifacts import (
    MANIFEST,
    PHOTO_SIZE,
    PRECISIONS,
    compute_precision,
    model_facts,
    read_manifest,
    sha256,
    write_manifest,
)
from ffclip.atomic import atomic_dir
from ffclip.checkpoints.bundle import save_module
from ffclip.engines import engine_class
from ffclip.engines.tensorrt import bf16_supported, tensorrt_reason
from ffclip.errors import FfclipError, InputError, summarize
from ffclip.outputs import check_output_folder

from ffclip.export.onnx_export import DEFAULT_OPSET, export_onnx
from ffclip.export.openvino_export import export_openvino, openvino_skip_reason
from ffclip.export.parity import Parity, check_parity, float64_referee
from ffclip.export.stages import FLOAT64_REFEREE, StageSpec, format_precision, stage_specs
from ffclip.export.tensorrt_build import TIMING_CACHE, build_engine, export_precision_onnx
from ffclip.export.torchscript_export import export_torchscript

FORMATS = ("onnx", "torchscript", "tensorrt", "openvino")
# formats built from another format's file: asking for one builds that one too
BUILT_FROM = {"tensorrt": "onnx", "openvino": "onnx"}


@dataclass(frozen=True)
class ExportOptions:
    """What to build and for which batch range."""

    precision: str = "fp32"
    formats: tuple[str, ...] = FORMATS
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 16
    opset: int = DEFAULT_OPSET
    device: torch.device = torch.device("cpu")
    # the encoder stage's input size; the released e4e encoder reads 256 px (smaller sizes keep tests quick)
    photo_size: int = PHOTO_SIZE

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; use {', '.join(PRECISIONS)}")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown or not self.formats:
            raise InputError(f"unknown formats {unknown or '(none given)'}; choose from {', '.join(FORMATS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(
                f"batch range must satisfy 1 <= min <= opt <= max, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        if self.photo_size < 16 or self.photo_size & (self.photo_size - 1):
            raise InputError(f"photo size {self.photo_size}: the encoder reads square photos of a power of two pixels, "
                             f"at least 16 ({PHOTO_SIZE} for the released e4e encoder)")

    @property
    def built_formats(self) -> tuple[str, ...]:
        """The requested formats and those they are built from, in `FORMATS` order."""
        wanted = {*self.formats, *(BUILT_FROM[f] for f in self.formats if f in BUILT_FROM)}
        return tuple(f for f in FORMATS if f in wanted)

    @property
    def batch(self) -> tuple[int, int, int]:
        return self.min_batch, self.opt_batch, self.max_batch

    @property
    def parity_batches(self) -> tuple[int, ...]:
        """Two batch sizes in the range (one when the range is a single size)."""
        second = self.opt_batch if self.opt_batch != self.min_batch else self.max_batch
        return tuple(sorted({self.min_batch, second}))


@dataclass(frozen=True)
class Outcome:
    """What happened to one stage in one format."""

    stage: str
    format: str
    status: str  # "built", "skipped" or "failed"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class ExportReport:
    """Every outcome of an export; `manifest` is set once the folder is complete."""

    folder: Path
    outcomes: list[Outcome] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    # sha256 of manifest.json: what `Runtime.load(..., expected_sha256=...)` pins the folder to
    manifest_sha256: str | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class ExportFailed(FfclipError):
    """At least one stage failed to export or missed its parity tolerance; the report says which."""

    def __init__(self, report: ExportReport):
        self.report = report
        first = report.failed[0]
        super().__init__(
            f"export to {report.folder} failed ({len(report.failed)} failure(s); first: {first.stage} {first.format}: "
            f"{first.detail}); nothing was written and any older folder is unchanged"
        )


def check_replaceable(
    out: Path,
    force: bool,
    ours: Callable[[Path], bool] = lambda folder: (folder / MANIFEST).is_file(),
    what: str = f"an ffclip artifact folder (no {MANIFEST})",
) -> None:
    """Refuse, before any work, an `out` that is a file, lies in a folder that cannot be written, or is a folder of
    other files than one the command wrote (unless `force`): replacing it would delete them. `ours` recognises a
    folder the command wrote, by default an artifact folder; `what` names one in the message."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is not a folder; give the folder to write")
    check_output_folder(out.parent, "--out", out)
    if not force and out.is_dir() and not ours(out) and any(out.iterdir()):
        raise InputError(f"--out {out}: holds files and is not {what}; writing there would replace it: choose "
                         "another folder, or pass --force to replace it")


def export_artifacts(
    modules: tuple[nn.Module, nn.Module, nn.Module],
    out: str | Path,
    options: ExportOptions,
    *,
    preset: str,
    sources: dict[str, dict[str, Any]],
    progress: Callable[[str], None] = lambda message: None,
    force: bool = False,
    encoder: nn.Module | None = None,
) -> ExportReport:
    """Export (text encoder, mapper, generator) into `out`, and the photo `encoder` as a fourth stage when given.
    The folder appears complete or not at all; a failure raises `ExportFailed` after every stage and format was
    tried, so the report lists all problems. An existing `out` is replaced only when it is an artifact folder, or
    with `force` (`check_replaceable`)."""
    out = Path(out)
    check_replaceable(out, force)
    check_buildable(options)
    specs = stage_specs(*modules, encoder, options.photo_size)
    stage_modules = (*modules, encoder) if encoder is not None else modules
    by_name = dict(zip(specs, (copy.deepcopy(m).cpu().float().eval() for m in stage_modules)))
    report = ExportReport(out)
    with atomic_dir(out) as tmp:
        old_cache = out / TIMING_CACHE
        if old_cache.is_file():
            (tmp / TIMING_CACHE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(old_cache, tmp / TIMING_CACHE)
        stages = {}
        for name, spec in specs.items():
            stages[name] = _export_stage(spec, by_name[name], tmp, options, report, progress)
        if report.failed:
            raise ExportFailed(report)
        progress("writing manifest.json")
        write_manifest(tmp, _manifest(modules, options, preset, sources, stages, encoder is not None))
    report.manifest = read_manifest(out, verify=False)
    report.manifest_sha256 = sha256(out / MANIFEST)
    return report


def _export_stage(
    spec: StageSpec,
    module: nn.Module,
    folder: Path,
    options: ExportOptions,
    report: ExportReport,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    entry: dict[str, Any] = {**spec.manifest_entry(), "files": {}, "parity": {}, "status": {}, "compute_precision": {
        "eager": format_precision(spec.name, options.precision, "eager", options.device)}}
    progress(f"{spec.name}: saving eager weights")
    entry["files"]["eager"] = f"{spec.name}.safetensors"
    save_module(folder / entry["files"]["eager"], module)

    def reference(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {spec.output_names[0]: module(*(inputs[n] for n in spec.input_names))}

    floor = functools.cache(lambda: float64_referee(module))

    def reference64(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {spec.output_names[0]: floor()(*(inputs[n] for n in spec.input_names))}

    for fmt in FORMATS:
        reason = _skip_reason(fmt, entry, options)
        if reason is not None:
            report.outcomes.append(Outcome(spec.name, fmt, "skipped", reason))
            entry["status"][fmt] = f"skipped: {reason}"
            continue
        needed_by = [f for f in options.formats if BUILT_FROM.get(f) == fmt]
        progress(f"{spec.name}: building {fmt}" + (f" ({', '.join(needed_by)} builds from it)" if needed_by else ""))
        start = time.perf_counter()
        try:
            with _exact_cuda_math():
                parity = _BUILDERS[fmt](spec, module, folder, options, entry, (reference, reference64))
        except Exception as exc:
            report.outcomes.append(Outcome(spec.name, fmt, "failed", summarize(exc), time.perf_counter() - start))
            entry["files"].pop(fmt, None)
            continue
        seconds = time.perf_counter() - start
        entry["parity"][fmt] = parity.to_dict()
        if parity.ok:
            report.outcomes.append(Outcome(spec.name, fmt, "built", parity.describe(), seconds))
            entry["status"][fmt] = "built"
            entry["compute_precision"][fmt] = format_precision(spec.name, options.precision, fmt, options.device)
        else:
            report.outcomes.append(Outcome(spec.name, fmt, "failed", f"parity over tolerance: {parity.describe()}", seconds))
    return entry


def check_buildable(options: ExportOptions) -> None:
    """Refuse, before any work, a request of which this machine can build no format."""
    reasons = {f: _machine_reason(f, options) for f in options.formats}
    if all(reasons.values()):
        said = "; ".join(f"{f}: {r}" for f, r in reasons.items())
        raise InputError(f"--formats {','.join(options.formats)}: none of them can be built here ({said}); add a "
                         "format this machine builds, such as onnx or torchscript")


def _machine_reason(fmt: str, options: ExportOptions) -> str | None:
    """Why this machine cannot build `fmt` at the options' precision, or None when it can."""
    if fmt == "tensorrt":
        reason = tensorrt_reason(options.device)
        if reason is None and options.precision == "bf16" and not bf16_supported(options.device):
            reason = "this GPU has no bf16 support"
        return reason
    if fmt == "openvino":
        return openvino_skip_reason(options.precision)
    return None


def _skip_reason(fmt: str, entry: dict[str, Any], options: ExportOptions) -> str | None:
    if fmt not in options.built_formats:
        return "not requested (--formats)"
    source = BUILT_FROM.get(fmt)
    if source is not None and source not in entry["files"]:
        return f"{fmt} is built from the {source} file, which was not built"
    return _machine_reason(fmt, options)


def _build_onnx(spec, module, folder, options, entry, references) -> Parity:
    path = folder / "onnx" / f"{spec.name}.onnx"
    result = export_onnx(spec, module, path, options.opset)
    entry["files"]["onnx"] = path.relative_to(folder).as_posix()
    entry["onnx"] = {
        "opset": options.opset,
        "nodes_before_surgery": result.nodes_before,
        "nodes_after_surgery": result.nodes_after,
        "external_data": result.external_data,
    }
    # ONNX files are fp32 graphs (TensorRT applies the reduced precision), checked on ONNX Runtime's CPU provider
    return _parity(spec, folder, options, entry, "onnxruntime", torch.device("cpu"), "fp32", references)


def _build_torchscript(spec, module, folder, options, entry, references) -> Parity:
    path = folder / "torchscript" / f"{spec.name}.pt"
    precision = format_precision(spec.name, options.precision, "torchscript", options.device)
    dtype = PRECISIONS[precision]
    export_torchscript(spec, module, path, options.device, dtype)
    entry["files"]["torchscript"] = path.relative_to(folder).as_posix()
    entry["torchscript"] = {"device": options.device.type, "compute_dtype": str(dtype).removeprefix("torch.")}
    return _parity(spec, folder, options, entry, "torchscript", options.device, precision, references)


def _build_tensorrt(spec, module, folder, options, entry, references) -> Parity:
    plan = folder / "tensorrt" / f"{spec.name}.plan"
    graph = export_precision_onnx(spec, module, folder, options.precision, options.opset)
    facts = build_engine(
        spec,
        graph,
        plan,
        folder / "tensorrt" / f"{spec.name}.build.log",
        folder / TIMING_CACHE,
        options.precision,
        options.batch,
        options.device,
    )
    entry["files"]["tensorrt"] = plan.relative_to(folder).as_posix()
    entry["tensorrt"] = {**facts, "onnx": graph.relative_to(folder).as_posix(),
                         "build_log": f"tensorrt/{spec.name}.build.log", "timing_cache": TIMING_CACHE}
    return _parity(spec, folder, options, entry, "tensorrt", options.device, options.precision, references)


def _build_openvino(spec, module, folder, options, entry, references) -> Parity:
    xml = folder / "openvino" / f"{spec.name}.xml"
    facts = export_openvino(folder / entry["files"]["onnx"], xml, spec.name, options.precision)
    entry["files"]["openvino"] = xml.relative_to(folder).as_posix()
    entry["openvino"] = {**facts, "weights": xml.with_suffix(".bin").relative_to(folder).as_posix()}
    precision = compute_precision(spec.name, options.precision)
    return _parity(spec, folder, options, entry, "openvino", torch.device("cpu"), precision, references)


_BUILDERS = {
    "onnx": _build_onnx,
    "torchscript": _build_torchscript,
    "tensorrt": _build_tensorrt,
    "openvino": _build_openvino,
}


def _parity(spec, folder, options, entry, backend, device, precision, references) -> Parity:
    """Run the artifact through its engine and compare with the stage's referee on the CPU (eager fp32 or float64)."""
    info = spec.info(entry["files"], options.batch, options.precision, entry)
    engine = engine_class(backend)(folder, info, device)
    try:
        return check_parity(
            spec,
            references[1] if spec.referee == FLOAT64_REFEREE else references[0],
            lambda inputs: {k: v.cpu() for k, v in engine.run(inputs).items()},
            options.parity_batches,
            spec.tolerance(precision),
        )
    finally:
        engine.close()


@contextlib.contextmanager
def _exact_cuda_math() -> Iterator[None]:
    """Disable TF32 while tracing and checking, so fp32 parity measures the export and not TF32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _manifest(modules, options: ExportOptions, preset: str, sources, stages, with_encoder: bool) -> dict[str, Any]:
    import onnx
    import onnxruntime

    text_encoder, _, generator = modules
    try:
        trt_version = __import__("tensorrt").__version__
    except ImportError:
        trt_version = None
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": preset,
        "precision": options.precision,
        "export_device": str(options.device),
        "batch": {"min": options.min_batch, "opt": options.opt_batch, "max": options.max_batch},
        "model": model_facts(text_encoder, generator, options.photo_size if with_encoder else None),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "tensorrt": trt_version,
        },
        "sources": sources,
        "stages": stages,
    }
