"""`python -m ffclip.world.build` (what `make world` runs): train the three stages of the `world` preset from nothing.

Stages 1 (generator) and 2 (CLIP) run side by side, one process each; stage 3 is `ffclip-train` over their results,
with every loss weight and the latent source given on its command line. Every stage checkpoints as it goes and a
re-run continues where the last one stopped; a finished stage is skipped. At the end the weights are written into
the package as float16 bundles (the `world` preset's embedded default) and judged.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

from ..config import get_preset
from .stage import log

# stage 3: the mapper, through ffclip-train; every value is passed explicitly. The CLIP-embedding loss is off: it
# charges the asked change as much as any other, and at weight 0.005 it already cancelled every edit within 200 steps
MAPPER_TRAINING = {
    "--batch-size": "16",
    "--lr": "1e-3",
    "--save-every": "100",
    "--lambda-clip": "1.0",
    "--lambda-embedding": "0",
    "--embedding-resize": "antialiased",
    "--truncation": "1.0",
    "--seed": "0",
}
# two runs of ffclip-train, the second resuming the first. The latent loss has a stable point at no push at all:
# started with it, the mapper never leaves it for some attributes, so it first learns to push with CLIP alone, then
# the latent loss prunes what the prompts did not ask for. Pruning harder loses whole prompts (at 0.5, "on a black
# background"); more gently, pushes the prompts did not ask for survive
MAPPER_PHASES = (
    {"--steps": "700", "--lambda-latent": "0"},
    {"--steps": "1600", "--lambda-latent": "0.42"},
)
NUM_LATENTS = 8192


def weights_folder() -> Path:
    """Where the package keeps the `world` preset's trained weights."""
    return Path(__file__).resolve().parent / "weights"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(stage: str, out: Path, threads: int) -> None:
    """Train one of the first two stages in this process and write its bundle (full precision) into `out`."""
    import torch

    from ..checkpoints import save_module

    torch.set_num_threads(threads)
    preset = get_preset("world")
    if stage == "generator":
        from .generator_training import GeneratorTraining, train_generator

        module = train_generator(preset.generator, GeneratorTraining(seed=preset.seed), out / "generator")
    else:
        from .clip_training import ClipTraining, train_clip

        module = train_clip(preset.text, ClipTraining(seed=preset.seed), out / "clip")
    save_module(out / f"{stage}.safetensors", module)


def _stage_command(stage: str, out: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "ffclip.world.build", "--stage", stage, "--out", str(out), "--threads", str(threads)]


def _run_first_stages(out: Path, threads: int) -> None:
    todo = [s for s in ("generator", "clip") if not (out / f"{s}.safetensors").exists()]
    if not todo:
        log("stages 1 and 2: already trained")
        return
    each = max(1, threads // len(todo))
    log(f"stages 1 and 2: training {' and '.join(todo)} side by side, {each} thread(s) each")
    procs = [subprocess.Popen(_stage_command(s, out, each)) for s in todo]
    codes = [p.wait() for p in procs]
    if any(codes):
        failed = [s for s, c in zip(todo, codes) if c]
        raise click.ClickException(f"stage {', '.join(failed)} failed; run `make world` again to resume")


def _report_clip(out: Path) -> None:
    from ..checkpoints import load_text_encoder
    from .clip_training import edit_margins

    scores = edit_margins(load_text_encoder(out / "clip.safetensors", vision=True))
    log("stage 2: CLIP on held-out edit prompts, margin / largest leak in cosine: "
        + ", ".join(f"{a} {m:.3f} / {leak:.3f}" for a, (m, leak) in scores.items()))


def _write_mapper_inputs(out: Path) -> None:
    from ..checkpoints import load_generator
    from ..latents import sample_latents, save_latents
    from .captions import balanced_edit_prompts

    if not (out / "latents.npy").exists():
        generator = load_generator(out / "generator.safetensors")
        save_latents(out / "latents.npy", sample_latents(generator, NUM_LATENTS, seed=1, truncation=1.0))
    (out / "prompts.txt").write_text("\n".join(balanced_edit_prompts()) + "\n")


def _train_mapper(out: Path, threads: int) -> None:
    from ..checkpoints.bundle import load_bundle

    folder = out / "mapper"
    done = folder / "mapper.safetensors"
    trained = load_bundle(done).extra.get("trained_steps", 0) if done.exists() else 0
    for number, phase in enumerate(MAPPER_PHASES, 1):
        if trained >= int(phase["--steps"]):
            log(f"stage 3, phase {number}: already trained")
            continue
        command = [str(Path(sys.executable).parent / "ffclip-train"),
                   "--generator", str(out / "generator.safetensors"), "--clip", str(out / "clip.safetensors"),
                   "--latents", str(out / "latents.npy"), "--prompts", str(out / "prompts.txt"),
                   "--out", str(folder), "--device", "cpu", "--fresh-mapper"]
        for option, value in {**MAPPER_TRAINING, **phase}.items():
            command += [option, value]
        if (folder / "train_state.pt").exists():
            command.append("--resume")
        log(f"stage 3, phase {number}: " + " ".join(command[1:]))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if subprocess.run(command, env=env).returncode:
            raise click.ClickException("stage 3 (ffclip-train) failed; run again to resume")
        trained = int(phase["--steps"])


def install(out: Path) -> list[Path]:
    """Write the three trained stages into the package as float16 bundles; returns the files written."""
    from ..checkpoints import load_generator, load_mapper, load_text_encoder
    from ..checkpoints.bundle import save_bundle
    from ..config import to_dict

    stages = {
        "generator": load_generator(out / "generator.safetensors"),
        "text_encoder": load_text_encoder(out / "clip.safetensors", vision=True),
        "mapper": load_mapper(out / "mapper" / "mapper.safetensors"),
    }
    written = []
    for kind, module in stages.items():
        state = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
        extra = {"vision": True} if kind == "text_encoder" else {}
        written.append(save_bundle(weights_folder() / f"{kind}.safetensors", kind, to_dict(module.config), state,
                                   {**extra, "trained_by": "make world"}))
    return written


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("artifacts/world"),
              show_default=True, help="Working folder: checkpoints of every stage, latents and prompts.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="CPU threads in all.")
@click.option("--install/--no-install", "do_install", default=True, show_default=True,
              help="Write the trained weights into the package (the world preset's default).")
@click.option("--stage", type=click.Choice(["generator", "clip"]), default=None, hidden=True)
def main(out: Path, threads: int, do_install: bool, stage: str | None) -> None:
    """Train the shapes world's generator, CLIP and mapper from nothing (resumable), then install and judge them."""
    out.mkdir(parents=True, exist_ok=True)
    if stage is not None:
        run_stage(stage, out, threads)
        return
    wall = time.time()
    _run_first_stages(out, threads)
    _report_clip(out)
    _write_mapper_inputs(out)
    _train_mapper(out, threads)
    cpu = time.process_time() + _children_cpu()
    log(f"training done: {cpu / 60:.1f} CPU minutes in this run, {(time.time() - wall) / 60:.1f} minutes wall")
    if do_install:
        for path in install(out):
            log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        from ..stages import StageSources, open_stages
        from .evaluate import report

        stages = open_stages(StageSources(preset=get_preset("world").name))
        click.echo(report(stages, num=128, seed=0, truncation=1.0, on_progress=log))


if __name__ == "__main__":
    main()
