"""TorchScript export of one stage by tracing, on the export device and at the export precision."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from ffclip.export.stages import Boundary, StageSpec


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
