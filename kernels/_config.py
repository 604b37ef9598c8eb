"""Launch configurations: autotune candidates for H100-class GPUs and the small fixed tiles the interpreter uses.

Each configuration is a dict of the kernel's block-size meta-parameters plus `num_warps` and `num_stages`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

Config = dict[str, int]

# Implicit-GEMM modulated convolution: BLOCK_M output pixels x BLOCK_N output channels, BLOCK_K input channels per step.
# Every configuration compiles for sm_80 and sm_90 without spilling (`python -m ffclip.kernels.aot`); 64x128 tiles
# and 64-channel steps beside 64+ output channels spill and are left out.
MODCONV_CONFIGS: list[Config] = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 256, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
]
# Elementwise epilogue after the cuDNN transposed convolution and blur of the upsampling layers, and after the plain
# cuDNN convolution of fp32 layers.
# BLOCK_K only sizes the demodulation's weight tile here; 64 channels of it, or 64x128 tiles, spill.
EPILOGUE_CONFIGS: list[Config] = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    {"BLOCK_M": 256, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 8, "num_stages": 1},
]
# Channel attention: BLOCK_I rows of the attention matrix per program, BLOCK_J columns per step.
ATTENTION_CONFIGS: list[Config] = [
    {"BLOCK_I": 32, "BLOCK_J": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_I": 64, "BLOCK_J": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_I": 32, "BLOCK_J": 64, "num_warps": 4, "num_stages": 2},
]
# The same kernel on fp32 inputs (IEEE dots on the FMA units): the tiles above spill there, so at most 8 score
# elements per thread.
ATTENTION_FP32_CONFIGS: list[Config] = [
    {"BLOCK_I": 32, "BLOCK_J": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_I": 16, "BLOCK_J": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_I": 32, "BLOCK_J": 32, "num_warps": 4, "num_stages": 2},
]

# Small tiles under TRITON_INTERPRET=1: cheap per program and small enough that test shapes span several tiles.
INTERPRET_CONFIGS: dict[str, Config] = {
    "modconv": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16},
    "epilogue": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16},
    "attention": {"BLOCK_I": 16, "BLOCK_J": 16},
}


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launcher(
    kernel: Any, name: str, configs: list[Config], key: list[str], reset_to_zero: tuple[str, ...] = ()
) -> Callable[..., Any]:
    """A function `launch(grid, config, **args)` running `kernel` with `config`, or autotuned over `configs` when None.

    Under the interpreter, or with an explicit `config`, the plain kernel runs with fixed meta-parameters.
    `reset_to_zero` names buffers that the autotuner zeroes before each trial and before the chosen config runs.
    """
    import triton

    @functools.cache
    def tuned() -> Any:
        candidates = [
            triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")}, num_warps=c["num_warps"], num_stages=c["num_stages"])
            for c in configs
        ]
        return triton.autotune(configs=candidates, key=key, reset_to_zero=list(reset_to_zero) or None)(kernel)

    def launch(grid: Callable[[dict[str, int]], tuple[int, ...]], config: Config | None, **args: Any) -> None:
        if config is None and interpreting():
            config = INTERPRET_CONFIGS[name]
        if config is None:
            tuned()[grid](**args)
        else:
            kernel[grid](**args, **config)

    return launch


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse CPU tensors unless the interpreter is on, with a message that says how to run on the CPU."""
    if any(t.device.type == "cpu" for t in tensors) and not interpreting():
        raise RuntimeError("Triton kernels need CUDA tensors; on the CPU set TRITON_INTERPRET=1 before importing triton")
