"""The prepared GPU check's dry run: the same checks on the CPU at tiny shapes, through `ffclip-bench --gpu-check`
in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run_bench as _bench_main


def test_the_dry_run_checks_everything_it_can_on_the_cpu(tmp_path):
    # as a user runs it: a fresh process whose environment does not switch Triton's interpreter on
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    bench = Path(sys.executable).with_name("ffclip-bench")
    done = subprocess.run([str(bench), "--gpu-check", "--dry-run", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert done.returncode == 0 and report["passed"], [c for c in checks.values() if c["status"] == "error"]
    assert report["environment"]["dry_run"] and report["environment"]["device"] == "cpu"
    assert {c["group"] for c in report["checks"]} == {"kernel", "mapper", "generator", "edit", "tensorrt"}
    for name, c in checks.items():
        if "cuda_graph" in name:
            assert c["status"] == "skipped" and "CUDA" in c["reason"]
        elif c["group"] != "tensorrt":
            assert c["status"] == "done" and c["ok"] and c["ms"] > 0, name
        if "rel_err" in c:
            assert c["rel_err"] <= c["tolerance"], name
    assert checks["generator triton B=2"]["rel_err"] > 0  # the kernels ran, not the eager layers
    assert checks["mapper engine CUDA-graph replay"]["status"] == "skipped"
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| kernel | modconv conv3 8->8 @4 fp16 | ok |" in table and table in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--dry-run"], "--dry-run goes with --gpu-check"),
    (["--gpu-check", "--dry-run"], "--gpu-check needs --out DIR"),
])
def test_gpu_check_arguments_give_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_dry_run_after_triton_was_imported_runs_in_a_fresh_interpreted_process(monkeypatch, tmp_path):
    import triton  # noqa: F401  (imported without the interpreter, as far as this process can tell)

    from ffclip.benchmarks import gpu_check

    runs = []
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda command, env: runs.append((command, env)) or
                        subprocess.CompletedProcess(command, 3))
    assert gpu_check.check_command(tmp_path, dry_run=True, budget_s=5.0) == 3
    [(command, env)] = runs
    assert command[1:] == [str(Path(gpu_check.__file__).resolve()), "--out", str(tmp_path), "--dry-run",
                           "--budget-s", "5.0"]
    assert command[0] == sys.executable and env["TRITON_INTERPRET"] == "1"
