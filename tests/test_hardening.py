"""What must never happen to the user's files or as an answer to a mistake: folders emptied, temporaries left behind,
tracebacks for a bad manifest or a bad output path, a benchmark that measures nothing and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli_runner import run_cli

from ffclip.atomic import atomic_dir, atomic_file
from ffclip.errors import InputError
from ffclip.artifacts import MANIFEST, ArtifactError, read_manifest


def one_line_error(code, err, *fragments):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines and lines[-1].startswith("ffclip: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# 1. a folder holding the user's own files is never emptied


def test_export_refuses_a_folder_that_is_not_an_artifact_folder(monkeypatch, capsys, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "edit.png").write_bytes(b"the user's picture")
    code, _, err = run_cli(monkeypatch, capsys, "export", "--out", mine, "--formats", "onnx", "--device", "cpu")
    one_line_error(code, err, str(mine), "--force")
    assert (mine / "edit.png").read_bytes() == b"the user's picture"


def test_only_an_artifact_folder_or_force_may_be_replaced(tmp_path):
    from ffclip.export.exporter import check_replaceable

    check_replaceable(tmp_path / "new", force=False)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", force=False)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / MANIFEST).write_text("{}")
    check_replaceable(ours, force=False)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="--force"):
        check_replaceable(theirs, force=False)
    check_replaceable(theirs, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_replaceable(tmp_path / "file", force=True)


# 2. interrupted exports leave nothing behind, and the swap never loses both folders


def test_stale_temporaries_of_dead_runs_are_swept(tmp_path):
    target = tmp_path / "art"
    dead = 2**22 + 12345  # above the default pid_max, so no process has it
    for name in (f".art.{dead}.x1.tmp", f".art.{dead}.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.onnx").write_bytes(b"0" * 10)
    (tmp_path / ".other.tmp").mkdir()  # not ours: kept
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp", "art"]


def test_a_crash_between_the_renames_leaves_the_old_folder_recoverable(tmp_path, monkeypatch):
    from ffclip.atomic import recover_dir

    target = tmp_path / "art"
    target.mkdir()
    (target / "a").write_text("old")
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving the old folder aside and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()  # the old folder is aside under a name of ours
    recover_dir(target)
    assert (target / "a").read_text() == "old"


def test_sigterm_during_a_folder_write_removes_the_temporary(tmp_path):
    script = textwrap.dedent(
        """
        import os, time, click
        from ffclip.atomic import atomic_dir, atomic_file
        from ffclip.cli import _run

        @click.command()
        def slow():
            with atomic_dir(os.environ["TARGET"]) as tmp:
                (tmp / "partial.onnx").write_bytes(b"0" * 1000)
                print("ready", flush=True)
                time.sleep(60)

        _run(slow, "ffclip-export")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TARGET": str(tmp_path / "art")})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_file_write_killed_midway_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "codes.npy"
    script = "import os, signal, sys\nfrom ffclip.atomic import atomic_file\n" \
             "with atomic_file(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n" \
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
    killed = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".codes.npy.") and left[0].endswith(".tmp")
    other = tmp_path / f".codes.npy.{os.getppid()}.x.tmp"  # a living process's write in progress: kept
    other.write_bytes(b"being written")
    (tmp_path / ".codes.npy.tmp").write_bytes(b"not one of ours")
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["codes.npy", other.name, ".codes.npy.tmp"])
    assert target.read_bytes() == b"whole"


# 7. malformed manifests get one line


def _manifest_folder(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / MANIFEST).write_bytes(content)
    return folder


VALID = {"format": "ffclip-artifacts", "format_version": 1, "files": {}, "stages": {}, "precision": "fp32",
         "model": {"num_ws": 8, "resolution": 32, "embed_dim": 512, "context_length": 77},
         "batch": {"min": 1, "opt": 1, "max": 1}, "preset": "tiny"}


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (json.dumps({k: v for k, v in VALID.items() if k != "stages"}).encode(), "'stages'"),
        (json.dumps({**VALID, "files": ["a"]}).encode(), "'files'"),
        (json.dumps({**VALID, "files": {"../elsewhere.bin": "0" * 64}}).encode(), "outside"),
        (json.dumps({**VALID, "files": {"/etc/hostname": "0" * 64}}).encode(), "outside"),
        (json.dumps({**VALID, "stages": {"mapper": {"files": {"onnx": 3}}}}).encode(), "mapper"),
    ],
)
def test_malformed_manifests_are_refused_in_one_line(tmp_path, content, fragment):
    folder = _manifest_folder(tmp_path, content)
    with pytest.raises(ArtifactError) as info:
        read_manifest(folder)
    message = str(info.value)
    assert fragment in message and "\n" not in message and str(folder) in message


# 14. output paths are checked before the work


@pytest.mark.parametrize(
    "command",
    [
        ["export", "--formats", "onnx", "--device", "cpu", "--out"],
        ["edit", "--prompt", "x", "--device", "cpu", "--out"],
        ["bench", "--device", "cpu", "--out"],
        ["train", "--steps", "1", "--device", "cpu", "--out"],
    ],
)
def test_an_output_under_a_file_is_refused_before_the_work(monkeypatch, capsys, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / ("grid.png" if command[0] == "edit" else "folder")
    code, _, err = run_cli(monkeypatch, capsys, *command, out)
    one_line_error(code, err, str(out))
    assert "loading" not in err and "rendering" not in err


# 17. a benchmark that measures nothing says so and fails; without a terminal it prints plain lines


def test_bench_that_measures_nothing_exits_non_zero_and_prints_markdown(monkeypatch, capsys, tmp_path):
    out = tmp_path / "bench"
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", "--backends", "tensorrt", "--device", "cpu",
                                "--stages", "mapper", "--out", out)
    one_line_error(code, err, "nothing was measured", str(out))
    assert "| backend | precision | status |" in stdout  # the full table as Markdown, not cut to the terminal width
    assert (out / "results.json").is_file()


def test_bench_progress_without_a_terminal_is_plain_lines(capsys):
    from ffclip.benchmarks.cli import progress_reporter

    with progress_reporter(tty=False) as (start, advance):
        start(3)
        advance("eager fp32 reference", 0)
        advance("eager fp32 reference", 1)
        advance("onnxruntime fp32 mapper b1", 2)
    err = capsys.readouterr().err.splitlines()
    assert err == ["eager fp32 reference ...", "[1/3] eager fp32 reference", "[3/3] onnxruntime fp32 mapper b1"]
