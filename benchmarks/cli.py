"""`ffclip-bench` / `ffclip bench`: latency, throughput, memory and error of every backend on every stage."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ffclip.config import DEFAULT_PRESET, PRESETS
from ffclip.devices import resolve_device
from ffclip.cli.options import expect_sha256_option, preset_given
from ffclip.errors import FfclipError, InputError
from ffclip.stages import folder_preset

from ffclip.benchmarks.backends import BACKENDS, DEFAULT_PRECISIONS, PRECISIONS, TIMED_STAGES
from ffclip.benchmarks.report import (
    FORMAT, FORMAT_VERSION, compare, compare_table, is_results_folder, load_results, markdown, rich_tables,
    write_results,
)
from ffclip.benchmarks.runner import DEFAULT_ACCURACY_NUM, Benchmark, Settings
from ffclip.benchmarks.timing import MAX_WARMUP_CALLS, SETTLE_RATIO


def parse_names(value: str, known: tuple[str, ...], option: str) -> tuple[str, ...]:
    """A comma-separated list of names from `known`, duplicates dropped, order kept."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        bad = f"unknown {option} value {unknown[0]!r}" if unknown else f"empty {option}"
        raise InputError(f"{bad}; choose from {','.join(known)}")
    return names


def parse_batches(value: str) -> tuple[int, ...]:
    """A comma-separated list of positive batch sizes, ascending."""
    try:
        batches = sorted({int(b) for b in value.split(",") if b.strip()})
    except ValueError:
        raise InputError(f"--batch {value!r}: expected comma-separated positive integers such as 1,8,32") from None
    if not batches or batches[0] < 1:
        raise InputError(f"--batch {value!r}: expected comma-separated positive integers such as 1,8,32")
    return tuple(batches)


def _compare(paths: tuple[Path, Path]) -> None:
    a, b = (load_results(p) for p in paths)
    rows = compare(a, b)
    if not rows:
        raise InputError(f"{paths[0]} and {paths[1]} have no measured (stage, backend, precision, batch) row in common")
    Console().print(compare_table(rows, str(paths[0]), str(paths[1])))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=DEFAULT_PRESET, show_default=True,
              help="Models to benchmark (world: the trained shapes world, whose edits are judged; timing does not "
                   "depend on training).")
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Exported artifact folder for the runtime backends; without it the benchmark exports its own.")
@expect_sha256_option
@click.option("--backends", default=",".join(BACKENDS), show_default=True,
              help="Comma-separated backends; those that cannot run here are listed as skipped with the reason.")
@click.option("--stages", default=",".join(TIMED_STAGES), show_default=True, help="Comma-separated stages.")
@click.option("--batch", "batch", default=None,
              help="Comma-separated batch sizes [default: 1,8 on the CPU, 1,8,32 on CUDA].")
@click.option("--precision", default=",".join(DEFAULT_PRECISIONS), show_default=True,
              help=f"Comma-separated precisions of {','.join(PRECISIONS)}; fp16 on the CPU is listed as skipped. "
                   "int8 runs the backends that quantize (OpenVINO on the CPU: the text encoder's weights int8, the "
                   "generator float, ffclip.backends.INT8_MODES) from an int8 export; the others are listed as "
                   "skipped.")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Untimed calls per cell before timing, besides the first (whose output is compared with eager "
                   f"fp32); then more until two consecutive calls that compiled nothing agree within {SETTLE_RATIO:g}x "
                   f"({MAX_WARMUP_CALLS} calls at most); 0: none [default: 1 on the CPU, 5 on CUDA].")
@click.option("--iters", type=click.IntRange(min=1), default=None,
              help="Timed calls per cell [default: as many as --budget allows, at least 3].")
@click.option("--budget", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="Seconds of timed calls per cell when --iters is not given.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of each worker (torch.set_num_threads) [default: torch's choice]; OpenVINO follows it, "
                   "ONNX Runtime keeps its own pool of one thread per core.")
@click.option("--accuracy-num", "accuracy_num", type=click.IntRange(min=0), default=DEFAULT_ACCURACY_NUM,
              show_default=True,
              help="Originals of the shapes world whose edits the judge reads back for the edit accuracy column of "
                   "each backend and precision (world preset, with the edit stage); 0 turns it off.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: artifacts/bench/<preset>-<device>-<time>]; an existing one is replaced "
                   "only when it is empty or an earlier run's (see --force).")
@click.option("--force", is_flag=True, help="Replace --out even when it holds other files than an earlier run's.")
@click.option("--compare", "compare_paths", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, metavar="A.json B.json", help="Print B/A median-latency ratios of two runs and exit.")
@click.option("--serve", "serve_load", is_flag=True,
              help="Load-test `ffclip serve` instead: 8 clients, 48 edits per server, batching against one request at "
                   "a time on 1 and 2 replicas, then 200 simultaneous edits.")
@click.option("--gpu-check", "gpu_check", is_flag=True,
              help="Run the prepared GPU check instead (kernels against float64, mapper and generator forms at batch "
                   "1/8/32, the whole edit, TensorRT graph replay) into --out: gpu_check.json and gpu_check.md.")
