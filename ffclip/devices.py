"""Validating device names given by users."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A `torch.device` that exists on this machine (CUDA with its index); "auto" or None picks CUDA when present,
    else the CPU."""
    if name is None or str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but no CUDA device is available here; use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise InputError(f"device type {device.type!r} is not supported; use cpu, cuda, cuda:N or auto")
    return device
