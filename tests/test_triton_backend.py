"""The triton backend on the micro configuration: its kernels run and agree with eager, and without a GPU or
`TRITON_INTERPRET=1` it is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from micro_preset import MICRO, export_micro

from ffclip.artifacts import StageInfo, read_manifest
from ffclip.engines import engine_class

pytest.importorskip("triton", reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernels compute in float32 like the eager forms but sum in another order: at these widths the outputs differ by
# a few float32 roundings, so both stages are held to 1e-5 of their largest output.
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return export_micro(tmp_path_factory.mktemp("triton") / "micro")


def _counting(monkeypatch, module: str, name: str) -> list[int]:
    """Count the calls of the kernel entry point `module.name` (looked up at each call by `ffclip.models.ops`)."""
    import importlib

    mod = importlib.import_module(module)
    kernel, calls = getattr(mod, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(mod, name, counted)
    return calls


def _engines(folder, backend: str, stage: str):
    return engine_class(backend)(folder, StageInfo.from_manifest(read_manifest(folder), stage), torch.device(DEVICE))


@pytest.mark.parametrize("stage", ["mapper", "generator"])
def test_kernels_agree_with_eager(folder, monkeypatch, stage):
    mapper_calls = _counting(monkeypatch, "ffclip.kernels.mapper_attention", "mapper_block")
    conv_calls = _counting(monkeypatch, "ffclip.kernels.modulated_conv", "modulated_conv2d")
    seeded = torch.Generator().manual_seed(5)
    inputs = {"w": torch.randn(3, MICRO.mapper.num_ws, MICRO.mapper.dim, generator=seeded)}
    if stage == "mapper":
        inputs["embedding"] = torch.randn(3, MICRO.text.embed_dim, generator=seeded)
    with _engines(folder, "eager", stage) as eager, _engines(folder, "triton", stage) as triton:
        (want,), (got,) = eager.run(inputs).values(), triton.run(inputs).values()
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() <= RELATIVE_TOLERANCE * want.abs().max()
    # the kernels ran: one mapper block, or one modulated convolution per layer (the 4-pixel conv and to-RGB, then
    # two convs and a to-RGB at 8 pixels)
    assert (len(mapper_calls), len(conv_calls)) == ((MICRO.mapper.num_blocks, 0) if stage == "mapper" else (0, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels need no interpreter")
def test_cpu_without_the_interpreter_is_refused_in_one_line(folder):
    env = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    result = subprocess.run(
        [sys.executable, "-c", "from ffclip.cli import main; main()", "edit", "--artifacts", str(folder),
         "--backend", "triton", "--device", "cpu", "--num", "1", "--prompt", "a hat",
         "--out", str(folder.parent / "edit.png")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr and "triton backend cannot run on cpu" in result.stderr
    assert not (folder.parent / "edit.png").exists()
