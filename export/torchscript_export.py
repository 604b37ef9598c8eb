"""TorchScript export of one stage by tracing, on the export device and at the export precision."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffclip.backends import PRECISIONS, compute_precision
from ffclip.export.options import ExportOptions
from ffclip.export.stages import Boundary, StageSpec


def skip_reason(options: ExportOptions) -> str | None:
    """Tracing runs wherever torch does."""
    return None


def build(spec: StageSpec, module: nn.Module, folder: Path, options: ExportOptions, entry: dict[str, Any]) -> None:
    """Trace `torchscript/<stage>.pt` on the export device, at the precision the policy gives it there."""
    path = folder / "torchscript" / f"{spec.name}.pt"
    dtype = PRECISIONS[compute_precision(spec.name, "torchscript", options.precision, options.device)]
    export_torchscript(spec, module, path, options.device, dtype)
    entry["files"]["torchscript"] = path.relative_to(folder).as_posix()
    entry["torchscript"] = {"device": options.device.type, "compute_dtype": str(dtype).removeprefix("torch.")}


def export_torchscript(spec: StageSpec, module: nn.Module, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Trace a copy of `module` on `device` (float inputs and outputs stay float32; the compute runs in `dtype`) and save it."""
    wrapper = Boundary(copy.deepcopy(module).to(device).eval(), dtype)
    example = spec.example_inputs(2)
    args = tuple(example[n].to(device) for n in spec.input_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapper, args, check_trace=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
