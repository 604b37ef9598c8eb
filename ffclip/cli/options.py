"""Options shared by the commands that load the three stages (edit, export, train, serve), the check of --preset
against the preset an artifact folder was exported from, and the --align option of the commands that read photos."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from ..artifacts import BACKENDS
from ..config import DEFAULT_PRESET, PRESETS, get_preset
from ..errors import InputError


@dataclass(frozen=True)
class StageSources:
    """Where each stage's weights come from; None means the preset's embedded seeded-random default."""

    generator: Path | None
    mapper: Path | None
    clip: Path | None
    clip_model: str | None
    preset: str
    preset_given: bool = False  # --preset was on the command line (not its default)

    @property
    def is_seeded_random(self) -> bool:
        """No file given and the preset ships no trained weights: every stage is seeded random."""
        return self.is_embedded_default and not get_preset(self.preset).weights

    @property
    def is_embedded_default(self) -> bool:
        return self.generator is None and self.mapper is None and self.clip is None

    def load(self, device: str = "cpu"):
        """Load (text encoder, mapper, generator)."""
        from ..checkpoints import load_generator, load_mapper, load_text_encoder

        text = load_text_encoder(self.clip, self.clip_model, preset=self.preset, device=device)
        mapper = load_mapper(self.mapper, preset=self.preset, device=device)
        generator = load_generator(self.generator, preset=self.preset, device=device)
        return text, mapper, generator


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


def folder_preset(folder: Path, preset: str, given: bool, expected_sha256: str | None = None) -> str:
    """The preset an artifact folder was exported from; a --preset `given` that says otherwise is refused, and so is
    a folder whose manifest is not the one `expected_sha256` pins."""
    from ..artifacts import read_manifest

    exported = read_manifest(folder, verify=False, expected_sha256=expected_sha256).get("preset")
    if given and exported != preset:
        raise InputError(f"--preset {preset} contradicts --artifacts {folder}, which was exported from preset "
                         f"{exported}; leave --preset out (the folder decides) or export that preset")
    return str(exported)
