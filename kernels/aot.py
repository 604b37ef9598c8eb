"""Ahead-of-time compilation of every Triton kernel for named NVIDIA architectures, on a machine without a GPU.

`python -m ffclip.kernels.aot --arch sm_80 --arch sm_90 [--dtype fp16 --dtype bf16 --dtype fp32] --out report.json`

Each kernel is compiled exactly as a real launch would specialise it: the public functions of `ffclip.kernels` run on
`meta` tensors at the shapes of the 1024-pixel generator and the mapper (D=512, L=18), and their launches are caught
instead of run (tensor alignment, integers equal to 1 and divisibility by 16 then come from the real call). Every
autotune configuration of a launch is compiled to PTX and a cubin with `ptxas -v`, whose log gives the registers,
spill bytes and stack; Triton's metadata gives the shared memory. One report row per compilation; the command exits
with status 1 when any compilation fails, spills, or needs more shared memory than the architecture has.

This needs Triton's compiler, not its interpreter: run it in a process without `TRITON_INTERPRET`. Compilations do
not use Triton's cache (a cached kernel would not run ptxas, so its spills would go unseen).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ffclip.backends import PRECISIONS
from ffclip.atomic import atomic_file
from ffclip.errors import summarize

ARCHS: dict[str, int] = {"sm_80": 80, "sm_90": 90}
# Largest shared memory one block may opt into (CUDA programming guide, compute capabilities table).
SMEM_LIMIT: dict[int, int] = {80: 166_912, 90: 232_448}
DEFAULT_DTYPES = ("fp16", "bf16")

# Shapes of the 1024 generator (channel multiplier 2) and of the mapper.
MAPPER_DIM, MAPPER_LAYERS = 512, 18


@dataclasses.dataclass
class Launch:
    """One caught kernel launch: the JIT function, its arguments, and the configurations it would run with."""

    case: str
    fn: Any
    args: tuple
    kwargs: dict[str, Any]
    configs: list[dict[str, int]]

    @property
    def kernel(self) -> str:
        return self.fn.__name__.strip("_").removesuffix("_kernel")


@dataclasses.dataclass
class Row:
    """One compilation's outcome."""

    kernel: str
    case: str
    arch: str
    dtype: str
    config: dict[str, int]
    ok: bool
    registers: int | None = None
    spills: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared_memory: int | None = None
    shared_memory_limit: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.ok and self.spills == 0 and self.shared_memory is not None and self.shared_memory <= self.shared_memory_limit


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _conv3x3(dtype: torch.dtype) -> None:
    from ffclip.kernels import modulated_conv2d

    c, res = 512, 64
    modulated_conv2d(_meta(1, c, res, res, dtype=dtype), _meta(c, c, 3, 3, dtype=dtype), _meta(1, c, dtype=dtype),
                     noise=_meta(1, 1, res, res, dtype=dtype), noise_strength=_meta(dtype=dtype),
                     bias=_meta(c, dtype=dtype), activation="lrelu")


def _torgb(dtype: torch.dtype) -> None:
    from ffclip.kernels import modulated_conv2d

    c, res = 32, 1024
    modulated_conv2d(_meta(1, c, res, res, dtype=dtype), _meta(3, c, 1, 1, dtype=dtype), _meta(1, c, dtype=dtype),
                     demodulate=False, bias=_meta(3, dtype=dtype), residual=_meta(1, 3, res, res, dtype=dtype))


def _up_epilogue(dtype: torch.dtype) -> None:
    from ffclip.kernels import modulated_conv2d

    c_in, c_out, res = 512, 256, 64
    modulated_conv2d(_meta(1, c_in, res, res, dtype=dtype), _meta(c_out, c_in, 3, 3, dtype=dtype),
                     _meta(1, c_in, dtype=dtype), up=True, noise=_meta(1, 1, 2 * res, 2 * res, dtype=dtype),
                     noise_strength=_meta(dtype=dtype), bias=_meta(c_out, dtype=dtype), activation="lrelu")


def _channel_attention(dtype: torch.dtype) -> None:
    from ffclip.kernels import channel_attention

    d, n = MAPPER_DIM, MAPPER_LAYERS
    channel_attention(_meta(1, n, d, dtype=dtype), _meta(n, 1, dtype=dtype), _meta(1, d, dtype=dtype),
                      e=_meta(1, d, dtype=dtype))


def _layer_selection(dtype: torch.dtype) -> None:
    from ffclip.kernels import layer_selection

    d, n = MAPPER_DIM, MAPPER_LAYERS
    layer_selection(_meta(1, n, d, dtype=dtype), _meta(1, d, dtype=dtype), _meta(1, n, d, dtype=dtype))


def _mapper_block(dtype: torch.dtype) -> None:
    from ffclip.kernels import mapper_block

    d, n = MAPPER_DIM, MAPPER_LAYERS
    layers = functools.partial(_meta, 1, n, d, dtype=dtype)  # K, V, Q2
    row = functools.partial(_meta, 1, 1, d, dtype=dtype)  # q, mean_L(V2), gamma, beta, e
    mapper_block(layers(), row(), layers(), layers(), _meta(n, 1, dtype=dtype), row(), row(), row(), e=row())


# Each case calls a public function the way a model does; its launches are what gets compiled.
CASES: dict[str, Callable[[torch.dtype], None]] = {
    "conv3x3": _conv3x3,
    "torgb": _torgb,
    "up_epilogue": _up_epilogue,
    "channel_attention": _channel_attention,
    "layer_selection": _layer_selection,
    "mapper_block": _mapper_block,
}

