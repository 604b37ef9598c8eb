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

from ffclip.artifacts import MANIFEST, PHOTO_SIZE, model_facts, read_manifest, sha256, write_manifest
from ffclip.atomic import atomic_dir
from ffclip.backends import (EAGER_ARTIFACT, FORMATS, Backend, by_artifact, compute_precision, needed_artifacts,
                             precision_refusal)
from ffclip.checkpoints.bundle import save_module
from ffclip.engines import engine_class
from ffclip.errors import FfclipError, InputError, summarize
from ffclip.outputs import check_output_folder

from ffclip.export.options import ExportOptions
from ffclip.export.parity import Parity, check_parity, float64_referee
from ffclip.export.stages import FLOAT64_REFEREE, StageSpec, stage_specs
from ffclip.export.tensorrt_build import TIMING_CACHE


# (text encoder, mapper, generator)
StageModules = tuple[nn.Module, nn.Module, nn.Module]


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
    modules: StageModules | Callable[[], StageModules],
    out: str | Path,
    options: ExportOptions,
    *,
    preset: str,
    sources: dict[str, dict[str, Any]],
    progress: Callable[[str], None] = lambda message: None,
    force: bool = False,
    encoder: nn.Module | None = None,
    encoder_name: str = "the encoder",
) -> ExportReport:
    """Export (text encoder, mapper, generator) into `out`, and the photo `encoder` (named `encoder_name` in errors)
    as a fourth stage when given. `modules` may be a function that loads them, called once `out` and the options have
    passed their checks, so a refusal costs no loading. The folder appears complete or not at all; a failure raises
    `ExportFailed` after every stage and format was tried, so the report lists all problems. An existing `out` is
    replaced only when it is an artifact folder, or with `force` (`check_replaceable`)."""
    out = Path(out)
    check_replaceable(out, force)
    check_buildable(options)
    if callable(modules):
        modules = modules()
    specs = stage_specs(*modules, encoder, options.photo_size, encoder_name)
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
        EAGER_ARTIFACT: compute_precision(spec.name, by_artifact(EAGER_ARTIFACT).name, options.precision, options.device)}}
    progress(f"{spec.name}: saving eager weights")
    entry["files"][EAGER_ARTIFACT] = f"{spec.name}.safetensors"
    save_module(folder / entry["files"][EAGER_ARTIFACT], module)

    def reference(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {spec.output_names[0]: module(*(inputs[n] for n in spec.input_names))}

    floor = functools.cache(lambda: float64_referee(module))

    def reference64(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {spec.output_names[0]: floor()(*(inputs[n] for n in spec.input_names))}

    for fmt in FORMATS:
        record = by_artifact(fmt)
        reason = _skip_reason(record, entry, options)
        if reason is not None:
            report.outcomes.append(Outcome(spec.name, fmt, "skipped", reason))
            entry["status"][fmt] = f"skipped: {reason}"
            continue
        needed_by = [f for f in options.formats if f != fmt and fmt in needed_artifacts(f)]
        progress(f"{spec.name}: building {fmt}" + (f" ({', '.join(needed_by)} builds from it)" if needed_by else ""))
        start = time.perf_counter()
        device = record.check_device(options.device)
        precision = compute_precision(spec.name, record.name, options.precision, device)
        try:
            with _exact_cuda_math():
                record.build_module().build(spec, module, folder, options, entry)
                parity = _parity(spec, folder, options, entry, record, device, precision, (reference, reference64))
        except Exception as exc:
            report.outcomes.append(Outcome(spec.name, fmt, "failed", summarize(exc), time.perf_counter() - start))
            entry["files"].pop(fmt, None)
            continue
        seconds = time.perf_counter() - start
        entry["parity"][fmt] = parity.to_dict()
        if parity.ok:
            report.outcomes.append(Outcome(spec.name, fmt, "built", parity.describe(), seconds))
            entry["status"][fmt] = "built"
            entry["compute_precision"][fmt] = precision
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
    """Why this machine cannot build `fmt` for the options, or None when it can."""
    record = by_artifact(fmt)
    refusal = precision_refusal(record.name, options.precision, record.check_device(options.device))
    return refusal or record.build_module().skip_reason(options)


def _skip_reason(record: Backend, entry: dict[str, Any], options: ExportOptions) -> str | None:
    fmt = record.artifact
    if fmt not in options.built_formats:
        return "not requested (--formats)"
    if record.built_from is not None and record.built_from not in entry["files"]:
        return f"{fmt} is built from the {record.built_from} file, which was not built"
    return _machine_reason(fmt, options)


def _parity(spec: StageSpec, folder: Path, options: ExportOptions, entry: dict[str, Any], record: Backend,
            device: torch.device, precision: str, references: tuple[Callable, Callable]) -> Parity:
    """Run the artifact through its engine on `device` and compare with the stage's referee on the CPU (eager fp32 or
    float64), at the tolerance of the precision it computes in."""
    info = spec.info(entry["files"], options.batch, options.precision, entry)
    engine = engine_class(record.name)(folder, info, device)
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
