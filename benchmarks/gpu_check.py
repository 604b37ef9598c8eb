"""The prepared GPU check: `ffclip-bench --gpu-check --out DIR`, or `make gpu-check` with the machine's own Python.

One run on one CUDA machine, in a few minutes, with random weights of the real widths (no downloads): every Triton
kernel against its float64 reference (fp32, fp16, bf16); the mapper and the 1024 generator in eager, torch.compile, a
CUDA graph and the Triton form at batch 1, 8 and 32; the whole edit at batch 1; and, where TensorRT is installed, an
engine's CUDA-graph replay. `gpu_check.json` is rewritten after every check, so a run cut short keeps what it
measured; `gpu_check.md` holds the table. `--dry-run` runs the same checks on the CPU at tiny shapes, the kernels in
Triton's interpreter and CUDA graphs recorded as skipped.

Run as a file (`python3 benchmarks/gpu_check.py`) it needs no installation, only torch and triton (older releases
included) and the packages the models import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# relative max error against float64 per compute dtype (TF32 for the fp32 kernel GEMM counts as fp16-like)
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}
# the fp16 generator against the fp32 one through every layer
MODEL_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 2e-1}


@dataclass(frozen=True)
class Plan:
    """What one run checks: shapes, batch sizes, dtypes and timing effort."""

    device: torch.device
    dry_run: bool
    kernel_dtypes: tuple[str, ...]
    generator_dtype: str
    batches: tuple[int, ...]
    layers: tuple[tuple[str, int, int, int, int, bool], ...]  # label, c_in, c_out, size, ksize, up
    mapper_layers: int
    mapper_dim: int
    generator: Any  # GeneratorConfig
    warmup: int
    iters: int
    budget_s: float

    @classmethod
    def make(cls, dry_run: bool, budget_s: float) -> "Plan":
        from ffclip.config import GeneratorConfig

        if dry_run:
            return cls(torch.device("cpu"), True, ("fp32", "fp16"), "fp32", (1, 2),
                       (("conv3", 8, 8, 4, 3, False), ("up", 8, 4, 2, 3, True), ("torgb", 4, 3, 4, 1, False)),
                       2, 16, GeneratorConfig(resolution=8, n_mlp=1, channels={"4": 8, "8": 4}),
                       0, 1, budget_s)
        return cls(torch.device("cuda"), False, ("fp32", "fp16", "bf16"), "fp16", (1, 8, 32),
                   (("conv3", 512, 512, 64, 3, False), ("conv3", 128, 128, 256, 3, False),
                    ("up", 512, 256, 64, 3, True), ("torgb", 32, 3, 1024, 1, False)),
                   18, 512, GeneratorConfig(), 3, 10, budget_s)


@dataclass
class Check:
    group: str
    name: str
    run: Callable[[], dict[str, Any]]
    result: dict[str, Any] = field(default_factory=dict)


def _median_ms(fn: Callable[[], Any], plan: Plan) -> float:
    from ffclip.benchmarks.timing import summarize, time_calls

    timing = time_calls(fn, plan.device, warmup=plan.warmup, iters=plan.iters, budget_s=0.0)
    return summarize(timing.samples).median_ms


def kernel_checks(plan: Plan) -> list[Check]:
    """Each modulated-convolution layer kind and the mapper kernels against float64, timed against their references."""
    from ffclip import kernels
    from ffclip.backends import PRECISIONS
    from ffclip.export.parity import errors

    checks = []
    for dname in plan.kernel_dtypes:
        for label, c_in, c_out, size, ksize, up in plan.layers:
            def run(c_in=c_in, c_out=c_out, size=size, ksize=ksize, up=up, dname=dname) -> dict[str, Any]:
                dtype, dev = PRECISIONS[dname], plan.device
                g = torch.Generator().manual_seed(0)
                out_size = 2 * size if up else size
                x = torch.randn(1, c_in, size, size, generator=g)
                w = torch.randn(c_out, c_in, ksize, ksize, generator=g)
                s = torch.randn(1, c_in, generator=g) + 1
                opts: dict[str, Any] = {"bias": torch.randn(c_out, generator=g), "up": up}
                if ksize == 1:
                    opts.update(demodulate=False, residual=torch.randn(1, c_out, out_size, out_size, generator=g))
                else:
                    opts.update(noise=torch.randn(1, 1, out_size, out_size, generator=g), noise_strength=0.5,
                                activation="lrelu")
                ref = kernels.modulated_conv2d_reference(
                    x.double(), w.double(), s.double(),
                    **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in opts.items()})
                on = {k: v.to(dev, dtype) if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
                xd = x.to(dev, dtype).to(memory_format=torch.channels_last)
                wd, sd = w.to(dev, dtype), s.to(dev, dtype)
                fused = lambda: kernels.modulated_conv2d(xd, wd, sd, **on)  # noqa: E731
                eager = lambda: kernels.modulated_conv2d_reference(xd, wd, sd, **on)  # noqa: E731
                err = errors(fused(), ref)[1]
                return {"rel_err": err, "tolerance": TOLERANCE[dname], "ok": err <= TOLERANCE[dname],
                        "ms": _median_ms(fused, plan), "eager_ms": _median_ms(eager, plan)}

            if dname == "bf16" and plan.dry_run:
                continue
            checks.append(Check("kernel", f"modconv {label} {c_in}->{c_out} @{size} {dname}", run))

    def attention() -> dict[str, Any]:
        g = torch.Generator().manual_seed(1)
        n, d = plan.mapper_layers, plan.mapper_dim
        q2, w, m, e = (torch.randn(*shape, generator=g) for shape in ((1, n, d), (n, 1), (1, d), (1, d)))
        ref = kernels.channel_attention_reference(q2.double(), w.double(), m.double(), e=e.double())
        q2, w, m, e = (t.to(plan.device) for t in (q2, w, m, e))
        fused = lambda: kernels.channel_attention(q2, w, m, e=e)  # noqa: E731
        eager = lambda: kernels.channel_attention_reference(q2, w, m, e=e)  # noqa: E731
        err = errors(fused(), ref)[1]
        return {"rel_err": err, "tolerance": TOLERANCE["fp32"], "ok": err <= TOLERANCE["fp32"],
                "ms": _median_ms(fused, plan), "eager_ms": _median_ms(eager, plan)}

    def block() -> dict[str, Any]:
        from ffclip.models.mapper import MapperBlock

        torch.manual_seed(2)
        n, d = plan.mapper_layers, plan.mapper_dim
        module = MapperBlock(n, d).double()
        x, e = torch.randn(1, n, d, dtype=torch.float64), torch.randn(1, 1, d, dtype=torch.float64)
        with torch.no_grad():
            ref = module(x, e)
            module = module.float().to(plan.device)
            x, e = x.float().to(plan.device), e.float().to(plan.device)
            fused = lambda: module(x, e, "triton")  # noqa: E731
            err = errors(fused(), ref)[1]
            return {"rel_err": err, "tolerance": TOLERANCE["fp32"], "ok": err <= TOLERANCE["fp32"],
                    "ms": _median_ms(fused, plan), "eager_ms": _median_ms(lambda: module(x, e), plan)}

    checks.append(Check("kernel", f"channel attention L={plan.mapper_layers} D={plan.mapper_dim} fp32", attention))
    checks.append(Check("kernel", f"mapper block L={plan.mapper_layers} D={plan.mapper_dim} fp32", block))
    return checks


def _forms(plan: Plan) -> tuple[str, ...]:
    return ("eager", "compile", "cuda_graph", "triton")


def _runner(form: str, call: Callable[[], torch.Tensor], plan: Plan) -> Callable[[], torch.Tensor]:
    """`call` run as `form`: plain, through torch.compile, or replayed from a CUDA graph captured after warm-up."""
    if form in ("eager", "triton"):
        return call
    if form == "compile":
        compiled = torch.compile(call, backend="eager" if plan.dry_run else "inductor")
        return compiled
    if plan.device.type != "cuda":
        raise _Skip("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class _Skip(Exception):
    """A check that cannot run here; its message says why."""


def model_checks(plan: Plan) -> list[Check]:
    """The mapper (fp32) and the generator (`plan.generator_dtype`) in every form at every batch, against eager."""
    from ffclip.backends import PRECISIONS
    from ffclip.config import MapperConfig
    from ffclip.export.parity import errors
    from ffclip.factory import build_generator, build_mapper

    state: dict[str, Any] = {}

    def models() -> tuple[Any, Any]:
        if not state:
            dtype = PRECISIONS[plan.generator_dtype]
            state["mapper"] = build_mapper(MapperConfig(num_ws=plan.mapper_layers, dim=plan.mapper_dim), seed=3).to(plan.device).eval()
            state["generator"] = build_generator(plan.generator, seed=4).to(plan.device, dtype).eval()
        return state["mapper"], state["generator"]

    checks = []
    for stage in ("mapper", "generator"):
        for batch in plan.batches:
            for form in _forms(plan):
                def run(stage=stage, batch=batch, form=form) -> dict[str, Any]:
                    mapper, generator = models()
                    g = torch.Generator().manual_seed(batch)
                    if stage == "mapper":
                        module, n = mapper, plan.mapper_layers
                        w = torch.randn(batch, n, plan.mapper_dim, generator=g).to(plan.device)
                        e = torch.randn(batch, plan.mapper_dim, generator=g).to(plan.device)
                        call = lambda: module(w, e)  # noqa: E731
                        precision = "fp32"
                    else:
                        module = generator
                        w = torch.randn(batch, plan.generator.num_ws, plan.generator.style_dim, generator=g)
                        w = w.to(plan.device, PRECISIONS[plan.generator_dtype])
                        call = lambda: module.synthesis(w)  # noqa: E731
                        precision = plan.generator_dtype
                    with torch.no_grad():
                        _set_form(module, "eager")
                        expected = call().float()
                        _set_form(module, "triton" if form == "triton" else "eager")
                        try:
                            fn = _runner(form, call, plan)
                            err = errors(fn(), expected)[1]
                            ms = _median_ms(fn, plan)
                        finally:
                            _set_form(module, "eager")
                    tol = MODEL_TOLERANCE[precision] if form != "eager" else 0.0
                    return {"rel_err": err, "tolerance": tol, "ok": err <= tol, "ms": ms,
                            "images_per_s" if stage == "generator" else "calls_per_s": batch * 1e3 / ms}

                checks.append(Check(stage, f"{stage} {form} B={batch}", run))
    return checks


def _set_form(module: Any, form: str) -> None:
    module.impl = "triton" if form == "triton" else "reference"


def edit_check(plan: Plan) -> Check:
    """Text encoder, mapper and generator in one edit at batch 1 (eager, the generator in its check dtype)."""

    def run() -> dict[str, Any]:
        from ffclip.backends import PRECISIONS
        from ffclip.config import PRESETS, MapperConfig, Preset
        from ffclip.factory import build_preset

        preset = PRESETS["ffhq-1024"]
        if plan.dry_run:
            preset = Preset(name="check", generator=plan.generator, mapper=MapperConfig(num_ws=plan.generator.num_ws),
                            text=PRESETS["random"].text, seed=5)
        text, mapper, generator = (m.to(plan.device).eval() for m in build_preset(preset))
        generator.to(PRECISIONS[plan.generator_dtype])
        tokens = text.tokenize(["a smiling face"]).to(plan.device)
        w = torch.randn(1, preset.generator.num_ws, preset.generator.style_dim).to(plan.device)

        def edit() -> torch.Tensor:
            with torch.no_grad():
                embedding = text(tokens)
                return generator.synthesis(mapper(w, embedding).to(PRECISIONS[plan.generator_dtype]))

        image = edit()
        return {"ok": bool(torch.isfinite(image).all()), "ms": _median_ms(edit, plan)}

    return Check("edit", "whole edit B=1", run)


def tensorrt_check(plan: Plan) -> Check:
    """An exported mapper engine called repeatedly at two batch sizes: CUDA graphs must be captured and replayed."""

    def run() -> dict[str, Any]:
        from ffclip.engines.tensorrt import tensorrt_reason

        reason = tensorrt_reason(plan.device)
        if reason is not None:
            raise _Skip(reason)
        import tempfile

        from ffclip.artifacts import StageInfo, read_manifest
        from ffclip.config import PRESETS
        from ffclip.engines.tensorrt import TensorRTEngine
        from ffclip.export.exporter import ExportOptions, export_artifacts
        from ffclip.factory import build_preset

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "a"
            options = ExportOptions(formats=("onnx", "tensorrt"), min_batch=2, opt_batch=4, max_batch=8,
                                    device=plan.device)
            export_artifacts(build_preset(PRESETS["random"]), folder, options, preset="random", sources={})
            stage = StageInfo.from_manifest(read_manifest(folder), "mapper")
            engine = TensorRTEngine(folder, stage, plan.device)
            try:
                outputs = []
                for batch in (1, 4, 4, 4, 4, 1, 1, 1):  # 1 is padded to the profile's minimum of 2
                    feeds = {t.name: torch.randn(t.concrete_shape(batch)) for t in stage.inputs}
                    outputs.append(engine.run(feeds))
                replays = engine._graphs.replays
            finally:
                engine.close()
        finite = all(torch.isfinite(v).all() for out in outputs for v in out.values())
        return {"ok": replays >= 3 and finite, "graph_replays": replays}

    return Check("tensorrt", "mapper engine CUDA-graph replay", run)


def environment(plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "device": str(plan.device), "dry_run": plan.dry_run}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if plan.device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(plan.device)
        info["driver"] = _driver()
    return info


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def markdown(report: dict[str, Any]) -> str:
    """The checks as one Markdown table, the environment above it."""
    env = report["environment"]
    lines = [f"GPU check: {env.get('card', env['device'])}, driver {env.get('driver')}, torch {env['torch']}, "
             f"triton {env.get('triton')}, {report['elapsed_s']:.0f} s", "",
             "| group | check | status | rel err | ms | eager ms | note |", "|---|---|---|---|---|---|---|"]
    for c in report["checks"]:
        status = c["status"] if c["status"] != "done" else ("ok" if c.get("ok") else "FAIL")
        err = f"{c['rel_err']:.2e}" if "rel_err" in c else ""
        ms = f"{c['ms']:.3f}" if "ms" in c else ""
        eager = f"{c['eager_ms']:.3f}" if "eager_ms" in c else ""
        note = c.get("reason") or (f"{c['images_per_s']:.0f} img/s" if "images_per_s" in c else "")
        if "graph_replays" in c:
            note = f"{c['graph_replays']} graph replays"
        lines.append(f"| {c['group']} | {c['name']} | {status} | {err} | {ms} | {eager} | {note} |")
    return "\n".join(lines) + "\n"


def run_checks(out: Path, dry_run: bool, budget_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every check, rewriting `out/gpu_check.json` after each; write `out/gpu_check.md`; return the report."""
    from ffclip.atomic import atomic_file

    if dry_run:
        torch.manual_seed(0)
    plan = Plan.make(dry_run, budget_s)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    checks = [*kernel_checks(plan), *model_checks(plan), edit_check(plan), tensorrt_check(plan)]
    report: dict[str, Any] = {"environment": environment(plan), "elapsed_s": 0.0, "checks": []}
    start = time.monotonic()

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        with atomic_file(out / "gpu_check.json") as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")

    for i, check in enumerate(checks, 1):
        row: dict[str, Any] = {"group": check.group, "name": check.name}
        if time.monotonic() - start > budget_s:
            row.update(status="skipped", reason=f"the time budget of {budget_s:.0f} s was spent")
        else:
            try:
                row.update(status="done", **check.run())
            except _Skip as exc:
                row.update(status="skipped", reason=str(exc))
            except Exception as exc:  # one failing check must not lose the others
                row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                           traceback=traceback.format_exc(limit=6))
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        report["checks"].append(row)
        save()
        state = row["status"] if row["status"] != "done" else ("ok" if row.get("ok") else "FAIL")
        log(f"[{i}/{len(checks)}] {check.name}: {state}")
    report["passed"] = all(c["status"] == "skipped" or c.get("ok") for c in report["checks"])
    save()
    with atomic_file(out / "gpu_check.md") as tmp:
        tmp.write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at tiny shapes")
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip the checks left after this many seconds")
    args = parser.parse_args(argv)
    return check_command(args.out, args.dry_run, args.budget_s)


