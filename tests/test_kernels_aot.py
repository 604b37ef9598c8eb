"""Ahead-of-time compilation of the Triton kernels for Hopper, on this machine's CPU: every kernel and autotune
configuration of the fp16 set compiles for sm_90, and none spills or runs out of shared memory. The full matrix is `python -m ffclip.kernels.aot --arch sm_80 --arch sm_90 --dtype fp16 --dtype bf16
--dtype fp32 --out report.json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ffclip.kernels import _config


def _aot(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "ffclip.kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=1200)


def test_every_fp16_kernel_compiles_for_sm90_without_spills(tmp_path):
    out = tmp_path / "report.json"
    proc = _aot("--arch", "sm_90", "--dtype", "fp16", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert rows and all(r["ok"] for r in rows), [(r["kernel"], r["error"]) for r in rows if not r["ok"]]
    conv = [r for r in rows if r["kernel"] == "modconv"]
    assert len(conv) == 2 * len(_config.MODCONV_CONFIGS) + len(_config.EPILOGUE_CONFIGS)
    bad = [r for r in rows if r["spills"] != 0 or r["shared_memory"] > r["shared_memory_limit"]]
    assert not bad, bad
    assert {r["kernel"] for r in rows} >= {"modconv", "channel_attention", "layer_selection", "block_output"}
    assert proc.returncode == 0 and report["passed"], proc.stderr[-2000:]


def test_the_interpreter_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from ffclip.kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--arch", "sm_90", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TRITON_INTERPRET" in err
    assert not (tmp_path / "r.json").exists()
