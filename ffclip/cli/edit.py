"""`ffclip edit`: originals and their edits for several prompts, in one PNG grid."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ..outputs import check_output_file
from ..stages import StageSources
from .options import align_option, artifact_options, open_aligner, stage_options


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@stage_options
@click.option("--prompt", "prompts", multiple=True, required=True, help="Edit description; repeat for several.")
@click.option(
    "--latents",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="w+ latents to edit (.npy or .pt, [B,L,D] or [B,D]: the generator's style layers and width, [B,10,128] "
         "for the world); default: sample with --seed/--num.",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Face photo to edit (repeat for several), aligned as FFHQ was unless --align is given; inverted with "
    "--encoder, or with the encoder stage of --artifacts.",
)
@align_option
@click.option(
    "--encoder",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="e4e checkpoint (e4e_ffhq_encode.pt) that inverts the --image photos (default with --artifacts: the "
    "folder's encoder stage).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling latents.")
@click.option("--num", type=click.IntRange(1, 64), default=4, show_default=True, help="How many latents to sample.")
@click.option("--truncation", type=click.FloatRange(0, 1), default=0.7, show_default=True, help="Truncation psi.")
@click.option(
    "--strength",
    type=float,
    default=1.0,
    show_default=True,
    help="How far to edit: w + strength * (edit - w); 0 keeps the original, above 1 exaggerates.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("artifacts/edit.png"),
    show_default=True,
    help="Grid PNG to write; edited latents go beside it as <name>_latents.npy.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@artifact_options("Serve the edit from an ffclip-export folder instead of the checkpoints.")
def edit(
    sources: StageSources,
    prompts: tuple[str, ...],
    latents: Path | None,
    images: tuple[Path, ...],
    align: Path | None,
    encoder: Path | None,
    seed: int,
    num: int,
    truncation: float,
    strength: float,
    out: Path,
    device: str,
    artifacts: Path | None,
    expect_sha256: str | None,
    backend: str,
) -> None:
    """Edit images from text prompts and write originals and edits as one PNG grid."""
    from ..devices import resolve_device
    from ..editing import edit_columns
    from ..imaging import save_grid
    from ..latents import load_latents, save_latents
    from ..stages import open_stages
    from ..strength import check_strength

    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the grid is a PNG; give a file name ending in .png")
    check_output_file(out, "--out")
    check_strength(strength, 1)
    if images and latents:
        raise InputError("--image and --latents exclude each other: edit either photos or latents")
    if encoder is not None and not images:
        raise InputError("--encoder inverts the --image photos; give --image, or leave --encoder out")
    if align is not None and not images:
        raise InputError("--align aligns the --image photos; give --image, or leave --align out")
    if images and encoder is None and artifacts is None:
        raise InputError("--image needs an encoder to invert the photos: give --encoder e4e_ffhq_encode.pt, or "
                         "--artifacts with a folder exported with --encoder")
    dev = resolve_device(device)
    if images:
        from ..photos import check_photo, photo_latents

        for image in images:
            check_photo(image)
        aligner = open_aligner(align)
    if encoder is not None:
        from ..checkpoints import load_encoder

        photo_encoder = load_encoder(encoder, device=dev)
    stages = open_stages(sources, dev, artifacts, backend, expect_sha256, note=_say)
    _say_unseen_words(prompts, sources, artifacts)
    if encoder is not None:
        stages.use_encoder(photo_encoder, where=f"--encoder {encoder}")
    photos = None
    if images:
        _say(f"inverting {len(images)} photo(s) with {encoder or f'the encoder stage of {artifacts}'}")
        w, photos = photo_latents(stages.invert, images, stages.resolution, aligner)
    elif latents:
        w = load_latents(latents, stages.num_ws, stages.embed_dim)
    else:
        w = stages.sample_latents(num, seed, truncation)

    columns, edited = edit_columns(stages, w, prompts, strength, on_progress=_say)
    titles = ["original", *prompts] if photos is None else ["photo", "inversion", *prompts]
    if photos is None:
        save_grid(out, columns, titles)
    else:
        save_grid(out, [photos, *columns], titles, row_labels=[image.name for image in images])
    latents_path = save_latents(out.with_name(f"{out.stem}_latents.npy"), edited)
    click.echo(f"wrote {out} ({len(titles)} columns x {w.shape[0]} rows)")
    shape = ", ".join(str(n) for n in (len(prompts), *w.shape))
    click.echo(f"wrote {latents_path} (edited latents [{shape}]: prompts, batch, layers, width)")


def _say_unseen_words(prompts: tuple[str, ...], sources: StageSources, artifacts: Path | None) -> None:
    """Name, once per prompt, the words the world's text encoder never saw in training (they carry no meaning for
    it); other text encoders have no such list."""
    from ..inputs import shown
    from ..stages import serves_world_text_encoder
    from ..world.vocabulary import unseen_words

    if not serves_world_text_encoder(sources, artifacts):
        return
    for prompt in dict.fromkeys(prompts):
        unseen = unseen_words(prompt)
        if unseen:
            words = ", ".join(map(repr, unseen[:10])) + (f" and {len(unseen) - 10} more" if len(unseen) > 10 else "")
            _say(f"note: {shown(prompt)}: the world's text encoder never saw {words} in training, "
                 "so the edit may not follow the prompt; use the world's words (its colours, shapes, sizes and "
                 "backgrounds)")
