"""`ffclip invert`: W+ codes for a folder of aligned face photos, with the e4e encoder, as one `.npy` file."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ..outputs import check_output_file


@click.command()
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder of aligned face photos (PNG, JPEG, ...), read in name order.",
)
@click.option(
    "--encoder",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="e4e checkpoint, e.g. e4e_ffhq_encode.pt.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="W+ codes to write (.npy, [photos, layers, 512], usable as --latents); the photo names go beside it as "
    "<name>_files.txt, one per row.",
)
@click.option("--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True, help="Photos per batch.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def invert(images: Path, encoder: Path, out: Path, batch_size: int, device: str) -> None:
    """Invert aligned face photos to W+ latent codes with the e4e encoder."""
    from ..atomic import atomic_file
    from ..checkpoints import load_encoder
    from ..devices import resolve_device
    from ..latents import save_latents
    from ..photos import invert as invert_photos
    from ..photos import list_photos

    if out.suffix.lower() != ".npy":
        raise InputError(f"--out {out}: the codes are written as .npy; give a file name ending in .npy")
    check_output_file(out, "--out")
    paths = list_photos(images)
    net = load_encoder(encoder, device=resolve_device(device))

    def report(done: int, total: int) -> None:
        click.echo(f"inverted {done}/{total} photos", err=True)

    codes = invert_photos(net, paths, batch_size, report)
    save_latents(out, codes)
    names = out.with_name(f"{out.stem}_files.txt")
    with atomic_file(names) as tmp:
        tmp.write_text("".join(f"{p.name}\n" for p in paths), encoding="utf-8")
    click.echo(f"wrote {out} (W+ codes {list(codes.shape)})")
    click.echo(f"wrote {names} (the photo of each row)")
