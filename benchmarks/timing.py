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


@dataclass(frozen=True)
class Stats:
    """Summary of per-call latencies, in milliseconds."""

    n: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    return Stats(
        n=len(ms),
        median_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        mean_ms=sum(ms) / len(ms),
        min_ms=min(ms),
    )


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    iters: int | None,
    budget_s: float,
    min_iters: int = 3,
    max_iters: int = 1000,
) -> list[float]:
    """Per-call latencies of `fn` in seconds, after `warmup` untimed calls.

    With `iters` set, exactly that many calls are timed; otherwise calls continue until `budget_s` of wall time has
    passed, with at least `min_iters` and at most `max_iters`. On CUDA each call sits between two events and the
    device is synchronised after it, so a call's time includes its launch overhead and nothing queued before it.
    """
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    samples: list[float] = []
    start_wall = time.perf_counter()
    while True:
        if iters is not None:
            if len(samples) >= iters:
                break
        elif len(samples) >= max_iters or (
            len(samples) >= min_iters and time.perf_counter() - start_wall >= budget_s
        ):
            break
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the system, so the next measurement starts from a clean baseline."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a `with` block, in MiB.

    CUDA: the peak bytes allocated through PyTorch's allocator on the device (memory that a backend allocates on its
    own, such as an ONNX Runtime or TensorRT arena, is not seen). CPU: the growth of this process's resident set over
    its size on entry, sampled by a background thread every `interval_s` and once on exit.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.kind = "cuda peak allocated" if device.type == "cuda" else "rss growth"
        self.peak_mib = 0.0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
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
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_mib = max(0, self._peak - self._baseline) / 2**20
