"""`ffclip invert`: W+ codes for a folder of face photos (aligned, or aligned here with --align), with the e4e encoder,
as one `.npy` file."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from ..outputs import check_output_file
from .options import align_option, artifact_options, open_aligner


@click.command()
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder of face photos (PNG, JPEG, ...), read in name order; aligned as FFHQ was unless --align is given.",
)
@align_option
@click.option(
    "--encoder",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="e4e checkpoint, e.g. e4e_ffhq_encode.pt (or give --artifacts).",
)
@artifact_options("Invert with the encoder stage of an ffclip-export folder (exported with --encoder) instead of "
                  "--encoder.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="W+ codes to write (.npy, [photos, layers, width], usable as --latents); the photo names go beside it as "
    "<name>_files.txt, one per row (UTF-8; a backslash, control character or byte that is not UTF-8 escaped as \\\\, "
    "\\uNNNN or \\xNN). The two files are replaced together once both are written.",
)
@click.option("--batch-size", type=click.IntRange(1, 1024), default=8, show_default=True, help="Photos per batch.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def invert(images: Path, align: Path | None, encoder: Path | None, artifacts: Path | None,
           expect_sha256: str | None, backend: str, out: Path, batch_size: int, device: str) -> None:
    """Invert face photos to W+ latent codes with the e4e encoder."""
    import torch

    from ..atomic import atomic_files
    from ..devices import resolve_device
    from ..latents import save_latents
    from ..photos import invert as invert_photos
    from ..photos import list_photos, photo_names_text

    if (encoder is None) == (artifacts is None):
        raise InputError("give the encoder either as --encoder e4e_ffhq_encode.pt or as --artifacts FOLDER (exported "
                         "with --encoder), one of the two")
    if out.suffix.lower() != ".npy":
        raise InputError(f"--out {out}: the codes are written as .npy; give a file name ending in .npy")
    check_output_file(out, "--out")
    paths = list_photos(images)
    aligner = open_aligner(align)
    dev = resolve_device(device)
    if encoder is not None:
        from ..checkpoints import load_encoder

        net = load_encoder(encoder, device=dev)

        def encode(photos: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net(photos.to(dev))
    else:
        from ..runtime import Runtime

        runtime = Runtime.load(artifacts, backend=backend, device=dev, expected_sha256=expect_sha256)
        encode = runtime.invert

    def report(done: int, total: int) -> None:
        click.echo(f"inverted {done}/{total} photos", err=True)

    codes = invert_photos(encode, paths, batch_size, report, aligner)
    names = out.with_name(f"{out.stem}_files.txt")
    with atomic_files(out, names) as (codes_tmp, names_tmp):
        save_latents(codes_tmp, codes)
        names_tmp.write_text(photo_names_text(paths), encoding="utf-8")
    click.echo(f"wrote {out} (W+ codes {list(codes.shape)})")
    click.echo(f"wrote {names} (the photo of each row)")
