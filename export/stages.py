"""How each stage describes its own export: its tensors (from `ffclip.artifacts`), example inputs and tolerances.

ONNX, TorchScript and TensorRT export and the parity checks read their facts from `StageSpec`; engines read the same
tensors back from the manifest as `ffclip.artifacts.StageInfo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ffclip.artifacts import (
    PHOTO_SIZE,
    StageInfo,
    TensorInfo,
    check_encoder_fits,
    check_stages_fit,
    model_facts,
    stage_tensors,
)
from ffclip.models import Encoder4Editing, Generator, Mapper, TextEncoder

# CLIP's start/end-of-text tokens: the last two entries of its 49408-token vocabulary
_SOT_OFFSET, _EOT_OFFSET = 2, 1


@dataclass(frozen=True)
class Tolerance:
    """A parity bound. `metric` "rel" bounds max|a-b| / max|ref| (relative to the reference's scale); "abs" bounds
    max|a-b|."""

    metric: str
    value: float

    def check(self, max_abs: float, max_rel: float) -> bool:
        return (max_rel if self.metric == "rel" else max_abs) <= self.value

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value}


# Reduced precisions keep about 3 (fp16) or 2 (bf16) significant digits through dozens of layers.
_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # int8 (weights alone, `ffclip.backends.INT8_MODES`, bf16 elsewhere): the world's text encoder came within 1.6%
    # of eager float32 (max rel); 8e-2 as bf16, since int8 weights add less error than bf16 computation
    "text_encoder": {"fp32": Tolerance("rel", 1e-4), "fp16": Tolerance("rel", 2e-2), "bf16": Tolerance("rel", 8e-2),
                     "int8": Tolerance("rel", 8e-2)},
    "generator": {"fp32": Tolerance("abs", 1e-3), "fp16": Tolerance("abs", 1e-1), "bf16": Tolerance("abs", 4e-1)},
    # relative to the largest |w|, against float64: float32 came within 1e-7 of it (two style heads, 64 px photos,
    # seeded released-layout weights); 1e-4 leaves room for 18 heads at 256 px. Reduced precisions as the text encoder.
    "encoder": {"fp32": Tolerance("rel", 1e-4), "fp16": Tolerance("rel", 2e-2), "bf16": Tolerance("rel", 8e-2)},
}
# The mapper is held to a float64 evaluation of the same module. Its normalisation across layers magnifies rounding in
# channels that are small on every layer, so a correct float32 result is within about 5e-3 of the output's largest
# value of float64 (not 1e-4), and two correct float32 results differ by about as much.
MAPPER_TOLERANCE = Tolerance("rel", 1e-2)
FLOAT64_REFEREE = "float64"
EAGER_REFEREE = "eager fp32"
# stages held to a float64 evaluation of the same module rather than to eager float32
FLOAT64_REFEREED = ("mapper", "encoder")


@dataclass(frozen=True)
class StageSpec:
    """One stage as the exporter sees it."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    make_inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Fresh random inputs of batch size `batch` (CPU tensors, reproducible from `seed`)."""
        return self.make_inputs(batch, torch.Generator().manual_seed(seed))

    def tolerance(self, precision: str) -> Tolerance:
        """The parity bound of an artifact computing in `precision`, against the stage's `referee`."""
        return MAPPER_TOLERANCE if self.name == "mapper" else _TOLERANCES[self.name][precision]

    @property
    def referee(self) -> str:
        """What an artifact is compared with: a float64 evaluation for the mapper and the encoder, eager fp32 for the
        others."""
        return FLOAT64_REFEREE if self.name in FLOAT64_REFEREED else EAGER_REFEREE

    def profile(self, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per input: (min, opt, max) shapes of the one optimisation profile for the batch range."""
        return {t.name: tuple(t.concrete_shape(b) for b in (min_batch, opt_batch, max_batch)) for t in self.inputs}

    def manifest_entry(self) -> dict[str, Any]:
        """The stage's tensors as the manifest records them."""
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    def info(self, files: dict[str, str], batch: tuple[int, int, int], precision: str, entry: dict[str, Any]) -> StageInfo:
        """The `StageInfo` an engine is built from, before the manifest is written."""
        return StageInfo(
            name=self.name,
            inputs=self.inputs,
            outputs=self.outputs,
            files=files,
            min_batch=batch[0],
            opt_batch=batch[1],
            max_batch=batch[2],
            precision=precision,
            entry=entry,
        )


def _tokens(vocab_size: int, context_length: int) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    sot, eot = vocab_size - _SOT_OFFSET, vocab_size - _EOT_OFFSET

    def make(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        tokens = torch.zeros(batch, context_length, dtype=torch.int64)
        lengths = torch.randint(1, context_length - 1, (batch,), generator=g)
        for i, n in enumerate(lengths.tolist()):
            tokens[i, 0] = sot
            tokens[i, 1 : n + 1] = torch.randint(1, sot, (n,), generator=g)
            tokens[i, n + 1] = eot
        return {"tokens": tokens}

    return make


def _latents(num_ws: int, dim: int, with_embedding: bool) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    def make(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        out = {"w": torch.randn(batch, num_ws, dim, generator=g)}
        if with_embedding:
            out["embedding"] = torch.randn(batch, dim, generator=g)
        return out

    return make


def _photos(size: int) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    def make(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
        return {"images": torch.rand(batch, 3, size, size, generator=g) * 2 - 1}

    return make


def stage_specs(text_encoder: TextEncoder, mapper: Mapper, generator: Generator,
                encoder: Encoder4Editing | None = None, photo_size: int = PHOTO_SIZE,
                encoder_name: str = "the encoder") -> dict[str, StageSpec]:
    """The stages' specs, read from the modules' configurations: the three of every edit, and the photo encoder
    (inputs `photo_size` pixels on a side) when given; `InputError` when they do not fit together (naming the
    encoder as `encoder_name`)."""
    check_stages_fit(text_encoder, mapper, generator)
    if encoder is not None:
        check_encoder_fits(encoder, generator.num_ws, generator.config.style_dim, encoder_name)
    model = model_facts(text_encoder, generator, None if encoder is None else photo_size)
    num_ws, dim = model["num_ws"], model["embed_dim"]
    inputs = {
        "text_encoder": _tokens(text_encoder.clip.vocab_size, model["context_length"]),
        "mapper": _latents(num_ws, dim, with_embedding=True),
        "generator": _latents(num_ws, dim, with_embedding=False),
        "encoder": _photos(photo_size),
    }
    return {name: StageSpec(name, *tensors, inputs[name]) for name, tensors in stage_tensors(model).items()}


class Boundary(nn.Module):
    """A stage as exported: positional inputs in the spec's order, float inputs cast to `dtype` for the compute and
    float outputs returned as float32, so every artifact has the same float32 interface whatever its precision.
    The module is converted to `dtype` in place."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        cast = [x.to(self.dtype) if x.is_floating_point() else x for x in inputs]
        return self.module(*cast).float()
