"""Where the three stages come from, and the one way to open them.

`StageSources` names a file per stage, or none for its preset's default: the trained weights the preset ships, or
seeded random ones for a preset without any. `open_stages` opens the sources, or an artifact folder exported from
them, as one `Runtime`, after checking that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import DEFAULT_PRESET, get_preset
from .errors import InputError

if TYPE_CHECKING:  # the runtime imports torch's compiler, and with it Triton: imported only to open stages
    from .models import Generator, Mapper, TextEncoder
    from .runtime import Runtime


@dataclass(frozen=True)
class StageSources:
    """Where each stage's weights come from: a file, or None for the preset's default (its trained weights, or
    seeded random ones for a preset that ships none)."""

    generator: Path | None = None
    mapper: Path | None = None
    clip: Path | None = None
    clip_model: str | None = None
    preset: str = DEFAULT_PRESET
    preset_given: bool = False  # the preset was chosen rather than left at its default

    @property
    def is_seeded_random(self) -> bool:
        """No file given and the preset ships no trained weights: every stage is seeded random."""
        return self.is_embedded_default and not get_preset(self.preset).weights

    @property
    def is_embedded_default(self) -> bool:
        """No stage has a file of its own: all three are the preset's."""
        return self.generator is None and self.mapper is None and self.clip is None

    def load_text_encoder(self, device: str | torch.device = "cpu", vision: bool = False) -> TextEncoder:
        """The text encoder (with CLIP's image tower when `vision`)."""
        from .checkpoints import load_text_encoder

        return load_text_encoder(self.clip, self.clip_model, preset=self.preset, vision=vision, device=device)

    def load_mapper(self, device: str | torch.device = "cpu") -> Mapper:
        """The mapper."""
        from .checkpoints import load_mapper

        return load_mapper(self.mapper, preset=self.preset, device=device)

    def load_generator(self, device: str | torch.device = "cpu") -> Generator:
        """The generator."""
        from .checkpoints import load_generator

        return load_generator(self.generator, preset=self.preset, device=device)

    def load(self, device: str | torch.device = "cpu") -> tuple[TextEncoder, Mapper, Generator]:
        """Load (text encoder, mapper, generator)."""
        return self.load_text_encoder(device), self.load_mapper(device), self.load_generator(device)


def folder_preset(folder: Path, preset: str, given: bool, expected_sha256: str | None = None) -> str:
    """The preset an artifact folder was exported from; a --preset `given` that says otherwise is refused, and so is
    a folder whose manifest is not the one `expected_sha256` pins."""
    from .artifacts import read_manifest

    exported = read_manifest(folder, verify=False, expected_sha256=expected_sha256).get("preset")
    if given and exported != preset:
        raise InputError(f"--preset {preset} contradicts --artifacts {folder}, which was exported from preset "
                         f"{exported}; leave --preset out (the folder decides) or export that preset")
    return str(exported)


def check_sources(sources: StageSources, artifacts: Path | None, expect_sha256: str | None = None) -> None:
    """Refuse an artifact folder together with stage files, or with a chosen preset it was not exported from (or
    whose manifest is not the one `expect_sha256` pins)."""
    if artifacts is None:
        return
    if not sources.is_embedded_default:
        raise InputError("--generator/--mapper/--clip do not apply with --artifacts: the folder holds its own weights; "
                         "re-export it with ffclip-export to serve other checkpoints")
    folder_preset(artifacts, sources.preset, sources.preset_given, expect_sha256)


def load_modules(sources: StageSources, device: str | torch.device = "cpu", artifacts: Path | None = None,
                 expect_sha256: str | None = None) -> tuple[TextEncoder, Mapper, Generator]:
    """(text encoder, mapper, generator) on `device`: the eager weights of `artifacts` (pinned by `expect_sha256`)
    when a folder is given, each checked against its manifest, else those of `sources`."""
    check_sources(sources, artifacts, expect_sha256)
    if artifacts is None:
        return sources.load(device)
    from .artifacts import STAGES, StageInfo, read_manifest
    from .checkpoints.bundle import load_module

    manifest = read_manifest(artifacts, verify=False, expected_sha256=expect_sha256)
    modules = []
    for name in STAGES:
        with StageInfo.from_manifest(manifest, name).checked_file(artifacts, "eager") as path:
            modules.append(load_module(path).to(device))
    text_encoder, mapper, generator = modules
    return text_encoder, mapper, generator


def open_stages(sources: StageSources, device: str | torch.device = "cpu", artifacts: Path | None = None,
                backend: str = "auto", expect_sha256: str | None = None, cache_size: int = 1024,
                note: Callable[[str], None] | None = None) -> Runtime:
    """The stages to run: an `EditPipeline` on the modules of `sources`, or `Runtime.load` on `artifacts` with
    `backend` (pinned by `expect_sha256`, the sha256 of its manifest, when given). `cache_size` prompts keep their
    embedding. `note` hears what the user should know: weights that are seeded random, or the backend chosen."""
    from .devices import resolve_device

    dev = resolve_device(device)
    say = note or (lambda message: None)
    if artifacts is None:
        from .pipeline import EditPipeline

        pipeline = EditPipeline(*sources.load(dev), device=dev, cache_size=cache_size)
        if sources.is_seeded_random:
            say(f"note: using the '{sources.preset}' preset; its weights are seeded random, not trained, so the "
                "pictures are not faces and the edits are not meaningful. Pass --generator/--mapper/--clip for real "
                "weights.")
        return pipeline
    from .runtime import Runtime

    check_sources(sources, artifacts, expect_sha256)
    runtime = Runtime.load(artifacts, backend=backend, device=dev, expected_sha256=expect_sha256,
                           cache_size=cache_size)
    say(f"serving from {artifacts} with the {runtime.backend} backend")
    return runtime


def serves_world_text_encoder(sources: StageSources, artifacts: Path | None = None) -> bool:
    """Whether the text encoder opened is the world's, trained on a known vocabulary (so the words of a prompt it
    never saw can be named); other text encoders have no such list."""
    from .world.vocabulary import folder_has_world_text_encoder, is_world_text_encoder

    if artifacts is not None:
        return folder_has_world_text_encoder(artifacts)
    return is_world_text_encoder(sources.preset, sources.clip)
