"""Parity of an exported stage against eager PyTorch on fresh random inputs.

Some stages are ill-conditioned in float32 (the mapper's normalisation across layers divides channels whose values
are nearly zero on every layer, so rounding differences of 1e-7 can grow to 1e-3). When an artifact misses the
tolerance against eager float32, it is judged against a float64 evaluation of the same module instead, over
`FLOAT64_DRAWS` fresh inputs: it passes if its worst error there is within the tolerance or no more than
`FLOAT64_SLACK` times eager float32's own worst error on the same inputs. (Over one or two draws the two worst errors
differ by up to 6x on the seeded-random mapper; over eight they agree within about 1.5x.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .stages import StageSpec, Tolerance

Outputs = dict[str, torch.Tensor]
FLOAT64_SLACK = 4.0
FLOAT64_DRAWS = 8


@dataclass(frozen=True)
class Parity:
    """The worst errors over all batch sizes and outputs, and whether they are within the tolerance.

    `float64` holds (artifact error, eager float32 error) against a float64 reference, in the tolerance's metric,
    when that comparison was needed."""

    batch_sizes: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    tolerance: Tolerance
    float64: tuple[float, float] | None = None

    @property
    def ok(self) -> bool:
        if self.tolerance.check(self.max_abs_err, self.max_rel_err):
            return True
        if self.float64 is None:
            return False
        artifact, eager = self.float64
        return artifact <= max(self.tolerance.value, FLOAT64_SLACK * eager)

    def describe(self) -> str:
        figure = self.max_rel_err if self.tolerance.metric == "rel" else self.max_abs_err
        text = f"max {self.tolerance.metric} error {figure:.3g} (tolerance {self.tolerance.value:.3g})"
        if self.float64 is not None:
            text += f"; against float64 {self.float64[0]:.3g}, eager float32 {self.float64[1]:.3g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        out = {
            "batch_sizes": list(self.batch_sizes),
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "tolerance": self.tolerance.to_dict(),
            "ok": self.ok,
        }
        if self.float64 is not None:
            out["float64"] = {"artifact_err": self.float64[0], "eager_fp32_err": self.float64[1],
                              "slack": FLOAT64_SLACK}
        return out


def errors(actual: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max|a-b|, max|a-b| / max|b|) in float64."""
    a, b = actual.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"output shape {tuple(a.shape)} differs from the reference's {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return diff, diff / scale if scale > 0 else diff


def check_parity(
    spec: StageSpec,
    reference: Callable[[Outputs], Outputs],
    candidate: Callable[[Outputs], Outputs],
    batch_sizes: Sequence[int],
    tolerance: Tolerance,
    seed: int = 1234,
    reference64: Callable[[Outputs], Outputs] | None = None,
) -> Parity:
    """Run both on the same fresh inputs at each batch size and keep the worst errors; when those miss the tolerance
    and `reference64` is given, also measure both against float64."""
    worst_abs = worst_rel = 0.0
    for i, batch in enumerate(batch_sizes):
        inputs = spec.example_inputs(batch, seed=seed + i)
        ref, out = reference(inputs), candidate(inputs)
        for name in spec.output_names:
            if not torch.isfinite(out[name]).all():
                return Parity(tuple(batch_sizes), float("inf"), float("inf"), tolerance)
            abs_err, rel_err = errors(out[name], ref[name])
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
    parity = Parity(tuple(batch_sizes), worst_abs, worst_rel, tolerance)
    if parity.ok or reference64 is None:
        return parity
    pick = 1 if tolerance.metric == "rel" else 0
    artifact64 = eager64 = 0.0
    for i in range(FLOAT64_DRAWS):
        inputs = spec.example_inputs(batch_sizes[i % len(batch_sizes)], seed=seed + len(batch_sizes) + i)
        ref, out, ref64 = reference(inputs), candidate(inputs), reference64(inputs)
        for name in spec.output_names:
            artifact64 = max(artifact64, errors(out[name], ref64[name])[pick])
            eager64 = max(eager64, errors(ref[name], ref64[name])[pick])
    return Parity(tuple(batch_sizes), worst_abs, worst_rel, tolerance, (artifact64, eager64))
