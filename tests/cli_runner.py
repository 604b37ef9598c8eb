"""Running the real `ffclip` entry point inside a test's process."""

from __future__ import annotations

import sys


def run_cli(monkeypatch, capsys, *args) -> tuple[int | str | None, str, str]:
    """Run `ffclip *args` in this process; returns (exit status, stdout, stderr)."""
    from ffclip.cli import main

    monkeypatch.setattr(sys, "argv", ["ffclip", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_bench(args: list[str]) -> None:
    """Run the `ffclip-bench` entry point in this process; it always ends in SystemExit."""
    from ffclip.benchmarks.cli import bench
    from ffclip.cli import _run

    saved = sys.argv
    sys.argv = ["ffclip-bench", *args]
    try:
        _run(bench, "ffclip-bench")
        raise SystemExit(0)
    finally:
        sys.argv = saved
