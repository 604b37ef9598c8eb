"""Results: `results.json`, the Markdown and rich tables, `latency.png`, and the comparison of two result files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.table import Table

from ffclip.atomic import atomic_dir, atomic_file
from ffclip.errors import InputError

from ffclip.benchmarks.backends import BACKENDS, TIMED_STAGES
from ffclip.benchmarks.timing import SETTLE_RATIO, UNSTABLE_SPREAD

FORMAT = "ffclip-bench"
FORMAT_VERSION = 1
KEY = ("stage", "backend", "precision", "batch")
LEGEND = (
    "items/s: prompts (text), latents (mapper) or images (generator, edit) per second at the median latency; "
    "max err: max |output - eager fp32 output| on the same inputs (for fp16 and bf16 generator and edit rows, the "
    "image error against float32, images in [-1, 1]: one uint8 level is 7.8e-3); floor: max |eager fp32 - eager fp64| "
    "on the same inputs (the edit's float64 runs the whole chain from the prompts), the rounding noise a correct fp32 "
    "path shows; % peak: GFLOP/s (convolutions and matrix products of the eager stage, per item, times items/s) over "
    "the CPU's estimated fp32 peak; p90/med: p90 over median latency, marked ! above {unstable:g}: the calls did not "
    "settle (a recompilation or a busy machine), so the median of that cell is not to be trusted; each cell's timed "
    "calls follow a warm-up that lasts until two consecutive calls that compiled nothing agree within {settle:g}x; "
    "mem: {memory}."
)


def fmt_ms(value: float | None) -> str:
    """A latency in milliseconds with about three significant digits."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2e}"


def fmt_rate(value: float | None) -> str:
    """A throughput with about three significant digits."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def fmt_error(value: float | None) -> str:
    """An error figure in scientific notation."""
    return "-" if value is None else f"{value:.1e}"


def fmt_spread(row: dict[str, Any]) -> str:
    """A row's p90 over its median, marked "!" when the row is flagged unstable."""
    if row.get("spread") is None:  # a file written before the column existed
        return "-"
    return f"{row['spread']:.2f}" + (" !" if row.get("unstable") else "")


def _order(value: str, known: tuple[str, ...]) -> int:
    return known.index(value) if value in known else len(known)


def _sort_key(row: dict[str, Any]) -> tuple:
    return _order(row["stage"], TIMED_STAGES), row["batch"], row["precision"], _order(row["backend"], BACKENDS)


