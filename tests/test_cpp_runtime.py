"""The C++ runtime (CMakeLists.txt, engines/cpp) against the Python runtime on the same TorchScript artifacts.

Configuring and building against LibTorch takes about 40 s on a busy 2-core machine, so the test runs by default
wherever cmake and a C++ compiler are found (FFCLIP_BUILD_CPP=0 skips it). It is one test so that the program is
built once, also when pytest-xdist spreads tests over several processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from export_fixtures import TINY
from open_clip.tokenizer import SimpleTokenizer

from ffclip.export.exporter import ExportOptions, export_artifacts
from ffclip.factory import build_preset
from ffclip.models.text_encoder import tokenize
from ffclip.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["blond hair", "a smiling face"]


def _skip_reason() -> str | None:
    if os.environ.get("FFCLIP_BUILD_CPP") == "0":
        return "FFCLIP_BUILD_CPP=0 skips building the C++ runtime"
    if shutil.which("cmake") is None:
        return "cmake is not installed; the C++ runtime cannot be built here"
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) on PATH; the C++ runtime cannot be built here"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _run(cmd: list[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _build(build: Path) -> Path:
    """Configure and build ffclip_edit into `build`; returns the executable."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    start = time.perf_counter()
    _run(
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator,
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        "cmake configure",
        300,
    )
    _run(["cmake", "--build", str(build), "-j2"], "cmake build", 900)
    print(f"C++ runtime configured and built in {time.perf_counter() - start:.0f} s")
    exe = build / "ffclip_edit"
    assert exe.is_file()
    return exe


def _read_ppm(path: Path) -> np.ndarray:
    magic, size, depth, pixels = path.read_bytes().split(b"\n", 3)
    assert magic == b"P6" and depth == b"255"
    width, height = map(int, size.split())
    return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)


def _side_by_side(images: torch.Tensor) -> np.ndarray:
    return np.concatenate(list(images.numpy()), axis=1)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_cpp_runtime_matches_python(tmp_path: Path) -> None:
    program = _build(tmp_path / "build")
    artifacts = tmp_path / "tiny"
    options = ExportOptions(formats=("torchscript",), min_batch=1, opt_batch=1, max_batch=2)
    export_artifacts(build_preset(TINY), artifacts, options, preset="tiny", sources={})

    with Runtime.load(artifacts, "torchscript", "cpu") as runtime:
        w = torch.randn(len(PROMPTS), runtime.num_ws, runtime.embed_dim, generator=torch.Generator().manual_seed(3))
        expected_edit = _side_by_side(runtime.edit(w, PROMPTS))
        expected_synth = _side_by_side(runtime.synthesize(w))
    latents, tokens = tmp_path / "latents.npy", tmp_path / "tokens.npy"
    np.save(latents, w.numpy())
    np.save(tokens, tokenize(SimpleTokenizer(context_length=77), PROMPTS).numpy())

    # The same TorchScript graphs on the same LibTorch: measured identical (0 levels) for the whole edit and for
    # synthesis alone, on this tiny preset and on the 256-pixel random preset; 1 level is allowed.
    edit = tmp_path / "edit.ppm"
    _run([str(program), str(artifacts), str(latents), str(tokens), str(edit)], "ffclip_edit", 300)
    assert _max_diff(_read_ppm(edit), expected_edit) <= 1
    synth = tmp_path / "synth.ppm"
    _run([str(program), "--synthesize", str(artifacts), str(latents), str(synth)], "ffclip_edit --synthesize", 300)
    assert _max_diff(_read_ppm(synth), expected_synth) <= 1

    # bad input: exit status 2, one line on stderr, no output file
    out = tmp_path / "bad.ppm"
    cases = {
        "not an artifact folder": [str(tmp_path), str(latents), str(tokens), str(out)],
        "tokens given as latents": [str(artifacts), str(tokens), str(tokens), str(out)],
        "wrong argument count": [str(artifacts), str(latents)],
    }
    escaping = tmp_path / "escaping"
    shutil.copytree(artifacts, escaping)
    manifest = json.loads((escaping / "manifest.json").read_text())
    # listed and hashed, so only the confinement can refuse it
    mapper_files = manifest["stages"]["mapper"]["files"]
    outside = "../tiny/" + mapper_files["torchscript"]
    manifest["files"][outside] = manifest["files"][mapper_files["torchscript"]]
    mapper_files["torchscript"] = outside
    (escaping / "manifest.json").write_text(json.dumps(manifest))
    cases["a stage path outside the folder"] = [str(escaping), str(latents), str(tokens), str(out)]
    for what, args in cases.items():
        result = subprocess.run([str(program), *args], capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (what, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("ffclip_edit: "), (what, result.stderr)
    assert "points outside the artifact folder" in lines[0]
    assert not out.exists()


def test_the_documented_recipe_writes_only_under_artifacts():
    """The recipe's inputs and pictures stay out of the repository root, in the ignored artifacts/ folder."""
    import re

    guide = (ROOT / "docs" / "cpp.md").read_text()
    section = guide[guide.index("# Embedding from C++"):]
    recipe = "\n".join(re.findall(r"```\n(.*?)```", section, re.S)[:2])
    written = re.findall(r"[\w./-]+\.(?:npy|ppm)\b", recipe)
    assert written and all(path.startswith("artifacts/") for path in written), written
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=ROOT, capture_output=True, text=True)
    assert set(ignored.stdout.split()) == set(written)
