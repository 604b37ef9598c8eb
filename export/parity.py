"""Parity of an exported stage against its referee on fresh random inputs.

The text encoder and the generator are compared with eager PyTorch float32. The mapper is compared with a float64
evaluation of the same module under a fixed tolerance (`ffclip.export.stages.MAPPER_TOLERANCE`): its normalisation
across layers magnifies float32 rounding in channels that are small on every layer, so float32 results are judged by
their distance to the exact answer, not to another float32 result.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ffclip.export.stages import StageSpec, Tolerance

Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Parity:
    """The worst errors over all batch sizes and outputs against `reference`, and whether they are within the
    tolerance."""

    batch_sizes: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    tolerance: Tolerance
    reference: str

    @property
    def ok(self) -> bool:
        return self.tolerance.check(self.max_abs_err, self.max_rel_err)

    def describe(self) -> str:
        figure = self.max_rel_err if self.tolerance.metric == "rel" else self.max_abs_err
        return f"max {self.tolerance.metric} error {figure:.3g} against {self.reference} (tolerance {self.tolerance.value:.3g})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "reference": self.reference,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "tolerance": self.tolerance.to_dict(),
            "ok": self.ok,
        }


def errors(actual: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max|a-b|, max|a-b| / max|b|) in float64."""
    a, b = actual.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"output shape {tuple(a.shape)} differs from the reference's {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return diff, diff / scale if scale > 0 else diff


def float64_referee(module: nn.Module) -> Callable[..., torch.Tensor]:
    """`module` evaluated in float64 ("the floor"): a float64 copy that takes the module's positional inputs (float ones
    are cast to float64) and returns its float64 output."""
    module64 = copy.deepcopy(module).double()

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module64(*(x.double() if x.is_floating_point() else x for x in inputs))

    return run


def check_parity(
    spec: StageSpec,
    reference: Callable[[Outputs], Outputs],
    candidate: Callable[[Outputs], Outputs],
    batch_sizes: Sequence[int],
    tolerance: Tolerance,
    seed: int = 1234,
) -> Parity:
    """Run both on the same fresh inputs at each batch size and keep the worst errors; `reference` is the stage's
    referee (`spec.referee`)."""
    worst_abs = worst_rel = 0.0
    for i, batch in enumerate(batch_sizes):
        inputs = spec.example_inputs(batch, seed=seed + i)
        ref, out = reference(inputs), candidate(inputs)
        for name in spec.output_names:
            if not torch.isfinite(out[name]).all():
                return Parity(tuple(batch_sizes), float("inf"), float("inf"), tolerance, spec.referee)
            abs_err, rel_err = errors(out[name], ref[name])
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    return Parity(tuple(batch_sizes), worst_abs, worst_rel, tolerance, spec.referee)