def measured(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a measurement, by stage, batch, precision and backend."""
    return sorted((r for r in rows if r["status"] == "ok"), key=_sort_key)


def unmeasured(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Skipped and failed rows folded into one line per backend, precision, status and reason."""
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row["status"] == "ok":
            continue
        key = (row["backend"], row["precision"], row["status"], row["reason"])
        group = groups.setdefault(key, {"backend": key[0], "precision": key[1], "status": key[2], "reason": key[3],
                                        "stages": [], "batches": []})
        if row["stage"] not in group["stages"]:
            group["stages"].append(row["stage"])
        if row["batch"] not in group["batches"]:
            group["batches"].append(row["batch"])
    return list(groups.values())


MEASURED_HEADER = ("stage", "backend", "prec", "batch", "median ms", "p90 ms", "p99 ms", "p90/med", "n", "items/s",
                   "% peak", "mem MiB", "max err", "floor", "edit acc %")


def measured_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """The printed cells of one measured row, in `MEASURED_HEADER` order."""
    error = fmt_error(row["max_abs_err"]) if row["reason"] is None else row["reason"]
    return (
        row["stage"], row["backend"], row["precision"], str(row["batch"]), fmt_ms(row["median_ms"]),
        fmt_ms(row["p90_ms"]), fmt_ms(row["p99_ms"]), fmt_spread(row), str(row["n"]), fmt_rate(row["throughput"]),
        "-" if row.get("peak_frac") is None else f"{100 * row['peak_frac']:.1f}",
        "-" if row["memory_mib"] is None else f"{row['memory_mib']:.1f}", error, fmt_error(row.get("floor")),
        "-" if row.get("edit_accuracy") is None else f"{row['edit_accuracy']:.1f}",
    )


def _md_table(header: Iterable[str], body: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _unmeasured_cells(group: dict[str, Any]) -> tuple[str, ...]:
    return (group["backend"], group["precision"], group["status"], ",".join(group["stages"]),
            ",".join(map(str, group["batches"])), group["reason"] or "")


UNMEASURED_HEADER = ("backend", "precision", "status", "stages", "batches", "reason")


def machine_lines(results: dict[str, Any]) -> list[str]:
    """One line each for the run, the CPU, the GPU and the library versions."""
    m, s = results["machine"], results["settings"]
    gpu = m.get("gpu")
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    return [
        f"run: {results['created']}, preset {s['preset']}, device {s['device']}, warm-up {s['warmup']}, "
        + (f"{s['iters']} iterations" if s["iters"] else f"{s['budget_s']:g} s per cell (at least 3 iterations)"),
        f"CPU: {m.get('cpu')}, {m.get('cpu_cores_logical')} logical cores, torch threads {m.get('torch_threads')}, "
        f"load average at start {m.get('load_average')}",
        f"CPU flags: {' '.join(m.get('cpu_flags') or []) or 'unknown'}; fp32 peak " + _peak(m.get("cpu_fp32_peak")),
        "GPU: "
        + (f"{gpu['name']} ({gpu['memory_gib']} GiB, driver {gpu['driver']}, CUDA {gpu['cuda_runtime']})" if gpu else "none"),
        f"python {m.get('python')}; {versions}",
    ]


def _peak(peak: dict[str, Any] | None) -> str:
    return f"{peak['gflops']:g} GFLOP/s, estimated as {peak['how']}" if peak else "unknown"


def legend(results: dict[str, Any]) -> str:
    """What the throughput, error, memory and edit accuracy columns mean in this run."""
    kinds = sorted({r["memory_kind"] for r in results["rows"] if r.get("memory_kind")})
    memory = " / ".join(kinds) or "n/a"
    if "rss growth" in kinds:
        memory += " (resident-set growth of the worker process over its size before the cell)"
    legend = LEGEND.format(memory=memory, unstable=UNSTABLE_SPREAD, settle=SETTLE_RATIO)
    return " ".join([legend, *unstable_notes(results), *accuracy_notes(results)])


def unstable_notes(results: dict[str, Any]) -> list[str]:
    """One sentence naming the measured cells flagged unstable, when any."""
    flagged = [r for r in measured(results["rows"]) if r.get("unstable")]
    if not flagged:
        return []
    names = ", ".join(f"{r['stage']} {r['backend']} {r['precision']} batch {r['batch']}" for r in flagged)
    return [f"Unstable (p90 above {UNSTABLE_SPREAD:g}x the median): {names}."]


def accuracy_notes(results: dict[str, Any]) -> list[str]:
    """What the edit accuracy column holds in this run, or why it shows "-", and the backends it failed on."""
    accuracy = results.get("accuracy")
    if not accuracy:  # a file written before the column existed
        return []
    if accuracy["skipped"]:
        return [f"edit acc %: not judged ({accuracy['skipped']})."]
    seconds = sum(accuracy["seconds"].values())
    notes = [f"edit acc %: the share of edits that reach the value asked, as ffclip.world.judge reads it from the "
             f"pixels, mean over the four attributes; each valid one of {accuracy['num']} seeded originals (seed "
             f"{accuracy['seed']}) is edited once per attribute towards a value it lacks, in {accuracy['split']} "
             f"phrasings, at the run's largest batch; judged once per backend and precision and shown on its edit rows "
             f"({seconds:.0f} s in all)."]
    notes += [f"The edits of {name} were not judged: {reason}." for name, reason in accuracy["failures"].items()]
    return notes


def markdown(results: dict[str, Any]) -> str:
    """The whole run as Markdown: machine, measured table, and the skipped or failed combinations."""
    parts = ["# ffclip-bench results", "", *[f"- {line}" for line in machine_lines(results)], ""]
    rows = measured(results["rows"])
    parts += [_md_table(MEASURED_HEADER, map(measured_cells, rows)) if rows else "No cell was measured.", ""]
    parts += [legend(results), ""]
    groups = unmeasured(results["rows"])
    if groups:
        parts += ["## Not measured", "", _md_table(UNMEASURED_HEADER, map(_unmeasured_cells, groups)), ""]
    return "\n".join(parts)


def rich_tables(results: dict[str, Any]) -> list[Table]:
    """The measured table and, when any, the table of skipped or failed combinations, for printing with rich."""
    table = Table(title=f"ffclip-bench: {results['settings']['preset']} on {results['settings']['device']}")
    for name in MEASURED_HEADER:
        table.add_column(name, justify="left" if name in KEY[:3] else "right")
    for row in measured(results["rows"]):
        table.add_row(*measured_cells(row))
    table.caption = legend(results)
    tables = [table]
    groups = unmeasured(results["rows"])
    if groups:
        other = Table(title="not measured")
        for name in UNMEASURED_HEADER:
            other.add_column(name)
        for group in groups:
            other.add_row(*_unmeasured_cells(group))
        tables.append(other)
    return tables


def plot_latency(results: dict[str, Any], path: Path) -> None:
    """One subplot per stage: median latency (log scale) per batch, the series side by side, p90 as a whisker.
    A series (backend and precision) keeps its colour in every subplot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = measured(results["rows"])
    stages = [s for s in results["settings"]["stages"] if any(r["stage"] == s for r in rows)] or ["(none measured)"]
    by_series = sorted(rows, key=lambda r: (r["precision"], _order(r["backend"], BACKENDS)))
    series = list(dict.fromkeys((r["backend"], r["precision"]) for r in by_series))
    colours = dict(zip(series, plt.get_cmap("tab10").colors * (1 + len(series) // 10)))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        stage_rows = [r for r in rows if r["stage"] == stage]
        batches = sorted({r["batch"] for r in stage_rows})
        present = [s for s in series if any((r["backend"], r["precision"]) == s for r in stage_rows)]
        width = 0.8 / max(1, len(present))
        for i, key in enumerate(present):
            points = {r["batch"]: r for r in stage_rows if (r["backend"], r["precision"]) == key}
            xs = [j + (i - (len(present) - 1) / 2) * width for j, b in enumerate(batches) if b in points]
            med = [points[b]["median_ms"] for b in batches if b in points]
            upper = [points[b]["p90_ms"] - points[b]["median_ms"] for b in batches if b in points]
            ax.bar(xs, med, width, yerr=[[0] * len(med), upper], capsize=2, color=colours[key], label=" ".join(key))
        if stage_rows:
            low = min(r["median_ms"] for r in stage_rows)
            high = max(r["p90_ms"] for r in stage_rows)
            ax.set_yscale("log")
            ax.set_ylim(10 ** math.floor(math.log10(low) - 0.3), 10 ** math.ceil(math.log10(high) + 0.05))
        ax.set_title(stage)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("median latency (ms), whisker to p90")
    handles = [Patch(color=colours[key], label=" ".join(key)) for key in series]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize="small")
    s = results["settings"]
    fig.suptitle(f"ffclip-bench: {s['preset']} on {s['device']}, {results['created']}")
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 1))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


RESULT_FILES = {"json": "results.json", "md": "results.md", "png": "latency.png"}


def write_results(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write results.json, results.md and latency.png as the folder `out`, which appears whole, replacing an older
    one, or not at all; return their paths."""
    with atomic_dir(out) as tmp:
        (tmp / RESULT_FILES["json"]).write_text(json.dumps(results, indent=2) + "\n")
        (tmp / RESULT_FILES["md"]).write_text(markdown(results))
        plot_latency(results, tmp / RESULT_FILES["png"])
    return {kind: out / name for kind, name in RESULT_FILES.items()}


def is_results_folder(folder: Path) -> bool:
    """Whether `folder` holds a results.json that ffclip-bench wrote."""
    try:
        load_results(folder / RESULT_FILES["json"])
    except InputError:
        return False
    return True


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json written by ffclip-bench; anything else is refused with one line."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{path}: cannot read it as JSON ({exc.__class__.__name__}); pass a results.json written by ffclip-bench"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("rows"), list):
        raise InputError(f"{path}: not a results.json written by ffclip-bench (no '{FORMAT}' format marker or rows)")
    if data.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{path}: results format version {data.get('format_version')}; this ffclip-bench reads {FORMAT_VERSION}"
        )
    return data


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured rows present in both runs, with `ratio` = B median / A median (below 1: B is faster)."""
    a_rows = {tuple(r[k] for k in KEY): r for r in a["rows"] if r["status"] == "ok"}
    out = []
    for row in measured(b["rows"]):
        key = tuple(row[k] for k in KEY)
        if key in a_rows:
            a_ms, b_ms = a_rows[key]["median_ms"], row["median_ms"]
            ratio = b_ms / a_ms if a_ms > 0 else math.inf
            out.append({**dict(zip(KEY, key)), "a_ms": a_ms, "b_ms": b_ms, "ratio": ratio})
    return out


def compare_table(rows: list[dict[str, Any]], a_name: str, b_name: str) -> Table:
    """The comparison as a rich table."""
    table = Table(title=f"B/A median latency (A = {a_name}, B = {b_name}; below 1: B is faster)")
    for name in ("stage", "backend", "precision", "batch", "A median ms", "B median ms", "B/A"):
        table.add_column(name, justify="left" if name in KEY[:3] else "right")
    for r in rows:
        table.add_row(r["stage"], r["backend"], r["precision"], str(r["batch"]), fmt_ms(r["a_ms"]), fmt_ms(r["b_ms"]),
                      f"{r['ratio']:.3f}")
    return table
