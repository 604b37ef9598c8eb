"""What the benchmark ran on: CPU, GPU and driver, and the versions of the libraries that matter."""

from __future__ import annotations

import os
import platform
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
    "ffclip": ("ffclip",),
}


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
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "gpu": gpu_info(device),
        "versions": {name: package_version(name) for name in DISTRIBUTIONS},
    }