def check_command(out: Path, dry_run: bool, budget_s: float = 200.0) -> int:
    """Exit status of one check run: 0 when every check that ran passed, 1 when one failed, 2 on a usage error.
    A dry run switches Triton's interpreter on, which Triton reads when it is first imported: in this process when
    nothing has imported triton yet, else in a fresh Python."""
    from ffclip.kernels._config import interpreting

    if dry_run and not interpreting():
        if "triton" in sys.modules:
            return _interpreted_dry_run(out, budget_s)
        os.environ["TRITON_INTERPRET"] = "1"
    if not dry_run and not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA device; --dry-run runs it on the CPU", file=sys.stderr)
        return 2
    report = run_checks(out, dry_run, budget_s, lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
    return 0 if report["passed"] else 1


def _interpreted_dry_run(out: Path, budget_s: float) -> int:
    """The dry run in a new process with `TRITON_INTERPRET=1` from its start."""
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--out", str(out), "--dry-run", "--budget-s", str(budget_s)]
    return subprocess.run(command, env={**os.environ, "TRITON_INTERPRET": "1"}).returncode


def _import_from_source(root: Path) -> None:
    """Make `ffclip` and its sub-packages importable from the source tree without installing it: the folders
    `kernels`, `export`, `engines` and `benchmarks` are the sub-packages of the same names."""
    sys.path.insert(0, str(root))
    import ffclip

    if str(root) not in ffclip.__path__:
        ffclip.__path__.append(str(root))


if __name__ == "__main__":
    _import_from_source(Path(__file__).resolve().parents[1])
    from ffclip.benchmarks.gpu_check import main as _main

    sys.exit(_main())
