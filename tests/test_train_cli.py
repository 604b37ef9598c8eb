"""`torchrun --nproc-per-node 2 -m ffclip.training` on the CPU (gloo) follows the single-process run of the same global
batch, and its saved state resumes in one process.

Both runs are in float64 on stages of style width 128, and are compared over two steps. A rounding difference between
them can grow quickly from step to step (Adam divides by |gradient| + 1e-8, which magnifies the rounding of entries
near 1e-8, and a mapper can be poorly conditioned). At width 128 it stays small: measured, the weights after two
steps differ by 3e-10 (as much as the same single-process run on one and on two threads) and by 9e-8 after a resumed
third step, whereas training on half of each batch (what a wrongly split batch trains on) ends up to 3e-2 away
(median 2e-3). At width 512 the same comparison drifted to 3e-5 after two steps, past the 1e-5 allowed here, and to
8e-3 after three, close to a wrong split.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli_runner import run_cli
from export_fixtures import TINY

from ffclip.checkpoints import save_module
from ffclip.checkpoints.bundle import load_bundle
from ffclip.cli.train import train
from ffclip.config import GeneratorConfig
from ffclip.factory import build_generator, build_text_encoder
from ffclip.latents import sample_latents, save_latents
from ffclip.training import prompt_set


WIDTH = 128  # the style width shared by the generator, the CLIP embedding and so the mapper


def stage_files(folder: Path) -> list[str]:
    config = GeneratorConfig(resolution=16, style_dim=WIDTH, channels={"4": 16, "8": 12, "16": 8}, n_mlp=2)
    generator = build_generator(config, seed=1)
    save_module(folder / "generator.safetensors", generator)
    clip = build_text_encoder(replace(TINY.text, embed_dim=WIDTH), seed=2, vision=True)
    save_module(folder / "clip.safetensors", clip)
    save_latents(folder / "latents.npy", sample_latents(generator, 10, seed=3))
    (folder / "prompts.txt").write_text("blond hair\na smiling face\nwearing glasses\n")
    return ["--generator", str(folder / "generator.safetensors"), "--clip", str(folder / "clip.safetensors"),
            "--latents", str(folder / "latents.npy"), "--prompts", str(folder / "prompts.txt"), "--batch-size", "4",
            "--save-every", "1", "--val-every", "1", "--val-split", "0.2", "--lr", "1e-2", "--dtype", "float64",
            "--device", "cpu"]


def in_process(args: list[str]) -> None:
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 0, result.output


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_bundle(path).state_dict


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_processes_follow_one_and_resume(tmp_path):
    args = stage_files(tmp_path)
    in_process([*args, "--steps", "2", "--out", str(tmp_path / "one")])
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "ffclip.training", *args,
                          "--steps", "2", "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]

    for name in ("mapper.safetensors", "best_mapper.safetensors"):
        assert_same_weights(tmp_path / "one" / name, tmp_path / "two" / name)
    one, two = (torch.load(tmp_path / run / "train_state.pt", weights_only=True) for run in ("one", "two"))
    assert two["step"] == 2 and len(two["validation"]) == 2
    for key in ("history", "validation"):
        torch.testing.assert_close(torch.tensor(two[key], dtype=torch.float64),
                                   torch.tensor(one[key], dtype=torch.float64), rtol=1e-6, atol=1e-12)
    assert one["history"][1][3] < one["history"][0][3]  # the mapper did learn

    histories = []
    for run in ("one", "two"):
        in_process([*args, "--steps", "3", "--out", str(tmp_path / run), "--resume"])
        state = torch.load(tmp_path / run / "train_state.pt", weights_only=True)
        histories.append(torch.tensor(state["history"], dtype=torch.float64))
    assert len(histories[1]) == 3
    torch.testing.assert_close(histories[1], histories[0], rtol=1e-4, atol=1e-12)


def test_the_identity_net_and_face_parser_files_switch_their_losses_on(tmp_path, monkeypatch, capsys):
    import ffclip.checkpoints
    from test_train_losses import Embed, Parse

    opened = []

    def opener(net):
        def load(path, device="cpu"):
            opened.append(Path(path).name)
            return net
        return load

    monkeypatch.setattr(ffclip.checkpoints, "load_identity_net", opener(Embed()))
    monkeypatch.setattr(ffclip.checkpoints, "load_face_parser", opener(Parse()))
    for name in ("model_ir_se50.pth", "parsenet.pth"):
        (tmp_path / name).write_bytes(b"stand-in")
    args = [a for a in stage_files(tmp_path) if a not in ("--prompts", str(tmp_path / "prompts.txt"))]
    code, _, err = run_cli(monkeypatch, capsys, "train", *args, "--steps", "1", "--out", tmp_path / "run",
                           "--id-net", tmp_path / "model_ir_se50.pth", "--face-parser", tmp_path / "parsenet.pth",
                           "--prompt-set", "released", "--dtype", "float32")
    assert code == 0, err
    assert opened == ["model_ir_se50.pth", "parsenet.pth"]
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["history"][0][4] > 0 and state["history"][0][5] > 0 and len(state["validation"]) == 1
    config = load_bundle(tmp_path / "run" / "mapper.safetensors").extra["train_config"]
    assert (config["lambda_identity"], config["lambda_background"]) == (0.9, 2.0)
    assert tuple(config["prompts"]) == prompt_set("released")
    assert (tmp_path / "run" / "best_mapper.safetensors").exists()


@pytest.mark.parametrize("given, fragment", [
    (["--lambda-identity", "0.5"], "--lambda-identity 0.5 needs --id-net"),
    (["--lambda-background", "1"], "--lambda-background 1 needs --face-parser"),
    (["--prompt-set", "released", "--prompts", "PROMPTS"], "choose one"),
    (["--val-every", "2"], "--val-latents"),
])
def test_bad_training_options_are_one_line(tmp_path, monkeypatch, capsys, given, fragment):
    (tmp_path / "prompts.txt").write_text("blond hair\n")
    given = [str(tmp_path / "prompts.txt") if a == "PROMPTS" else a for a in given]
    code, _, err = run_cli(monkeypatch, capsys, "train", *given, "--out", tmp_path / "run", "--device", "cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], err


def test_each_preset_trains_on_its_own_prompt_set_by_default():
    from ffclip.cli.train import _prompts
    from ffclip.config import PRESETS
    from ffclip.training import prompt_set
    from ffclip.world.vocabulary import unseen_words

    assert _prompts(None, None, "world") == prompt_set("world") != prompt_set("faces")
    assert not any(unseen_words(p) for p in prompt_set("world"))  # every word is one the world's CLIP learned
    assert all(_prompts(None, None, name) == prompt_set(preset.prompt_set) for name, preset in PRESETS.items())
    assert _prompts(None, "released", "world") == prompt_set("released")
