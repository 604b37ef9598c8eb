"""The benchmark plan (one cell per stage, backend, precision and batch) and its execution, one subprocess per backend.

The parent never loads a model. A reference job computes the inputs and eager fp32 outputs once and writes them to a
file in a temporary folder; an export job writes the artifacts the runtime backends need when none were given; then
each backend runs in a fresh `python -m ffclip.benchmarks.worker` process that reads the reference file and streams
one result row per cell. The temporary folder and any live worker are removed on every exit path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ffclip.artifacts import STAGES as EXPORTED_STAGES
from ffclip.backends import QUANTIZED_PRECISIONS
from ffclip.engines import engine_class

from ffclip.benchmarks.backends import RUNTIME_BACKENDS, export_group, skip_reason
from ffclip.benchmarks.machine import machine_info

ROW_FIELDS = (
    "stage", "backend", "precision", "batch", "status", "reason", "n",
    "median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "spread", "unstable", "warmup_calls", "settled",
    "throughput", "gflops", "peak_frac", "memory_mib", "memory_kind",
    "max_abs_err", "floor", "edit_accuracy",
)
# the edit accuracy column: the shapes world's judge (`ffclip.world.evaluate.edit_accuracy`) on phrasings no stage
# trained on, on seeded originals, once per backend and precision
ACCURACY_SEED = 0
ACCURACY_SPLIT = "held-out"
DEFAULT_ACCURACY_NUM = 32


@dataclass(frozen=True)
class Cell:
    """One measurement: a stage run by a backend at a precision and batch size."""

    stage: str
    backend: str
    precision: str
    batch: int

    def row(self, status: str, reason: str | None = None, **values: Any) -> dict[str, Any]:
        """A result row for this cell; fields not given are None."""
        row = dict.fromkeys(ROW_FIELDS)
        row.update(asdict(self), status=status, reason=reason, **values)
        return row


@dataclass(frozen=True)
class Settings:
    """Everything that decides what is measured and how."""

    preset: str
    device: str
    stages: tuple[str, ...]
    backends: tuple[str, ...]
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    warmup: int
    iters: int | None
    budget_s: float
    threads: int | None = None
    artifacts: Path | None = None
    expected_sha256: str | None = None  # the pin of `artifacts`
    accuracy_num: int = DEFAULT_ACCURACY_NUM

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["artifacts"] = str(self.artifacts) if self.artifacts else None
        return data


def plan(settings: Settings) -> tuple[dict[str, list[Cell]], list[dict[str, Any]]]:
    """The cells to run, grouped by backend, and a skipped row (with its reason) for every cell that cannot run."""
    device = torch.device(settings.device)
    runnable: dict[str, list[Cell]] = {}
    skipped: list[dict[str, Any]] = []
    for backend in settings.backends:
        for precision in settings.precisions:
            reason = skip_reason(backend, precision, device)
            for stage in settings.stages:
                for batch in settings.batches:
                    cell = Cell(stage, backend, precision, batch)
                    if reason is None:
                        runnable.setdefault(backend, []).append(cell)
                    else:
                        skipped.append(cell.row("skipped", reason))
    return runnable, skipped


def unjudged_reason(settings: Settings) -> str | None:
    """Why the run's edits get no edit accuracy, or None when every backend and precision is judged."""
    if settings.accuracy_num == 0:
        return "--accuracy-num 0"
    if settings.preset != "world":
        return f"the judge reads the shapes world's pictures, and the {settings.preset} preset draws other ones"
    if "edit" not in settings.stages:
        return "it judges the edit stage, which this run does not benchmark"
    return None


Progress = Callable[[str, int], None]

def held_precision(manifest: dict[str, Any], backend: str) -> str:
    """The precision a runtime backend computes in from an exported folder, as the export recorded it for the text
    encoder and the generator (the mapper computes in fp32 everywhere): a quantized precision when either stage
    computes it (the policy keeps the other stages float), else "mixed" when they differ."""
    artifact = engine_class(backend).artifact
    held = {manifest["stages"][stage].get("compute_precision", {}).get(artifact, "fp32")
            for stage in ("text_encoder", "generator")}
    quantized = held.intersection(QUANTIZED_PRECISIONS)
    if quantized:
        return quantized.pop()
    return held.pop() if len(held) == 1 else "mixed"


def missing_artifacts(manifest: dict[str, Any], backend: str) -> str | None:
    """What the export recorded for the format a runtime backend serves, when a stage of the edit lacks its file
    (such as `skipped: <reason>`), or None when every stage holds it."""
    artifact = engine_class(backend).artifact
    for stage in EXPORTED_STAGES:
        entry = manifest["stages"][stage]
        if artifact not in entry["files"]:
            return f"{stage} {artifact}: " + entry.get("status", {}).get(artifact, "not built")
    return None


