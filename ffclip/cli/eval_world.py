"""`ffclip eval-world`: the shapes world's numbers, read from pixels by the judge, on a fixed seed."""

from __future__ import annotations

from pathlib import Path

import click

from .options import StageSources, artifact_options, stage_options


def report(preset: str = "world", num: int = 128, seed: int = 0, truncation: float = 1.0, stages=None) -> None:
    """Print valid originals, edit accuracy and preservation per attribute for seen and held-out phrasings."""
    from ..checkpoints import load_generator, load_mapper, load_text_encoder
    from ..errors import InputError
    from ..pipeline import EditPipeline
    from ..world.evaluate import evaluate
    from ..world.scenes import resolution

    if stages is None:
        stages = EditPipeline(load_text_encoder(preset=preset), load_mapper(preset=preset),
                              load_generator(preset=preset))
    if stages.resolution != resolution():
        raise InputError(f"the generator draws {stages.resolution}-pixel pictures, not the shapes world's "
                         f"{resolution()}; use the world preset or weights trained by `make world`")
    click.echo(f"judging {num} originals (seed {seed}, truncation {truncation}) and 8 edits of each", err=True)
    scores = evaluate(stages, num=num, seed=seed, truncation=truncation, on_progress=lambda m: click.echo(m, err=True))
    click.echo(scores.table())


@click.command("eval-world")
@stage_options
@click.option("--num", type=click.IntRange(1, 4096), default=128, show_default=True, help="Originals to judge.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the originals, targets and phrasings.")
@click.option("--truncation", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Truncation psi.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@artifact_options("Judge an ffclip-export folder instead of the checkpoints.")
def eval_world(sources: StageSources, num: int, seed: int, truncation: float, device: str, artifacts: Path | None,
               expect_sha256: str | None, backend: str) -> None:
    """Judge the shapes world: valid originals, and edits on seen and held-out phrasings."""
    from ..devices import resolve_device
    from .edit import _open_stages

    stages = _open_stages(sources, resolve_device(device), artifacts, backend, expect_sha256)
    report(sources.preset, num=num, seed=seed, truncation=truncation, stages=stages)
