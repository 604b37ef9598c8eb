"""`ffclip-export` / `ffclip export`: write ONNX, TorchScript, TensorRT and OpenVINO artifacts with their manifest,
for the three stages of an edit and optionally the photo encoder."""

from __future__ import annotations

from pathlib import Path

import click

from ..backends import EAGER_ARTIFACT, EXPORT_PRECISIONS, FORMATS, REGISTRY, compute_precision, precision_refusal
from ..export.options import ExportOptions
from .options import StageSources, stage_options

_DEFAULTS = ExportOptions()


@click.command()
@stage_options
@click.option("--precision", type=click.Choice(list(EXPORT_PRECISIONS)), default="fp32", show_default=True,
              help="TensorRT build precision (and TorchScript compute precision on CUDA); bf16 where TensorRT allows. "
                   "int8: OpenVINO quantizes the text encoder and generator, calibrated on the preset's prompts and "
                   "latents; the other formats are skipped (the ONNX file stays float32).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact folder (default artifacts/export/<preset>); replaced atomically, and only when it is an "
                   "artifact folder (see --force).")
@click.option("--force", is_flag=True, help="Replace --out even when it holds other files than an artifact folder's.")
@click.option("--formats", default=",".join(FORMATS), show_default=True,
              help="Comma-separated formats; tensorrt and openvino are built from the ONNX file, which is built "
                   "with them. Those this machine cannot build are reported as skipped; a request of which none can "
                   "be built is refused.")
@click.option("--min-batch", type=int, default=_DEFAULTS.min_batch, show_default=True)
@click.option("--opt-batch", type=int, default=_DEFAULTS.opt_batch, show_default=True)
@click.option("--max-batch", type=int, default=_DEFAULTS.max_batch, show_default=True)
@click.option("--opset", type=int, default=_DEFAULTS.opset, show_default=True, help="ONNX opset.")
@click.option("--device", default="auto", show_default=True, help="Export device: cpu, cuda, cuda:N or auto.")
@click.option("--encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="e4e checkpoint (e4e_ffhq_encode.pt) to add as a fourth stage, the photo encoder, so the folder "
                   "also inverts photos (Runtime.invert, ffclip edit --image --artifacts).")
def export(sources: StageSources, precision: str, out: Path | None, force: bool, formats: str, min_batch: int,
           opt_batch: int, max_batch: int, opset: int, device: str, encoder: Path | None) -> None:
    """Export the stages to an artifact folder and check each file against its referee (eager PyTorch, or float64
    for the mapper and the encoder)."""
    from rich.console import Console
    from rich.table import Table

    from ..config import get_preset
    from ..factory import default_source
    from ..devices import resolve_device
    from ..export.exporter import ExportFailed, export_artifacts
    from ..artifacts import sha256

    console = Console(stderr=True)
    options = ExportOptions(
        precision=precision,
        formats=tuple(f.strip() for f in formats.split(",") if f.strip()),
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        opset=opset,
        device=resolve_device(device),
    )
    out = out or Path("artifacts") / "export" / sources.preset
    preset = get_preset(sources.preset)
    files = {"text_encoder": sources.clip, "mapper": sources.mapper, "generator": sources.generator}
    described = {
        stage: {"path": str(path), "sha256": sha256(path)} if path is not None
        else default_source(preset, stage)
        for stage, path in files.items()
    }
    if precision != "fp32":
        console.print(f"note: {_precision_note(options)}")
    photo_encoder = None
    if encoder is not None:
        from ..checkpoints import load_encoder

        console.print(f"loading the photo encoder {encoder}")
        photo_encoder = load_encoder(encoder)
        described["encoder"] = {"path": str(encoder), "sha256": sha256(encoder)}

    def load_stages():
        console.print(f"loading the stages (preset {sources.preset})")
        return sources.load("cpu")

    try:
        report = export_artifacts(load_stages, out, options, preset=sources.preset, sources=described,
                                  progress=lambda message: console.print(f"  {message}"), force=force,
                                  encoder=photo_encoder, encoder_name=f"--encoder {encoder}")
    except ExportFailed as exc:
        _summary(console, Table, exc.report.outcomes)
        raise
    _summary(console, Table, report.outcomes)
    click.echo(f"wrote {out}")
    click.echo(f"manifest sha256 {report.manifest_sha256} (pin the folder with Runtime.load(..., "
               "expected_sha256=...))")


def _precision_note(options: ExportOptions) -> str:
    """What the text encoder and generator compute in, per backend whose files this export builds, from the policy."""
    built = []
    for record in REGISTRY:
        device = record.check_device(options.device)
        if record.artifact not in (*options.built_formats, EAGER_ARTIFACT) or precision_refusal(
                record.name, options.precision, device):
            continue
        held = [compute_precision(stage, record.name, options.precision, device) for stage in ("text_encoder", "generator")]
        built.append(f"{record.name} {held[0]}/{held[1]}")
    return (f"at --precision {options.precision}, text encoder/generator compute in: {', '.join(built)}; the mapper "
            "computes in fp32 everywhere; manifest.json records each stage's compute precision per format")


def _summary(console, table_cls, outcomes) -> None:
    table = table_cls(title="export")
    for column in ("stage", "format", "result", "seconds", "detail"):
        table.add_column(column)
    for o in outcomes:
        table.add_row(o.stage, o.format, o.status, f"{o.seconds:.1f}" if o.seconds else "", o.detail)
    console.print(table)
