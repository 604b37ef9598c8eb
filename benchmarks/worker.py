"""One benchmark job in its own process: `python -m ffclip.benchmarks.worker JOB.json`.

Jobs (a JSON object, `mode` says which):

- `reference`: build the stages (the preset's, or the eager weights of `artifacts`), make the inputs (prompts,
  latents, text embeddings) for the largest batch, the eager fp32 output of every stage and batch and the fp64 floors,
  and save them with `torch.save` to `output`.
- `export`: export the preset's stages to `output` in `formats` at `precision` with `ffclip.export`.
- `time`: time `cells` of one backend at one precision against the reference file; with `accuracy_num`, then judge
  the backend's edits of that many originals of the shapes world (an `accuracy` event).

Events go to the original stdout as JSON lines; anything else the libraries print is sent to stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ffclip.atomic import atomic_file
from ffclip.errors import FfclipError, summarize as summarize_error
from ffclip.export.parity import errors, float64_referee
from ffclip.runtime import Runtime
from ffclip.world.evaluate import Editor, edit_accuracy

from ffclip.benchmarks.backends import EXPORTED_STAGES, build_modules, call, module_stages, open_stages, stage_flops
from ffclip.benchmarks.machine import cpu_fp32_peak, machine_info
from ffclip.benchmarks.runner import ACCURACY_SEED, ACCURACY_SPLIT, Cell
from ffclip.benchmarks.timing import PeakMemory, release_freed_memory, summarize, time_calls

PROMPTS = (
    "blond hair", "a smiling face", "wearing glasses", "an old person", "curly red hair", "a thick beard",
    "a surprised look", "purple lipstick", "a bald head", "bangs", "a young child", "an angry face",
)
TRUNCATION = 0.7
Emit = Callable[[dict[str, Any]], None]


def batch_inputs(reference: dict[str, Any], batch: int, device: torch.device) -> dict[str, Any]:
    """The first `batch` prompts, latents and embeddings of the reference file, tensors on `device`."""
    return {
        "prompts": list(reference["prompts"][:batch]),
        "latents": reference["latents"][:batch].to(device),
        "embeddings": reference["embeddings"][:batch].to(device),
    }


def max_abs_error(output: torch.Tensor, expected: torch.Tensor) -> float | None:
    """max |output - expected| in float32; None when the output holds NaN or Inf."""
    got = output.detach().float().cpu()
    if not torch.isfinite(got).all():
        return None
    return errors(got, expected)[0]


def prompts_for(batch: int) -> list[str]:
    """`batch` distinct prompts (a runtime that encodes each distinct prompt once still does the whole batch)."""
    return [f"{PROMPTS[i % len(PROMPTS)]}, variant {i // len(PROMPTS)}" for i in range(batch)]


FLOAT64_ROWS = 8  # rows per float64 call, so a large generator at a large batch fits in memory


@torch.inference_mode()
def fp64_floors(
    modules: tuple[Any, Any, Any], reference: dict[str, Any], job: dict[str, Any], device: torch.device
) -> dict[str, float]:
    """max |eager fp32 - eager fp64| of every stage and batch: the rounding noise any correct fp32 path shows. The
    float64 edit runs the whole chain from the prompts; float64 runs once on the rows of the largest batch, and each
    batch is compared with its leading rows."""
    text64, mapper64, generator64 = (float64_referee(m) for m in modules)
    inputs = batch_inputs(reference, max(job["batches"]), device)
    tokens = modules[0].tokenize(inputs["prompts"]).to(device)
    w = inputs["latents"]

    def exact(stage: str, rows: slice) -> torch.Tensor:
        if stage == "text":
            return text64(tokens[rows])
        if stage == "mapper":
            return mapper64(w[rows], inputs["embeddings"][rows])
        if stage == "generator":
            return generator64(w[rows])
        return generator64(mapper64(w[rows], text64(tokens[rows])))

    floors = {}
    for stage in job["stages"]:
        full = torch.cat([exact(stage, slice(i, i + FLOAT64_ROWS)).cpu() for i in range(0, len(w), FLOAT64_ROWS)])
        for batch in job["batches"]:
            floors[f"{stage}/{batch}"] = errors(reference["outputs"][f"{stage}/{batch}"], full[:batch])[0]
    return floors


def make_reference(job: dict[str, Any], emit: Emit) -> None:
    """Inputs and eager fp32 outputs for every stage and batch of the job, saved to `job["output"]`."""
    device = torch.device(job["device"])
    emit({"type": "machine", "machine": machine_info(device)})
    artifacts = Path(job["artifacts"]) if job.get("artifacts") else None
    modules = build_modules(job["preset"], device, artifacts)
    generator = modules[2]
    largest = max(job["batches"])
    prompts = prompts_for(largest)
    z = torch.randn(largest, generator.config.style_dim, generator=torch.Generator().manual_seed(0))
    stages = module_stages(modules, device, "fp32", compiled=False)
    with torch.inference_mode():
        latents = generator.mapping(z.to(device), TRUNCATION).contiguous()
    reference: dict[str, Any] = {"prompts": prompts, "latents": latents.cpu(),
                                 "embeddings": stages.encode_text(prompts).cpu()}
    reference["outputs"] = {
        f"{stage}/{batch}": call(stages, stage, batch_inputs(reference, batch, device)).float().cpu()
        for stage in job["stages"]
        for batch in job["batches"]
    }
    reference["floors"] = fp64_floors(modules, reference, job, device)
    reference["flops"] = stage_flops(stages, batch_inputs(reference, 1, device), job["stages"])
    with atomic_file(job["output"]) as tmp:
        torch.save(reference, tmp)


def export_folder(job: dict[str, Any], emit: Emit) -> None:
    """Export the preset's stages in `job["formats"]` with the exporter's Python API."""
    from ffclip.config import get_preset
    from ffclip.export.exporter import ExportOptions, export_artifacts
    from ffclip.factory import default_source

    batches = sorted(job["batches"])
    options = ExportOptions(
        precision=job["precision"],
        formats=tuple(job["formats"]),
        min_batch=batches[0],
        opt_batch=batches[len(batches) // 2],
        max_batch=batches[-1],
        device=torch.device(job["device"]),
    )
    preset = get_preset(job["preset"])
    export_artifacts(
        build_modules(job["preset"], torch.device("cpu")),
        Path(job["output"]),
        options,
        preset=job["preset"],
        sources={name: default_source(preset, name) for name in EXPORTED_STAGES},
    )


def _failure(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return summarize_error(exc)


def measure(
    stages: Runtime, cell: Cell, reference: dict[str, Any], device: torch.device, job: dict[str, Any]
) -> dict[str, Any]:
    """Time one cell; its first (untimed) call gives the output compared with eager fp32, and the warm-up
    (`time_calls`) follows it."""
    inputs = batch_inputs(reference, cell.batch, device)
    output = call(stages, cell.stage, inputs)
    error = max_abs_error(output, reference["outputs"][f"{cell.stage}/{cell.batch}"])
    del output
    release_freed_memory()
    with PeakMemory(device) as memory:
        timing = time_calls(
            lambda: call(stages, cell.stage, inputs),
            device,
            warmup=job["warmup"],
            iters=job["iters"],
            budget_s=job["budget_s"],
        )
    stats = summarize(timing.samples)
    throughput = cell.batch / (stats.median_ms / 1e3)
    flops = reference.get("flops", {}).get(cell.stage)
    gflops = throughput * flops / 1e9 if flops else None
    peak = cpu_fp32_peak() if device.type == "cpu" else None
    return cell.row(
        "ok",
        None if error is not None else "non-finite values in the output",
        **stats.to_dict(),
        warmup_calls=timing.warmup_calls,
        settled=timing.settled,
        throughput=throughput,
        gflops=gflops,
        peak_frac=gflops / peak["gflops"] if gflops and peak else None,
        memory_mib=memory.peak_mib,
        memory_kind=memory.kind,
        max_abs_err=error,
        floor=reference["floors"].get(f"{cell.stage}/{cell.batch}"),
    )


class ChunkedEditor:
    """`stages` as an editor that runs `rows` rows per call, the last chunk padded with copies of its last row: the
    judge's edits are computed at the batch size the backend was timed at (torch.compile reuses its graph)."""

    def __init__(self, stages: Runtime, rows: int):
        self.stages, self.rows = stages, rows

    def sample_latents(self, num: int, seed: int = 0, truncation: float = 1.0) -> torch.Tensor:
        return self.stages.sample_latents(num, seed, truncation)

    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        return self._chunked(latents, [""] * len(latents), lambda w, _: self.stages.synthesize(w))

    def edit(self, latents: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        prompts = [prompts] * len(latents) if isinstance(prompts, str) else list(prompts)
        return self._chunked(latents, prompts, self.stages.edit)

    def _chunked(self, latents: torch.Tensor, prompts: list[str],
                 run: Callable[[torch.Tensor, list[str]], torch.Tensor]) -> torch.Tensor:
        out = []
        for i in range(0, len(latents), self.rows):
            w, p = latents[i : i + self.rows], prompts[i : i + self.rows]
            pad = self.rows - len(w)
            out.append(run(torch.cat([w, w[-1:].expand(pad, *w.shape[1:])]), p + p[-1:] * pad)[: len(w)])
        return torch.cat(out)


def judge_edits(editor: Editor, num: int) -> dict[str, Any]:
    """An `accuracy` event: the edit accuracy of `editor` in percent (`ffclip.world.evaluate.edit_accuracy` on `num`
    originals), the seconds it took, and why it failed (then the percentage is None)."""
    started = time.perf_counter()
    percent, reason = None, None
    threads = torch.get_num_threads()
    # the judge runs many tiny operations per picture: on a busy CPU, a second thread makes it ten times slower
    torch.set_num_threads(1)
    try:
        percent = 100 * edit_accuracy(editor, num=num, seed=ACCURACY_SEED, split=ACCURACY_SPLIT)
    except Exception as exc:  # reported in the event, so the timed rows stay
        traceback.print_exc()
        reason = _failure(exc)
    finally:
        torch.set_num_threads(threads)
    return {"type": "accuracy", "percent": percent, "seconds": round(time.perf_counter() - started, 2),
            "reason": reason}


def time_cells(job: dict[str, Any], emit: Emit) -> None:
    """Measure every cell of the job's backend, one row event per cell; a cell's failure does not stop the rest.
    With `accuracy_num`, then one `accuracy` event."""
    device = torch.device(job["device"])
    cells = [Cell(**c) for c in job["cells"]]
    reference = torch.load(job["reference"], map_location="cpu", weights_only=True, mmap=True)
    artifacts = Path(job["artifacts"]) if job.get("artifacts") else None
    with contextlib.ExitStack() as stack:
        try:
            stages = stack.enter_context(
                open_stages(job["backend"], job["preset"], device, job["precision"], artifacts, job["expected_sha256"])
            )
        except Exception as exc:  # a backend that cannot start still yields one row per cell
            status = "skipped" if isinstance(exc, FfclipError) else "error"
            for cell in cells:
                emit({"type": "row", "row": cell.row(status, str(exc) if status == "skipped" else _failure(exc))})
            return
        for cell in cells:
            try:
                row = measure(stages, cell, reference, device, job)
            except FfclipError as exc:
                row = cell.row("skipped", str(exc))
            except Exception as exc:  # reported in the row, so one broken cell leaves the others measurable
                traceback.print_exc()
                row = cell.row("error", _failure(exc))
            emit({"type": "row", "row": row})
        if job.get("accuracy_num"):
            emit(judge_edits(ChunkedEditor(stages, max(job["batches"])), job["accuracy_num"]))


MODES: dict[str, Callable[[dict[str, Any], Emit], None]] = {
    "reference": make_reference,
    "export": export_folder,
    "time": time_cells,
}


def _event_stream() -> TextIO:
    """A private handle on the original stdout; fd 1 is pointed at stderr so stray prints cannot corrupt events."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return stream


def main(argv: list[str] | None = None) -> None:
    """Run the job file named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m ffclip.benchmarks.worker JOB.json")
    job = json.loads(Path(args[0]).read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    events = _event_stream()

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")

    try:
        MODES[job["mode"]](job, emit)
    except Exception as exc:
        traceback.print_exc()
        print(_failure(exc), file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        events.close()


if __name__ == "__main__":
    main()
