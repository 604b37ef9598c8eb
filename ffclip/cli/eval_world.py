"""`ffclip eval-world`: the shapes world's numbers, read from pixels by the judge, on a fixed seed."""

from __future__ import annotations

from pathlib import Path

import click

from ..stages import StageSources
from .options import artifact_options, stage_options


def _say(message: str) -> None:
    click.echo(message, err=True)


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
    from ..stages import open_stages
    from ..world.evaluate import report

    stages = open_stages(sources, device, artifacts, backend, expect_sha256, note=_say)
    click.echo(report(stages, num=num, seed=seed, truncation=truncation, on_progress=_say))
