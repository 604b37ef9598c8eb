"""The JSON bodies the HTTP API accepts, checked into plain objects; every problem is an `InputError` of one line."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..latents import check_latents

MAX_PROMPT_CHARS = 1000
MAX_PROMPTS = 64
DEFAULT_TRUNCATION = 0.7
EDIT_FIELDS = {"prompt", "seed", "latents", "strength", "truncation"}


@dataclass(frozen=True)
class EditRequest:
    """One edit: a prompt, and either a seed (sampled through the mapping network) or latents `[L, 512]`."""

    prompt: str
    strength: float = 1.0
    seed: int | None = None
    latents: torch.Tensor | None = None
    truncation: float = DEFAULT_TRUNCATION


def parse_edit(body: Any, num_ws: int, dim: int = 512) -> EditRequest:
    """An `EditRequest` from a decoded `/v1/edit` body, for a generator with `num_ws` style layers."""
    body = _object(body, EDIT_FIELDS)
    prompt = parse_prompt(body.get("prompt"))
    if ("seed" in body) == ("latents" in body):
        raise InputError('give exactly one of "seed" (an integer) or "latents" ([L, 512] or [512] numbers)')
    strength = _number(body.get("strength", 1.0), "strength")
    truncation = _number(body.get("truncation", DEFAULT_TRUNCATION), "truncation")
    if not 0 <= truncation <= 1:
        raise InputError(f'"truncation" must lie in [0, 1], got {truncation}')
    if "seed" in body:
        seed = body["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise InputError(f'"seed" must be an integer in [0, 2^32), got {seed!r}')
        return EditRequest(prompt, strength, seed=seed, truncation=truncation)
    return EditRequest(prompt, strength, latents=_latents(body["latents"], num_ws, dim), truncation=truncation)


def parse_prompts(body: Any) -> list[str]:
    """The prompts of a decoded `/v1/encode` body: `{"prompt": str}` or `{"prompts": [str, ...]}`."""
    body = _object(body, {"prompt", "prompts"})
    if ("prompt" in body) == ("prompts" in body):
        raise InputError('give exactly one of "prompt" (a string) or "prompts" (a list of strings)')
    if "prompt" in body:
        return [parse_prompt(body["prompt"])]
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
        raise InputError(f'"prompts" must be a list of 1 to {MAX_PROMPTS} strings')
    return [parse_prompt(p) for p in prompts]


def parse_prompt(prompt: Any) -> str:
    """A non-empty prompt of at most `MAX_PROMPT_CHARS` characters, stripped of surrounding white space."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError('"prompt" must be a non-empty string')
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f'"prompt" is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}')
    return prompt.strip()


def _object(body: Any, fields: set[str]) -> dict:
    if not isinstance(body, dict):
        raise InputError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(fields))}")
    return body


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f'"{name}" must be a finite number, got {value!r}')
    return float(value)


def _latents(value: Any, num_ws: int, dim: int) -> torch.Tensor:
    try:
        w = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise InputError(f'"latents" must be a list of {dim} numbers or {num_ws} such lists') from None
    if tuple(w.shape) not in ((dim,), (num_ws, dim)):
        raise InputError(f'"latents" has shape {list(w.shape)}; expected [{num_ws}, {dim}] or [{dim}]')
    return check_latents(w[None], num_ws, dim, where='"latents"')[0]