_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@contextlib.contextmanager
def _caught_launches(case: str, into: list[Launch]) -> Iterator[None]:
    """Replace running a kernel (plain or autotuned) by recording the launch."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        config = {k: kwargs.pop(k) for k in _OPTION_NAMES if k in kwargs}
        into.append(Launch(case, self, args, kwargs, [config]))

    def tuned_run(self: Any, *args: Any, grid: Any = None, warmup: bool = False, **kwargs: Any) -> None:
        configs = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in self.configs]
        into.append(Launch(case, self.fn, args, kwargs, configs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def launches(dtype: torch.dtype, cases: dict[str, Callable[[torch.dtype], None]] = CASES) -> list[Launch]:
    """Every distinct kernel launch the cases make in `dtype` (a launch repeated with the same arguments once)."""
    caught: list[Launch] = []
    for name, case in cases.items():
        with _caught_launches(name, caught):
            case(dtype)
    distinct: dict[str, Launch] = {}
    for launch in caught:
        key = repr((launch.fn.__name__, [_describe(a) for a in launch.args],
                    sorted((k, _describe(v)) for k, v in launch.kwargs.items())))
        distinct.setdefault(key, launch)
    return list(distinct.values())


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16, tuple(value.shape), value.stride())
    return value


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch, config: dict[str, int], capability: int, dtype: str) -> Row:
    """Compile one launch with one configuration for `sm_<capability>` and read its resources from ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    row = Row(launch.kernel, launch.case, f"sm_{capability}", dtype, dict(config), ok=False,
              shared_memory_limit=SMEM_LIMIT[capability])
    start = time.perf_counter()
    try:
        backend = make_backend(target)
        kwargs = {**launch.kwargs, **config, "debug": False}
        binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = launch.fn._pack_args(backend, kwargs, bound, specialization, options)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        text = log.getvalue()
        registers, spills = _REGISTERS.findall(text), _SPILLS.findall(text)
        if not registers or not spills:
            raise RuntimeError("ptxas printed no resource usage")
        row.registers = max(int(r) for r in registers)
        row.stack = max(int(s[0]) for s in spills)
        row.spills = sum(int(s[1]) for s in spills)
        row.spill_loads = sum(int(s[2]) for s in spills)
        row.shared_memory = int(compiled.metadata.shared)
        row.ok = True
    except Exception as exc:  # one failed compilation is a row of the report, not the end of the run
        row.error = summarize(exc)
    row.seconds = round(time.perf_counter() - start, 2)
    return row


@contextlib.contextmanager
def _compiler_settings() -> Iterator[None]:
    """A private, empty Triton cache (so ptxas always runs) and ptxas logs printed (so they can be read)."""
    from triton import knobs

    with tempfile.TemporaryDirectory(prefix="ffclip-aot-") as cache:
        saved = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
        knobs.cache.dir, knobs.nvidia.dump_ptxas_log = cache, True
        try:
            yield
        finally:
            knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved


def compile_all(archs: list[str], dtypes: list[str], cases: list[str] | None = None,
                progress: Callable[[Row, int, int], None] | None = None) -> list[Row]:
    """Every launch of every case (or of `cases`), in every configuration, for every architecture and dtype."""
    chosen = {name: CASES[name] for name in cases or CASES}
    work = [(arch, dtype, launch, config)
            for dtype in dtypes for launch in launches(PRECISIONS[dtype], chosen)
            for arch in archs for config in launch.configs]
    rows = []
    for i, (arch, dtype, launch, config) in enumerate(work):
        with _compiler_settings():  # a cache per compilation: two cases can specialise a kernel identically
            row = compile_launch(launch, config, ARCHS[arch], dtype)
        rows.append(row)
        if progress is not None:
            progress(row, i + 1, len(work))
    return rows


def _line(row: Row) -> str:
    config = " ".join(f"{k}={v}" for k, v in row.config.items())
    if not row.ok:
        return f"{row.kernel:<18} {row.case:<17} {row.arch} {row.dtype:<4} [{config}] FAILED {row.error}"
    verdict = "ok" if row.passed else "SPILLS" if row.spills else "SMEM>LIMIT"
    return (f"{row.kernel:<18} {row.case:<17} {row.arch} {row.dtype:<4} [{config}] {verdict}: {row.registers} regs, "
            f"{row.spills} B spilled, {row.shared_memory} B smem, {row.seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ffclip.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="target architecture (repeatable)")
    parser.add_argument("--dtype", action="append", choices=sorted(PRECISIONS),
                        help=f"element type (repeatable; default {' and '.join(DEFAULT_DTYPES)})")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases (repeatable; default all)")
    parser.add_argument("--out", required=True, help="JSON report to write")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set; the ahead-of-time compiler needs Triton's compiler. "
              "Run it with TRITON_INTERPRET unset.", file=sys.stderr)
        return 2
    archs, dtypes = args.arch or sorted(ARCHS), args.dtype or list(DEFAULT_DTYPES)

    def progress(row: Row, done: int, total: int) -> None:
        print(f"[{done}/{total}] {_line(row)}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    rows = compile_all(archs, dtypes, args.case, progress)
    import triton

    report = {
        "triton": triton.__version__,
        "archs": archs,
        "dtypes": dtypes,
        "cases": args.case or sorted(CASES),
        "seconds": round(time.perf_counter() - start, 1),
        "passed": all(r.passed for r in rows),
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    bad = [r for r in rows if not r.passed]
    print(f"{len(rows)} compilations in {report['seconds']} s, {len(bad)} failing (failure, spill or shared memory "
          f"over the limit); report in {args.out}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
