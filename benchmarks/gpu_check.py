"""One-call GPU check of the Triton kernels: parity against the references and CUDA-event timings against eager.

Run `python benchmarks/gpu_check.py` on a CUDA machine with the project installed. Every check is recorded, failures
included, in `$OUT/gpu_check.json` (or `--out`); a table is printed last. `--dry-run` lists the checks and exits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

GEN_WIDTHS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
GEN_BATCHES = (1, 8, 32)
MAPPER_BATCHES = (1, 8, 64)
MAPPER_L, MAPPER_D = 18, 512
GRAPH_TARGET_MS = 0.3
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}


@dataclass
class Check:
    """One named check: `run()` returns the fields to record (errors, timings)."""

    group: str
    name: str
    run: Callable[[], dict[str, Any]]
    result: dict[str, Any] = field(default_factory=dict)


def cuda_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median milliseconds per call of `fn`, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def layer_checks(args: argparse.Namespace) -> list[Check]:
    from ffclip import kernels

    checks = []
    shapes = []
    for res, width in GEN_WIDTHS.items():
        prev = GEN_WIDTHS.get(res // 2, width)
        shapes.append((f"conv3 {res}", width, width, res, 3, False))
        if res > 4:
            shapes.append((f"up {res}", prev, width, res // 2, 3, True))
        shapes.append((f"torgb {res}", width, 3, res, 1, False))
    for dname in args.dtypes:
        for label, c_in, c_out, size, ksize, up in shapes:
            for batch in GEN_BATCHES:
                def run(c_in=c_in, c_out=c_out, size=size, ksize=ksize, up=up, dname=dname, batch=batch):
                    dtype = DTYPES[dname]
                    g = torch.Generator(device="cuda").manual_seed(0)
                    out_size = 2 * size if up else size
                    x = torch.randn(batch, c_in, size, size, device="cuda", generator=g)
                    w = torch.randn(c_out, c_in, ksize, ksize, device="cuda", generator=g)
                    s = torch.randn(batch, c_in, device="cuda", generator=g) + 1
                    opts: dict[str, Any] = {"bias": torch.randn(c_out, device="cuda", generator=g), "up": up}
                    if ksize == 1:
                        opts.update(demodulate=False, residual=torch.randn(batch, c_out, out_size, out_size, device="cuda",
                                                                           generator=g).to(dtype))
                    else:
                        opts.update(noise=torch.randn(1, 1, out_size, out_size, device="cuda", generator=g),
                                    noise_strength=torch.tensor(0.5, device="cuda"), activation="lrelu")
                    xd = x.to(dtype).to(memory_format=torch.channels_last)
                    fused = lambda: kernels.modulated_conv2d(xd, w, s, **opts)  # noqa: E731
                    eager = lambda: kernels.modulated_conv2d_reference(xd, w, s, **opts)  # noqa: E731
                    y = fused()
                    if batch == 1:
                        ref = kernels.modulated_conv2d_reference(
                            x.double(), w.double(), s.double(),
                            **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in opts.items()})
                    else:
                        ref = eager()
                    err = rel_err(y, ref)
                    t_fused = cuda_ms(fused, args.warmup, args.iters)
                    t_eager = cuda_ms(eager, args.warmup, args.iters)
                    return {"rel_err": err, "reference": "float64" if batch == 1 else f"eager {dname}",
                            "ok": err <= TOLERANCE[dname] * (1 if batch == 1 else 2),
                            "triton_ms": t_fused, "eager_ms": t_eager}
                checks.append(Check("layer", f"{label} {c_in}->{c_out} {dname} B={batch}", run))
    return checks


def mapper_checks(args: argparse.Namespace) -> list[Check]:
    from ffclip import kernels
    from ffclip.config import MapperConfig
    from ffclip.factory import build_mapper
    from ffclip.models.mapper import MapperBlock

    checks = []
    for batch in MAPPER_BATCHES:
        def attention(batch=batch):
            g = torch.Generator(device="cuda").manual_seed(1)
            q2 = torch.randn(batch, MAPPER_L, MAPPER_D, device="cuda", generator=g)
            w = torch.randn(MAPPER_L, 1, device="cuda", generator=g)
            m = torch.randn(batch, MAPPER_D, device="cuda", generator=g)
            e = torch.randn(batch, MAPPER_D, device="cuda", generator=g)
            fused = lambda: kernels.channel_attention(q2, w, m, e=e)  # noqa: E731
            eager = lambda: kernels.channel_attention_reference(q2, w, m, e=e)  # noqa: E731
            err = rel_err(fused(), kernels.channel_attention_reference(q2.double(), w.double(), m.double(), e=e.double()))
            return {"rel_err": err, "reference": "float64", "ok": err <= 1e-4,
                    "triton_ms": cuda_ms(fused, args.warmup, args.iters), "eager_ms": cuda_ms(eager, args.warmup, args.iters)}

        def block(batch=batch):
            torch.manual_seed(2)
            module = MapperBlock(MAPPER_L, MAPPER_D).cuda()
            x = torch.randn(batch, MAPPER_L, MAPPER_D, device="cuda")
            e = torch.randn(batch, 1, MAPPER_D, device="cuda")
            with torch.no_grad():
                fused = lambda: kernels.mapper_block(module, x, e)  # noqa: E731
                eager = lambda: module(x, e)  # noqa: E731
                y = fused()
                ref = module.double()(x.double(), e.double())
                module.float()
                err = rel_err(y, ref)
                return {"rel_err": err, "reference": "float64", "ok": err <= 1e-4,
                        "triton_ms": cuda_ms(fused, args.warmup, args.iters), "eager_ms": cuda_ms(eager, args.warmup, args.iters)}

        checks.append(Check("mapper", f"channel attention L={MAPPER_L} D={MAPPER_D} B={batch}", attention))
        checks.append(Check("mapper", f"mapper block B={batch}", block))

    def graph():
        mapper = build_mapper(MapperConfig(num_ws=MAPPER_L, dim=MAPPER_D), seed=3).cuda()
        w = torch.randn(1, MAPPER_L, MAPPER_D, device="cuda")
        e = torch.randn(1, MAPPER_D, device="cuda")
        times = {}
        outs = {}
        with torch.no_grad():
            for form in ("eager", "triton"):
                mapper.form = form
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        mapper(w, e)
                torch.cuda.current_stream().wait_stream(side)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    outs[form] = mapper(w, e)
                times[form] = cuda_ms(cuda_graph.replay, args.warmup, args.iters * 5)
        err = rel_err(outs["triton"], outs["eager"])
        return {"rel_err": err, "reference": "eager fp32 in a graph", "ok": err <= 1e-4 and times["triton"] <= GRAPH_TARGET_MS,
                "triton_ms": times["triton"], "eager_ms": times["eager"], "target_ms": GRAPH_TARGET_MS}

    checks.append(Check("mapper", "mapper (4 blocks) in a CUDA graph B=1", graph))
    return checks


def environment() -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
                            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name()
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["driver"] = f"unknown ({exc})"
    return info


def print_table(checks: list[Check]) -> None:
    print(f"{'check':58} {'ok':>5} {'rel err':>9} {'triton ms':>10} {'eager ms':>10} {'speedup':>8}")
    for c in checks:
        r = c.result
        if "error" in r or "skipped" in r:
            print(f"{c.name:58} {'FAIL' if 'error' in r else 'skip':>5}  {r.get('error') or r.get('skipped')}"[:160])
            continue
        speed = r["eager_ms"] / r["triton_ms"] if r.get("triton_ms") else float("nan")
        print(f"{c.name:58} {str(r['ok']):>5} {r['rel_err']:9.2e} {r['triton_ms']:10.3f} {r['eager_ms']:10.3f} {speed:8.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for gpu_check.json")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed calls per measurement (median)")
    parser.add_argument("--budget-s", type=float, default=210.0, help="skip the checks left after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; use --dry-run to list the checks", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    checks = mapper_checks(args) + layer_checks(args)
    if args.dry_run:
        for c in checks:
            print(f"{c.group:7} {c.name}")
        print(f"{len(checks)} checks")
        return 0
    start = time.monotonic()
    for c in checks:
        if time.monotonic() - start > args.budget_s:
            c.result = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        try:
            c.result = c.run()
        except Exception as exc:  # one failing check must not lose the others
            c.result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)}
        finally:
            torch.cuda.empty_cache()
    report = {"environment": environment(), "elapsed_s": time.monotonic() - start,
              "checks": [{"group": c.group, "name": c.name, **c.result} for c in checks]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print_table(checks)
    return 0 if all(c.result.get("ok") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