@click.option("--dry-run", "dry_run", is_flag=True, help="With --gpu-check: the same checks on the CPU at tiny shapes.")
def bench(preset: str, artifacts: Path | None, expect_sha256: str | None, backends: str, stages: str,
          batch: str | None, precision: str, warmup: int | None, iters: int | None, budget: float,
          threads: int | None, accuracy_num: int, device: str, out: Path | None, force: bool,
          compare_paths: tuple[Path, Path] | None, serve_load: bool, gpu_check: bool, dry_run: bool) -> None:
    """Compare backends on every stage: median/p90/p99 latency, throughput, peak memory, the error against
    eager fp32 on the same inputs and, on the world preset, the judged edit accuracy. Each backend runs in its own
    process. Writes results.json, results.md and latency.png."""
    if dry_run and not gpu_check:
        raise InputError("--dry-run goes with --gpu-check")
    if gpu_check:
        _gpu_check(out, dry_run)
        return
    if compare_paths:
        _compare(compare_paths)
        return
    if serve_load:
        _serve_load(preset, artifacts, expect_sha256, out)
        return
    resolved = resolve_device(device)
    cuda = resolved.type == "cuda"
    if artifacts is not None:
        preset = folder_preset(artifacts, preset, preset_given(), expect_sha256)
    settings = Settings(
        preset=preset,
        device=str(resolved),
        stages=parse_names(stages, TIMED_STAGES, "--stages"),
        backends=parse_names(backends, BACKENDS, "--backends"),
        batches=parse_batches(batch or ("1,8,32" if cuda else "1,8")),
        precisions=parse_names(precision, PRECISIONS, "--precision"),
        warmup=warmup if warmup is not None else (5 if cuda else 1),
        iters=iters,
        budget_s=budget,
        threads=threads,
        artifacts=artifacts,
        expected_sha256=expect_sha256,
        accuracy_num=accuracy_num,
    )
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out or Path("artifacts") / "bench" / f"{preset}-{resolved.type}-{stamp}"
    from ffclip.export.exporter import check_replaceable

    check_replaceable(out, force, is_results_folder, "an ffclip-bench output folder (no results.json it wrote)")
    run(settings, out)


def _gpu_check(out: Path | None, dry_run: bool) -> None:
    from ffclip.benchmarks.gpu_check import check_command

    if out is None:
        raise InputError("--gpu-check needs --out DIR for gpu_check.json and gpu_check.md")
    status = check_command(out, dry_run)
    if status:
        raise SystemExit(status)


def _serve_load(preset: str, artifacts: Path | None, expected_sha256: str | None, out: Path | None) -> None:
    from ffclip.stages import StageSources

    from ffclip.benchmarks.serve_load import Plan, markdown, run_load

    out = out or Path("artifacts") / "bench" / f"serve-{preset}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    results = run_load(StageSources(preset=preset), artifacts, "auto", Plan(), out,
                       lambda message: click.echo(message, err=True), expected_sha256)
    click.echo(markdown(results))
    click.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


Start = Callable[[int], None]
Advance = Callable[[str, int], None]


@contextlib.contextmanager
def progress_reporter(tty: bool | None = None) -> Iterator[tuple[Start, Advance]]:
    """(start(total steps), advance(text, steps done)): a progress bar on a terminal (`tty`, default: whether stderr
    is one), else plain lines on stderr: `[done/total] text` when steps are done, `text ...` when one starts (it
    advances by 0), so each count is shown once."""
    if tty is None:
        tty = Console(stderr=True).is_terminal
    if tty:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("starting", total=None)
            yield (lambda total: progress.update(task, total=total),
                   lambda text, step: progress.update(task, description=text, advance=step))
        return
    state = {"done": 0, "total": 0}

    def advance(text: str, step: int) -> None:
        if step == 0:
            click.echo(f"{text} ...", err=True)
            return
        state["done"] += step
        click.echo(f"[{state['done']}/{state['total']}] {text}", err=True)

    yield lambda total: state.update(total=total), advance


def run(settings: Settings, out: Path) -> dict[str, Any]:
    """Run the benchmark with progress, write the three result files and print the tables (Markdown when stdout is
    not a terminal). Raises `FfclipError` after writing them when no cell was measured."""
    started = time.time()
    with progress_reporter() as (start, advance):
        benchmark = Benchmark(settings, advance)
        start(benchmark.total_steps)
        rows = benchmark.run()
    machine = {**benchmark.machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    results = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": settings.to_dict(),
        "machine": machine,
        "rows": rows,
        "accuracy": benchmark.accuracy(),
    }
    paths = write_results(results, out)
    console = Console()
    if console.is_terminal:
        for table in rich_tables(results):
            console.print(table)
    else:  # a pipe or a file gets every column at full width
        click.echo(markdown(results))
    click.echo(f"wrote {paths['json']}, {paths['md'].name} and {paths['png'].name} in {results['duration_s']:.0f} s")
    if not any(row["status"] == "ok" for row in rows):
        raise FfclipError(f"nothing was measured: every cell was skipped or failed (the reasons are in {paths['md']})")
    return results
