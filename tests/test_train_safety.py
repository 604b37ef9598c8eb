"""`ffclip train` keeps what a run has saved: a diverging run stops before it writes, a damaged state is refused in one
line, a trained folder is not started over by accident, and two runs never write one folder."""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from test_train_cli import stage_files

from ffclip.cli import main
from ffclip.training import LOCK_FILE


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("stages")
    args = stage_files(folder)
    options = {args[i]: args[i + 1] for i in range(0, len(args), 2)}
    for dropped in ("--val-every", "--val-split"):
        options.pop(dropped)
    options.update({"--steps": "2", "--dtype": "float32"})
    return [item for pair in options.items() for item in pair]


def one_line(code, err: str, *fragments: str) -> str:
    """The error line, which must be the one line of stderr after any progress lines."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("training step", "resumed"))]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ffclip: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(stages, tmp_path_factory) -> Path:
    """A folder that a two-step run saved into (read only: tests copy it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["ffclip", "train", *stages, "--out", str(out)])
        main()  # returns on success, exits otherwise
    return out


def copy_run(trained: Path, to: Path) -> dict[str, bytes]:
    to.mkdir()
    files = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    for name, data in files.items():
        (to / name).write_bytes(data)
    return files


def unchanged(folder: Path, files: dict[str, bytes]) -> bool:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files


def test_a_diverging_run_stops_and_keeps_the_last_good_files(monkeypatch, capsys, tmp_path, stages, trained):
    out = tmp_path / "run"
    files = copy_run(trained, out)
    code, _, err = run_cli(monkeypatch, capsys, "train", *stages, "--out", out, "--resume", "--steps", "6",
                           "--lr", "1e30", "--save-every", "100")
    one_line(code, err, "diverged at step", "is nan", str(out), "--lr")
    assert unchanged(out, files)


def test_a_first_run_that_diverges_writes_no_mapper(monkeypatch, capsys, tmp_path, stages):
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "train", *stages, "--out", out, "--lr", "1e30", "--steps", "6",
                           "--save-every", "100")
    one_line(code, err, "diverged at step", "no step was saved")
    assert not (out / "mapper.safetensors").exists() and not (out / "train_state.pt").exists()


def _damage(state: dict, how: str) -> None:
    moments = next(iter(state["optimizer"]["state"].values()))
    if how == "nan weight":
        next(iter(state["mapper"].values())).fill_(float("nan"))
    elif how == "nan moment":
        moments["exp_avg_sq"].fill_(float("nan"))
    elif how == "moment shape":
        moments["exp_avg"] = moments["exp_avg"].flatten()[:3].clone()
    else:
        state["step"] = {"step abc": "abc", "step nan": float("nan"), "step true": True, "step past history": 10**30}[how]


@pytest.mark.parametrize(("how", "fragment"), [
    ("nan weight", "NaN"), ("nan moment", "NaN"), ("moment shape", "shape"),
    ("step abc", "'abc'"), ("step nan", "nan"), ("step true", "True"), ("step past history", "loss history holds"),
])
def test_a_damaged_state_is_refused_in_one_line(monkeypatch, capsys, tmp_path, stages, trained, how, fragment):
    out = tmp_path / "run"
    copy_run(trained, out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    _damage(state, how)
    torch.save(state, out / "train_state.pt")
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = run_cli(monkeypatch, capsys, "train", *stages, "--out", out, "--resume", "--steps", "3")
    one_line(code, err, "cannot resume", fragment, "--force")
    assert unchanged(out, files)


def test_training_again_into_a_trained_folder_needs_resume_or_force(monkeypatch, capsys, tmp_path, stages, trained):
    out = tmp_path / "run"
    files = copy_run(trained, out)
    code, _, err = run_cli(monkeypatch, capsys, "train", *stages, "--out", out, "--steps", "1")
    one_line(code, err, "train_state.pt", "--resume", "--force")
    assert unchanged(out, files)
    code, _, err = run_cli(monkeypatch, capsys, "train", *stages, "--out", out, "--steps", "1", "--force")
    assert code == 0, err
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 1


def test_a_second_run_on_a_folder_in_use_is_refused(monkeypatch, capsys, tmp_path, stages, trained):
    out = tmp_path / "run"
    files = copy_run(trained, out)
    with open(out / LOCK_FILE, "a") as held:  # what the first run holds while it trains
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run_cli(monkeypatch, capsys, "train", *stages, "--out", out, "--resume", "--steps", "3")
    one_line(code, err, "another training run", LOCK_FILE)
    assert unchanged(out, {**files, LOCK_FILE: b""})
    code, _, err = run_cli(monkeypatch, capsys, "train", *stages, "--out", out, "--resume", "--steps", "3")
    assert code == 0, err


def test_a_prompts_file_that_is_not_utf8_is_one_line(monkeypatch, capsys, tmp_path, stages):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"blond hair\ncaf\xe9 au lait\n")
    args = list(stages)
    args[args.index("--prompts") + 1] = str(prompts)
    code, _, err = run_cli(monkeypatch, capsys, "train", *args, "--out", tmp_path / "run")
    one_line(code, err, "--prompts", "UTF-8", "0xe9")
