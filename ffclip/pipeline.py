"""The eager editing pipeline: prompts -> CLIP embedding -> mapper -> generator, on in-memory PyTorch modules."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .artifacts import STAGES, StageInfo, check_stages_fit, compute_precision, model_facts, stage_tensors
from .devices import resolve_device
from .engines.eager import EagerEngine
from .models import Generator, Mapper, TextEncoder
from .runtime import DEFAULT_MEMORY_BUDGET_MIB, Runtime


class EditPipeline(Runtime):
    """The three stages as modules, served by `Runtime` over eager engines: the same inputs, checks, batching and
    errors as an artifact folder. `precision` runs the stages under autocast as an export at that precision would
    (`ffclip.artifacts.compute_precision`)."""

    def __init__(self, text_encoder: TextEncoder, mapper: Mapper, generator: Generator,
                 device: str | torch.device = "cpu", precision: str = "fp32", cache_size: int = 1024,
                 memory_budget_mib: float | None = DEFAULT_MEMORY_BUDGET_MIB):
        check_stages_fit(text_encoder, mapper, generator)
        dev = resolve_device(device)
        model = model_facts(text_encoder, generator)
        modules: dict[str, nn.Module] = dict(zip(STAGES, (text_encoder, mapper, generator)))
        engines = {
            name: EagerEngine(None, StageInfo(name, inputs, outputs, files={}, min_batch=1, opt_batch=1,
                                              max_batch=sys.maxsize, precision=precision,
                                              entry={"compute_precision": {"eager": compute_precision(name, precision)}}),
                              dev, module=modules[name])
            for name, (inputs, outputs) in stage_tensors(model).items()
        }
        super().__init__(engines, model, lambda: generator, "eager", dev, cache_size=cache_size,
                         memory_budget_mib=memory_budget_mib)
        self.text_encoder, self.mapper, self.generator = text_encoder, mapper, generator
