"""Options shared by the commands that load the three stages (edit, export, train, serve, eval-world), which give
them as one `ffclip.stages.StageSources`, and the --align option of the commands that read photos."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from ..backends import BACKENDS
from ..config import DEFAULT_PRESET, PRESETS
from ..errors import InputError
from ..stages import StageSources


def _file(help_text: str) -> Callable:
    return click.option(
        help_text.split()[0],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help=" ".join(help_text.split()[1:]),
    )


def _pin(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--expect-sha256, checked to be a sha256 in hex (either case) before anything is opened."""
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
        raise InputError(f"--expect-sha256 {value!r}: not a sha256 (64 hexadecimal digits); give the manifest sha256 "
                         "that ffclip-export printed for the folder")
    return value


def expect_sha256_option(command: Callable) -> Callable:
    """Add --expect-sha256, the pin of --artifacts (passed as `expect_sha256`, None when not given)."""
    return click.option(
        "--expect-sha256", "expect_sha256", default=None, callback=_pin, metavar="SHA256",
        help="Pin --artifacts: the sha256 of its manifest.json, as ffclip-export printed it; any other folder is "
        "refused. Without it, --backend auto opens only formats that are data, and torchscript or tensorrt, which "
        "run code from the folder, warn.",
    )(command)


def artifact_options(artifacts_help: str) -> Callable[[Callable], Callable]:
    """Add --artifacts (an ffclip-export folder, described by `artifacts_help`), --expect-sha256 and --backend to a
    command."""

    def add(command: Callable) -> Callable:
        @functools.wraps(command)
        def pinned_only_with_artifacts(**kwargs):
            if kwargs["expect_sha256"] is not None and kwargs["artifacts"] is None:
                raise InputError("--expect-sha256 pins the --artifacts folder; give --artifacts, or leave it out")
            return command(**kwargs)

        wrapped = click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
                               help="Backend for --artifacts.")(pinned_only_with_artifacts)
        wrapped = expect_sha256_option(wrapped)
        return click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                            help=artifacts_help)(wrapped)

    return add


def align_option(command: Callable) -> Callable:
    """Add --align LANDMARK_MODEL (a path, checked when it is opened so that every problem is one line)."""
    return click.option(
        "--align",
        type=click.Path(path_type=Path),
        default=None,
        metavar="LANDMARK_MODEL",
        help="Align each photo's face the way FFHQ was aligned, with this landmark model: a dlib "
        "shape_predictor_68_face_landmarks.dat (pip install 'ffclip[align-dlib]') or a MediaPipe "
        "face_landmarker.task (pip install 'ffclip[align-mediapipe]'). Without it the photos must be aligned already.",
    )(command)


def open_aligner(model: Path | None):
    """The `FaceAligner` for --align `model` (None without it); it says on stderr when a photo holds several faces."""
    if model is None:
        return None
    from ..align import FaceAligner, open_landmarks

    return FaceAligner(open_landmarks(model), note=lambda message: click.echo(f"note: {message}", err=True))


def stage_options(command: Callable) -> Callable:
    """Add --generator/--mapper/--clip/--clip-model/--preset and pass them as one `sources: StageSources`."""
    options = [
        _file("--generator StyleGAN2 checkpoint: rosinality .pt, NVIDIA .pkl, FFCLIP release or ffclip bundle."),
        _file("--mapper FFCLIP mapper checkpoint: the released layout or an ffclip bundle."),
        _file("--clip CLIP weights: open_clip .bin/.safetensors, OpenAI ViT-B-32.pt, or an ffclip bundle."),
        click.option("--clip-model", default=None, help="open_clip architecture of --clip (default ViT-B-32)."),
        click.option(
            "--preset",
            type=click.Choice(sorted(PRESETS)),
            default=DEFAULT_PRESET,
            show_default=True,
            help="Configuration used for any stage whose file is not given (its trained weights, or seeded random "
            "weights for a preset without any).",
        ),
    ]

    @functools.wraps(command)
    def wrapper(generator, mapper, clip, clip_model, preset, **kwargs):
        given = preset_given()
        return command(sources=StageSources(generator, mapper, clip, clip_model, preset, given), **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def preset_given() -> bool:
    """Whether the running command's --preset was given rather than left at its default."""
    source = click.get_current_context().get_parameter_source("preset")
    return source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
