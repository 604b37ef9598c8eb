"""`ffclip-train`: train a mapper for a frozen generator and CLIP model."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InputError
from .options import StageSources, stage_options


@click.command()
@stage_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts/train"),
              show_default=True, help="Folder for mapper.safetensors, train_state.pt and loss.png.")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=5e-4, show_default=True)
@click.option("--save-every", type=click.IntRange(1), default=200, show_default=True)
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Text file with one training prompt per line (default: a built-in list of face edits).")
@click.option("--latents", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training latents, e.g. e4e inversions (.npy/.pt, [N,L,512]); default: sampled from the generator.")
@click.option("--lambda-clip", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Weight of the CLIP loss (edited image against its prompt).")
@click.option("--lambda-latent", type=click.FloatRange(0), default=0.8, show_default=True,
              help="Weight of the L1 distance between the edited and the original latents.")
@click.option("--lambda-embedding", type=click.FloatRange(0), default=0.5, show_default=True,
              help="Weight of the L1 distance between the CLIP image embeddings of the edited and original images.")
@click.option("--truncation", type=click.FloatRange(0, 1), default=0.7, show_default=True,
              help="Truncation psi of the latents sampled from the generator (unused with --latents).")
@click.option("--init-mapper/--fresh-mapper", default=False, show_default=True,
              help="Start from --mapper's weights rather than a fresh initialisation.")
@click.option("--resume", is_flag=True, help="Continue from the state saved in --out.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def train(
    sources: StageSources,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    save_every: int,
    prompts_file: Path | None,
    latents: Path | None,
    lambda_clip: float,
    lambda_latent: float,
    lambda_embedding: float,
    truncation: float,
    init_mapper: bool,
    resume: bool,
    seed: int,
    device: str,
) -> None:
    """Train a mapper (FFCLIP's recipe: CLIP loss, latent L1, CLIP image-embedding L1; generator and CLIP frozen)."""
    from ..checkpoints import load_generator, load_mapper, load_text_encoder
    from ..config import MapperConfig, get_preset
    from ..devices import resolve_device
    from ..factory import build_mapper
    from ..latents import load_latents
    from ..outputs import check_output_folder
    from ..training import DEFAULT_PROMPTS, MapperTrainer, TrainConfig, plot_losses

    check_output_folder(out, "--out")
    dev = resolve_device(device)
    prompts = DEFAULT_PROMPTS
    if prompts_file is not None:
        prompts = tuple(line.strip() for line in prompts_file.read_text().splitlines() if line.strip())
        if not prompts:
            raise InputError(f"{prompts_file}: no prompts in the file; put one prompt per line")
    if resume and not (out / "train_state.pt").exists():
        raise InputError(f"--resume: {out} holds no train_state.pt; run once without --resume first")

    generator = load_generator(sources.generator, preset=sources.preset, device=dev)
    text_encoder = load_text_encoder(sources.clip, sources.clip_model, preset=sources.preset, vision=True, device=dev)
    if init_mapper:
        mapper = load_mapper(sources.mapper, preset=sources.preset, device=dev)
    else:
        mapper = build_mapper(MapperConfig(num_ws=generator.num_ws, dim=text_encoder.embed_dim), seed=seed)
    w = load_latents(latents, generator.num_ws, generator.config.style_dim) if latents is not None else None

    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, save_every=save_every, seed=seed, prompts=prompts,
                         lambda_clip=lambda_clip, lambda_latent=lambda_latent, lambda_embedding=lambda_embedding,
                         truncation=truncation)
    trainer = MapperTrainer(mapper, generator, text_encoder, config, latents=w, device=dev)
    if resume:
        trainer.resume(out)
        click.echo(f"resumed at step {trainer.step} from {out}", err=True)
    if sources.is_seeded_random:
        click.echo(f"note: the '{sources.preset}' generator and CLIP are seeded random; this trains the machinery, "
                   "not a useful mapper", err=True)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                  TimeRemainingColumn(), transient=False) as progress:
        task = progress.add_task("train", total=steps, completed=trainer.step, loss="")

        def on_step(step, losses):
            progress.update(task, completed=step,
                            loss=f"loss {losses.total:.4f} (clip {losses.clip:.4f}, latent {losses.latent:.4f})")

        mapper_path = trainer.fit(out, on_step)
    plot = plot_losses(trainer.history, out / "loss.png")
    click.echo(f"wrote {mapper_path} (use it with --mapper), {out / 'train_state.pt'} and {plot}")
