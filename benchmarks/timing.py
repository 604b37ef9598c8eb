"""Timers and statistics: per-call latencies (CUDA events on a GPU, `perf_counter` on the CPU) and peak memory."""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch


# warm-up ends once two consecutive calls that compiled nothing agree within this factor (a first call or a cold cache
# is many times slower than the calls after it), or after `MAX_WARMUP_CALLS` calls
SETTLE_RATIO = 1.5
MAX_WARMUP_CALLS = 20
# a cell whose p90 is more than this many times its median is flagged: its calls did not settle
UNSTABLE_SPREAD = 2.0


@dataclass(frozen=True)
class Stats:
    """Summary of per-call latencies, in milliseconds; `spread` is p90 over the median."""

    n: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    spread: float

    @property
    def unstable(self) -> bool:
        """Whether the p90 exceeds `UNSTABLE_SPREAD` times the median."""
        return self.spread > UNSTABLE_SPREAD

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unstable": self.unstable}


@dataclass(frozen=True)
class Timing:
    """Per-call latencies in seconds, the number of untimed warm-up calls before them, and whether the warm-up
    settled (see `time_calls`) before its last allowed call."""

    samples: list[float]
    warmup_calls: int
    settled: bool


def percentile(samples: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(seconds: list[float]) -> Stats:
    """Median, p90, p99, mean and minimum of latencies given in seconds."""
    ms = [s * 1e3 for s in seconds]
    median = percentile(ms, 50)
    p90 = percentile(ms, 90)
    return Stats(
        n=len(ms),
        median_ms=median,
        p90_ms=p90,
        p99_ms=percentile(ms, 99),
        mean_ms=sum(ms) / len(ms),
        min_ms=min(ms),
        spread=p90 / median if median > 0 else 1.0,
    )


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (its first compilations and recompilations)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    iters: int | None,
    budget_s: float,
    min_iters: int = 3,
    max_iters: int = 1000,
    clock: Callable[[], float] = time.perf_counter,
    compilations: Callable[[], int] = compiled_graphs,
) -> Timing:
    """Per-call latencies of `fn` after its warm-up: at least `warmup` untimed calls and, when `warmup` is not 0, more
    until two consecutive calls that compiled nothing (`compilations` did not change) agree within `SETTLE_RATIO`, up
    to `MAX_WARMUP_CALLS` calls (or `warmup` when more), so that compilations stay out of the timed calls.

    With `iters` set, exactly that many calls are timed; otherwise calls continue until `budget_s` of wall time has
    passed, with at least `min_iters` and at most `max_iters`. On CUDA each call sits between two events and the
    device is synchronised after it, so a call's time includes its launch overhead and nothing queued before it.
    `clock` gives seconds on the CPU.
    """
    calls, settled = 0, False
    quiet: list[float] = []  # seconds of the warm-up calls since the last one that compiled
    while warmup and not settled and calls < max(warmup, MAX_WARMUP_CALLS):
        before = compilations()
        seconds = _timed_call(fn, device, clock)
        calls += 1
        quiet = [] if compilations() != before else [*quiet[-1:], seconds]
        settled = calls >= warmup and len(quiet) == 2 and max(quiet) <= SETTLE_RATIO * min(quiet)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: list[float] = []
    start_wall = clock()
    while True:
        if iters is not None:
            if len(samples) >= iters:
                break
        elif len(samples) >= max_iters or (len(samples) >= min_iters and clock() - start_wall >= budget_s):
            break
        samples.append(_timed_call(fn, device, clock))
    return Timing(samples, calls, settled)


def _timed_call(fn: Callable[[], Any], device: torch.device, clock: Callable[[], float]) -> float:
    """Seconds one call of `fn` takes: between two CUDA events on CUDA, by `clock` on the CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    start = clock()
    fn()
    return clock() - start


def release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the system, so the next measurement starts from a clean baseline."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a `with` block, in MiB (`peak_mib`: the peak so far while the block runs, its peak after).

    CUDA: the peak bytes allocated through PyTorch's allocator on the device (memory that a backend allocates on its
    own, such as an ONNX Runtime or TensorRT arena, is not seen). CPU: the growth of this process's resident set over
    its size on entry, sampled by a background thread every `interval_s` and once on exit.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.kind = "cuda peak allocated" if device.type == "cuda" else "rss growth"
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0
        self._peak = 0
        self._final: float | None = None  # the block's peak, once it has ended

    @property
    def peak_mib(self) -> float:
        if self._final is not None:
            return self._final
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(0, self._peak - self._baseline) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        self._final = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._baseline = self._peak = self._process.memory_info().rss
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
        self._final = self.peak_mib