class WorkerFailed(RuntimeError):
    """A worker process that exited with an error before finishing its job."""


def run_worker(job: dict[str, Any], folder: Path, name: str) -> Iterator[dict[str, Any]]:
    """Run one worker job in a fresh Python process and yield its events as they arrive.

    The worker's stderr goes to `<folder>/<name>.log`; a failed exit raises `WorkerFailed` with the log's last line.
    """
    job_path = folder / f"{name}.json"
    job_path.write_text(json.dumps(job))
    log_path = folder / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ffclip.benchmarks.worker", str(job_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                yield json.loads(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if code < 0:
        raise WorkerFailed(f"killed by signal {-code} (out of memory?)")
    if code != 0:
        raise WorkerFailed(last_line(log_path) or f"exited with status {code}")


def last_line(path: Path) -> str | None:
    """The last non-empty line of a text file (a worker's error), or None."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else None


class Benchmark:
    """Runs a plan: reference outputs, artifacts when needed, then every backend in its own process."""

    def __init__(self, settings: Settings, progress: Progress = lambda text, advance: None):
        self.settings = settings
        self.progress = progress
        self.machine: dict[str, Any] = {}
        self.runnable, self.skipped = plan(settings)
        self.judged = unjudged_reason(settings) is None
        # seconds the judge took, and why it failed, per "backend precision"
        self.judge_seconds: dict[str, float] = {}
        self.judge_failures: dict[str, str] = {}
        self.given: dict[str, Any] | None = None
        if settings.artifacts is not None:
            from ffclip.artifacts import read_manifest

            self.given = read_manifest(settings.artifacts, verify=False)

    def _exports_needed(self) -> list[tuple[str, tuple[str, ...]]]:
        """(precision, formats) of every export folder the runtime backends need; none when artifacts were given."""
        if self.settings.artifacts is not None:
            return []
        backends = [b for b in self.runnable if b in RUNTIME_BACKENDS]
        needed = {(c.precision, export_group(backends, b)) for b in backends for c in self.runnable[b]}
        return sorted(needed)

    def _groups(self) -> Iterator[tuple[str, str, list[Cell]]]:
        """(backend, precision, cells) of every runnable backend and precision, in the order they run."""
        for backend, cells in self.runnable.items():
            for precision in sorted({c.precision for c in cells}):
                yield backend, precision, [c for c in cells if c.precision == precision]

    def _group_steps(self, cells: list[Cell]) -> int:
        """Progress steps of one backend at one precision: one per cell, and one for judging its edits."""
        return len(cells) + (1 if self.judged else 0)

    @property
    def total_steps(self) -> int:
        """Progress steps: the reference job, every export and every group's steps (`_group_steps`)."""
        groups = sum(self._group_steps(cells) for _, _, cells in self._groups())
        return 1 + len(self._exports_needed()) + groups if groups else 0

    def accuracy(self) -> dict[str, Any]:
        """How the edit accuracy column was judged: originals, seed, phrasings, why it was not (`skipped`), the
        judge's seconds per backend and precision, and the failures."""
        s = self.settings
        return {"num": s.accuracy_num, "seed": ACCURACY_SEED, "split": ACCURACY_SPLIT,
                "skipped": unjudged_reason(s), "seconds": self.judge_seconds, "failures": self.judge_failures}

    def _job(self, mode: str, **extra: Any) -> dict[str, Any]:
        s = self.settings
        return {
            "mode": mode,
            "preset": s.preset,
            "device": s.device,
            "stages": list(s.stages),
            "batches": list(s.batches),
            "warmup": s.warmup,
            "iters": s.iters,
            "budget_s": s.budget_s,
            "threads": s.threads,
            "artifacts": str(s.artifacts) if s.artifacts else None,
            "accuracy_num": s.accuracy_num if self.judged else 0,
            **extra,
        }

    def run(self) -> list[dict[str, Any]]:
        """All rows: measured, failed and skipped."""
        if not self.runnable:
            self.machine = machine_info(torch.device(self.settings.device))
            return list(self.skipped)
        folder = Path(tempfile.mkdtemp(prefix="ffclip-bench-"))
        try:
            return self._run(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self, folder: Path) -> list[dict[str, Any]]:
        reference = folder / "reference.pt"
        self.progress("eager fp32 reference", 0)
        for event in run_worker(self._job("reference", output=str(reference)), folder, "reference"):
            if event["type"] == "machine":
                self.machine = event["machine"]
        self.progress("eager fp32 reference", 1)
        exports = self._export(folder)
        rows: list[dict[str, Any]] = []
        for backend, precision, group in self._groups():
            source = self._source(backend, precision, exports)
            if isinstance(source, tuple):
                rows.extend(c.row(*source) for c in group)
                self.progress(f"{backend} {precision}", self._group_steps(group))
            else:
                rows.extend(self._time(backend, precision, group, reference, source, folder))
        return rows + self.skipped

    def _export(self, folder: Path) -> dict[tuple[str, tuple[str, ...]], Path | str]:
        """Export every folder needed: its path, or why the export failed."""
        out: dict[tuple[str, tuple[str, ...]], Path | str] = {}
        for precision, formats in self._exports_needed():
            name = f"artifacts-{precision}-{'-'.join(formats)}"
            self.progress(f"exporting {precision} {','.join(formats)}", 0)
            try:
                job = self._job("export", output=str(folder / name), precision=precision, formats=list(formats))
                for _ in run_worker(job, folder, name):
                    pass
                out[precision, formats] = folder / name
            except WorkerFailed as exc:
                out[precision, formats] = f"export failed: {exc}"
            self.progress(f"exporting {precision} {','.join(formats)}", 1)
        return out

    def _source(
        self, backend: str, precision: str, exports: dict[tuple[str, tuple[str, ...]], Path | str]
    ) -> Path | None | tuple[str, str]:
        """The artifact folder a backend's cells run from (None: the preset's modules), or (status, reason) when
        they cannot run."""
        given = self.settings.artifacts
        if given is not None:
            if backend not in RUNTIME_BACKENDS:
                return given
            missing = missing_artifacts(self.given, backend)
            if missing is not None:
                return "skipped", (f"{given} holds no {backend} artifacts ({missing}); export {precision} ones for "
                                   "this row")
            held = held_precision(self.given, backend)
            if precision != held:
                return "skipped", f"{given} holds {held} {backend} artifacts; export {precision} ones for this row"
            return given
        if backend not in RUNTIME_BACKENDS:
            return None
        backends = [b for b in self.runnable if b in RUNTIME_BACKENDS]
        source = exports.get((precision, export_group(backends, backend)), "artifacts missing")
        return ("error", source) if isinstance(source, str) else source

    def _time(
        self, backend: str, precision: str, cells: list[Cell], reference: Path, artifacts: Path | None, folder: Path
    ) -> list[dict[str, Any]]:
        """Run one backend's cells at one precision in a fresh worker; cells it never reported become error rows.
        When the run is judged, the worker then judges the backend's edits and every edit row gets the accuracy."""
        job = self._job(
            "time",
            backend=backend,
            precision=precision,
            reference=str(reference),
            artifacts=str(artifacts) if artifacts else None,
            expected_sha256=self.settings.expected_sha256 if artifacts == self.settings.artifacts else None,
            cells=[asdict(c) for c in cells],
        )
        rows: list[dict[str, Any]] = []
        name = f"{backend} {precision}"
        self.progress(f"{name}: starting", 0)
        steps = 0  # advanced so far, of `_group_steps(cells)`
        accuracy_seen = False
        try:
            for event in run_worker(job, folder, f"{backend}-{precision}"):
                if event["type"] == "accuracy":
                    accuracy_seen = True
                    self._judged(name, event, rows)
                    self.progress(f"{name}: judged", 1)
                    steps += 1
                    continue
                rows.append(event["row"])
                self.progress(f"{name} {event['row']['stage']} b{event['row']['batch']}", 1)
                steps += 1
                if self.judged and len(rows) == len(cells):
                    self.progress(f"{name}: judging the edits of {self.settings.accuracy_num} originals", 0)
        except WorkerFailed as exc:
            done = {(r["stage"], r["batch"]) for r in rows}
            missing = [c for c in cells if (c.stage, c.batch) not in done]
            rows.extend(c.row("error", f"worker failed: {exc}") for c in missing)
            if self.judged and not accuracy_seen and not missing:
                self.judge_failures[name] = f"worker failed: {exc}"
        left = self._group_steps(cells) - steps  # cells a dead worker never reported, and a judging that never came
        if left:
            self.progress(name, left)
        return rows

    def _judged(self, name: str, event: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Record one accuracy event of backend and precision `name`: the percentage on its edit rows."""
        self.judge_seconds[name] = event["seconds"]
        if event["reason"] is not None:
            self.judge_failures[name] = event["reason"]
        for row in rows:
            if row["stage"] == "edit" and row["status"] == "ok":
                row["edit_accuracy"] = event["percent"]
