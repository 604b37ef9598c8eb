"""What the benchmark ran on: CPU, GPU and driver, and the versions of the libraries that matter."""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from typing import Any

import psutil
import torch

# library -> distribution names that provide it (first one installed wins)
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "triton": ("triton", "pytorch-triton"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12"),
    "open_clip": ("open_clip_torch", "open-clip-torch"),
    "openvino": ("openvino",),
    "ffclip": ("ffclip",),
}


# the flags that decide a CPU path's speed, recorded with every result
SIMD_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                        "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile"})


def package_version(library: str) -> str | None:
    """The installed version of `library` (a key of `DISTRIBUTIONS`), or None when it is not installed."""
    for dist in DISTRIBUTIONS[library]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, falling back to what `platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first `name` line of /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file is absent)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_clock_ghz() -> float | None:
    """The CPU's nominal clock: the "@ N GHz" of its name, else the current clock in /proc/cpuinfo, else psutil's."""
    match = re.search(r"@\s*([0-9.]+)\s*GHz", cpu_model())
    if match:
        return float(match.group(1))
    mhz = _cpuinfo_field("cpu MHz")
    if mhz:
        return float(mhz) / 1e3
    freq = psutil.cpu_freq()
    return freq.max / 1e3 if freq and freq.max else None


def fp32_flops_per_cycle(flags: set[str], vendor: str | None, family: int | None) -> tuple[int, str]:
    """fp32 FLOPs one core can retire per cycle from its widest vector FMA, and how that was decided.

    Two FMA pipes are assumed (an FMA counts two FLOPs): 2 x 16 lanes x 2 with AVX-512 on Intel and on AMD Zen 5,
    but AMD Zen 4 (family 25) runs AVX-512 on 256-bit pipes, so 2 x 8 x 2; AVX2 with FMA 2 x 8 x 2; AVX without FMA
    one 8-lane multiply and one 8-lane add; SSE one 4-lane multiply and one 4-lane add.
    """
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family is not None and family < 26:
            return 32, "AVX-512 on 256-bit FMA pipes (AMD Zen 4): 2 x 8 lanes x 2"
        return 64, "AVX-512: 2 FMA pipes x 16 lanes x 2"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2 + FMA: 2 FMA pipes x 8 lanes x 2"
    if "avx" in flags:
        return 16, "AVX: 8-lane multiply + 8-lane add"
    return 8, "SSE: 4-lane multiply + 4-lane add"


@functools.cache
def cpu_fp32_peak() -> dict[str, Any] | None:
    """An estimate of the CPU's fp32 peak in GFLOP/s: physical cores x nominal clock x FLOPs per cycle (from the
    flags), with the formula spelled out; None when the clock is unknown. An upper bound: heavy AVX-512 code runs
    below the nominal clock, and some parts have a single 512-bit FMA pipe."""
    clock = cpu_clock_ghz()
    if clock is None:
        return None
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    family = _cpuinfo_field("cpu family")
    per_cycle, how = fp32_flops_per_cycle(cpu_flags(), _cpuinfo_field("vendor_id"), int(family) if family else None)
    gflops = cores * clock * per_cycle
    return {"gflops": round(gflops, 1), "how": f"{cores} cores x {clock:g} GHz x {per_cycle} FLOP/cycle ({how})"}


def nvidia_driver() -> str | None:
    """The NVIDIA driver version reported by nvidia-smi, or None without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def gpu_info(device: torch.device) -> dict[str, Any] | None:
    """Name, memory, compute capability and driver of the CUDA `device`; None on the CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "driver": nvidia_driver(),
        "cuda_runtime": torch.version.cuda,
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell whether two result files are comparable."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": sorted(cpu_flags() & SIMD_FLAGS),
        "cpu_fp32_peak": cpu_fp32_peak(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "gpu": gpu_info(device),
        "versions": {name: package_version(name) for name in DISTRIBUTIONS},
    }
