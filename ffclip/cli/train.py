"""`ffclip-train`: train a mapper for a frozen generator and CLIP model (also `torchrun -m ffclip.training`)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import click
import torch

from ..config import get_preset
from ..errors import InputError
from ..training import EMBEDDING_RESIZES, PROMPT_SETS, TRAIN_DTYPES, TrainConfig, prompt_set
from ..stages import StageSources
from .options import stage_options

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_WEIGHT = click.FloatRange(0)


@click.command()
@stage_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts/train"),
              show_default=True, help="Folder for mapper.safetensors, train_state.pt, best_mapper.safetensors and "
              "loss.png.")
@click.option("--steps", type=click.IntRange(1), default=TrainConfig.steps, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=TrainConfig.batch_size, show_default=True,
              help="The global batch; under torchrun it is split over the processes (a multiple of their number).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=TrainConfig.lr, show_default=True,
              help="Adam's learning rate, halved at 50, 75, 90 and 95% of --steps.")
@click.option("--save-every", type=click.IntRange(1), default=TrainConfig.save_every, show_default=True)
@click.option("--latents", type=_FILE, default=None,
              help="Training latents [N,L,D] (.npy/.pt): e4e inversions of face photos, as `ffclip invert` writes "
              "them, are the intended source. Without it latents are sampled from the generator.")
@click.option("--prompts", "prompts_file", type=_FILE, default=None,
              help="Text file with one training prompt per line.")
@click.option("--prompt-set", "prompt_set_name", type=click.Choice(PROMPT_SETS), default=None,
              help="A packaged prompt list instead of --prompts (default: the preset's own): 'faces' (built-in face "
              "edits), 'released' (FFCLIP's training descriptions: emotions, ages, hair colours and styles, eyes, "
              "glasses, make-up...) or 'world' (the shapes world's edit prompts, the world preset's).")
@click.option("--lambda-clip", type=_WEIGHT, default=TrainConfig.lambda_clip, show_default=True,
              help="Weight of the CLIP loss (edited image against its prompt).")
@click.option("--lambda-latent", type=_WEIGHT, default=TrainConfig.lambda_latent, show_default=True,
              help="Weight of the L1 distance between the edited and the original latents.")
@click.option("--lambda-embedding", type=_WEIGHT, default=TrainConfig.lambda_embedding, show_default=True,
              help="Weight of the L1 distance between the CLIP image embeddings of the edited and original images.")
@click.option("--embedding-resize", type=click.Choice(EMBEDDING_RESIZES), default=TrainConfig.embedding_resize,
              show_default=True, help="How the embedding loss brings images to CLIP's size: bicubic (as released) or "
              "antialiased bilinear (as the CLIP loss does).")
@click.option("--id-net", type=_FILE, default=None,
              help="ArcFace IR-SE50 (model_ir_se50.pth) for the identity loss; without it that loss is off.")
@click.option("--lambda-identity", type=_WEIGHT, default=None,
              help="Weight of the identity loss (1 - cosine of the ArcFace embeddings of the two faces)  "
              f"[default: {TrainConfig.lambda_identity} with --id-net]")
@click.option("--face-parser", type=_FILE, default=None,
              help="FFCLIP's face-parsing UNet (parsenet.pth) for the background loss; without it that loss is off.")
@click.option("--lambda-background", type=_WEIGHT, default=None,
              help="Weight of the background loss (squared difference outside the hair both images' parses find)  "
              f"[default: {TrainConfig.lambda_background} with --face-parser]")
@click.option("--val-every", type=click.IntRange(0), default=TrainConfig.val_every, show_default=True,
              help="Validate every N steps (and at the end) and keep the best mapper in best_mapper.safetensors; "
              "0: no validation.")
@click.option("--val-latents", type=_FILE, default=None,
              help="Held-out latents for validation (default: the last --val-split of --latents, held out).")
@click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Share of --latents held out for validation when --val-latents is not given.")
@click.option("--dtype", type=click.Choice(TRAIN_DTYPES), default=TrainConfig.dtype, show_default=True,
              help="Precision of every stage during training; float64 (slow) is the reference for checking numerics, "
              "a distributed run against one process for instance.")
@click.option("--truncation", type=click.FloatRange(0, 1), default=TrainConfig.truncation, show_default=True,
              help="Truncation psi of the latents sampled from the generator (unused with --latents).")
@click.option("--init-mapper/--fresh-mapper", default=False, show_default=True,
              help="Start from --mapper's weights rather than a fresh initialisation.")
@click.option("--resume", is_flag=True, help="Continue from the state saved in --out.")
@click.option("--force", is_flag=True, help="Start over in an --out that holds a run's train_state.pt, replacing it.")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N or auto; under torchrun each process takes the GPU its LOCAL_RANK names.")
def train(
    sources: StageSources,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    save_every: int,
    latents: Path | None,
    prompts_file: Path | None,
    prompt_set_name: str | None,
    lambda_clip: float,
    lambda_latent: float,
    lambda_embedding: float,
    embedding_resize: str,
    id_net: Path | None,
    lambda_identity: float | None,
    face_parser: Path | None,
    lambda_background: float | None,
    val_every: int,
    val_latents: Path | None,
    val_split: float,
    dtype: str,
    truncation: float,
    init_mapper: bool,
    resume: bool,
    force: bool,
    seed: int,
    device: str,
) -> None:
    """Train a mapper with FFCLIP's recipe: generator and CLIP frozen; CLIP loss, latent L1, CLIP image-embedding
    L1, and the identity and background losses when their networks are given. The defaults are the released
    configuration (weights 1.0 / 1.6 / 1.0 / 0.9 / 2.0, Adam 5e-4, batch 8, gradient clipping at 5, the learning rate
    halved at 50/75/90/95% of the run). For several processes: `torchrun --nproc-per-node N -m ffclip.training ...`
    (gloo on the CPU, NCCL on GPUs).

    \b
    Where it differs from the released trainer:
    - it counts steps, not epochs (the decay points and --val-every are in steps);
    - --batch-size is the global batch (the released one is per GPU);
    - the CLIP loss is the batch mean (the released code sums it over the batch) and resizes with antialiased
      bilinear filtering (the released code upsamples 7x and average-pools);
    - images are clamped to [-1, 1] and normalised as CLIP expects before both CLIP losses (the released
      embedding loss feeds the raw generator output);
    - validation is off unless --val-every is given.
    """
    from ..checkpoints import load_face_parser, load_identity_net
    from ..config import MapperConfig
    from ..devices import resolve_device
    from ..factory import build_mapper
    from ..latents import load_latents
    from ..outputs import check_output_folder
    from ..training import MapperTrainer, plot_losses, run_lock, start_distributed

    check_output_folder(out, "--out")
    if int(os.environ.get("RANK", "0")) == 0:  # only the first process writes, so only it holds the folder
        click.get_current_context().with_resource(run_lock(out))
    prompts = _prompts(prompts_file, prompt_set_name, sources.preset)
    lambda_identity = _weight("--lambda-identity", lambda_identity, TrainConfig.lambda_identity, id_net,
                              "--id-net (model_ir_se50.pth)")
    lambda_background = _weight("--lambda-background", lambda_background, TrainConfig.lambda_background, face_parser,
                                "--face-parser (parsenet.pth)")
    if resume and not (out / "train_state.pt").exists():
        raise InputError(f"--resume: {out} holds no train_state.pt; run once without --resume first")
    if not resume and not force and (out / "train_state.pt").exists():
        raise InputError(f"--out {out}: holds a run's train_state.pt, which training again would replace; pass "
                         "--resume to continue that run, or --force to start over")
    if val_every and val_latents is None and latents is None:
        raise InputError("--val-every needs held-out latents; give --val-latents, or --latents to hold some out")

    dev = start_distributed(resolve_device(device))
    generator = sources.load_generator(dev)
    text_encoder = sources.load_text_encoder(dev, vision=True)
    if init_mapper:
        mapper = sources.load_mapper(dev)
    else:
        mapper = build_mapper(MapperConfig(num_ws=generator.num_ws, dim=text_encoder.embed_dim), seed=seed)
    num_ws, dim = generator.num_ws, generator.config.style_dim
    w = load_latents(latents, num_ws, dim) if latents is not None else None
    held_out = load_latents(val_latents, num_ws, dim) if val_latents is not None else None
    if val_every and held_out is None:
        w, held_out = _hold_out(w, val_split, latents)
    identity = load_identity_net(id_net, device=str(dev)) if id_net is not None and lambda_identity > 0 else None
    parser = (load_face_parser(face_parser, device=str(dev)) if face_parser is not None and lambda_background > 0
              else None)

    # every option named like a TrainConfig field sets it; the loss weights and prompts as resolved above
    given = {**click.get_current_context().params, "prompts": prompts, "lambda_identity": lambda_identity,
             "lambda_background": lambda_background}
    config = TrainConfig(**{f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given})
    trainer = MapperTrainer(mapper, generator, text_encoder, config, latents=w, device=dev, identity_net=identity,
                            face_parser=parser, val_latents=held_out)
    first = trainer.rank == 0
    if resume:
        trainer.resume(out)
        if first:
            click.echo(f"resumed at step {trainer.step} from {out}", err=True)
    if sources.is_seeded_random and first:
        click.echo(f"note: the '{sources.preset}' generator and CLIP are seeded random; this trains the machinery, "
                   "not a useful mapper", err=True)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # a bar on a terminal; elsewhere (a log, a pipe) a plain line every 5 % of the run
    live = sys.stderr.isatty()
    every = max(1, steps // 20)
    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                  TimeRemainingColumn(), transient=False, disable=not (first and live)) as progress:
        task = progress.add_task("train", total=steps, completed=trainer.step, loss="")

        def on_step(step, losses):
            shown = f"loss {losses.total:.4f} (clip {losses.clip:.4f}, latent {losses.latent:.4f})"
            progress.update(task, completed=step, loss=shown)
            if first and not live and (step % every == 0 or step == steps):
                click.echo(f"training step {step}/{steps}: {shown}", err=True)

        mapper_path = trainer.fit(out, on_step)
    if trainer.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not first:
        return
    plot = plot_losses(trainer.history, out / "loss.png", trainer.validation)
    click.echo(f"wrote {mapper_path} (use it with --mapper), {out / 'train_state.pt'} and {plot}")
    if trainer.best_validation is not None:
        step, loss = trainer.best_validation
        click.echo(f"best validation loss {loss:.4f} at step {step}: {out / 'best_mapper.safetensors'}")


def _prompts(path: Path | None, name: str | None, preset: str) -> tuple[str, ...]:
    """The training prompts: the --prompts file, the --prompt-set, or the preset's own set (`Preset.prompt_set`)."""
    if path is not None and name is not None:
        raise InputError("--prompts and --prompt-set both given; choose one")
    if path is None:
        return prompt_set(name or get_preset(preset).prompt_set)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--prompts {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}); save the file as UTF-8") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise InputError(f"{path}: no prompts in the file; put one prompt per line")
    return prompts


def _weight(option: str, given: float | None, default: float, network: Path | None, needs: str) -> float:
    """A loss weight: `default` when its network file is given, 0 without; a weight > 0 without the file is an error."""
    if given is None:
        return default if network is not None else 0.0
    if given > 0 and network is None:
        raise InputError(f"{option} {given:g} needs {needs}; give the file or drop the weight")
    return given


def _hold_out(latents: torch.Tensor, share: float, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Split off the last `share` of the latents (at least one) for validation; (training, held out)."""
    count = math.ceil(share * len(latents))
    if count >= len(latents):
        raise InputError(f"{path}: {len(latents)} latent(s) cannot be split for validation; give more, or "
                         "--val-latents")
    return latents[:-count], latents[-count:]
