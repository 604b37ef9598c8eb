"""The eager editing pipeline: prompts -> CLIP embedding -> mapper -> generator (and photos -> encoder -> latents),
on in-memory PyTorch modules."""

from __future__ import annotations

import torch
from torch import nn

from .artifacts import STAGES, check_stages_fit, model_facts, stage_tensors
from .devices import resolve_device
from .models import Generator, Mapper, TextEncoder
from .runtime import DEFAULT_MEMORY_BUDGET_MIB, Runtime, eager_engine


class EditPipeline(Runtime):
    """The stages as modules, served by `Runtime` over eager engines: the same inputs, checks, batching and errors
    as an artifact folder. `precision` runs the stages under autocast as an export at that precision would
    (`ffclip.artifacts.compute_precision`). With the photo `encoder` (`ffclip.load_encoder`), `invert` maps photos
    to latents."""

    def __init__(self, text_encoder: TextEncoder, mapper: Mapper, generator: Generator,
                 device: str | torch.device = "cpu", precision: str = "fp32", cache_size: int = 1024,
                 memory_budget_mib: float | None = DEFAULT_MEMORY_BUDGET_MIB, encoder: nn.Module | None = None):
        check_stages_fit(text_encoder, mapper, generator)
        dev = resolve_device(device)
        model = model_facts(text_encoder, generator)
        modules: dict[str, nn.Module] = dict(zip(STAGES, (text_encoder, mapper, generator)))
        engines = {name: eager_engine(name, tensors, modules[name], dev, precision)
                   for name, tensors in stage_tensors(model).items()}
        super().__init__(engines, model, lambda: generator, "eager", dev, cache_size=cache_size,
                         memory_budget_mib=memory_budget_mib,
                         no_encoder="this pipeline has no photo encoder; pass encoder=ffclip.load_encoder(path)")
        self.text_encoder, self.mapper, self.generator = text_encoder, mapper, generator
        if encoder is not None:
            self.use_encoder(encoder, precision)
